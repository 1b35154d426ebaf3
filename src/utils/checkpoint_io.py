"""How a training run writes its Lightning checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from src.utils.io import atomic_path


class StreamingCheckpointIO(TorchCheckpointIO):
    """``torch.save`` straight into a temporary file beside the target, then a rename (``atomic_path``).

    Lightning's own save serializes the whole checkpoint into an ``io.BytesIO`` first, a transient
    copy as large as the checkpoint (with fp32 AdamW three times the weights: SmolLM2's is 1.6 GB)
    on top of the training state, at every save; streaming holds none of it, and a failed write
    still leaves the previous file as it was. Remote paths (``s3://``...) keep Lightning's way.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)
