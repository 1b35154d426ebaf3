"""How a training run writes its Lightning checkpoints, and how the entry points read one (``read_torch_file``)."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from src.utils.errors import ConfigError
from src.utils.io import atomic_path


def read_torch_file(path: Path, setting: str = "ckpt_path", **load_kwargs: Any) -> Any:
    """``torch.load`` of ``path`` (weights only, on the CPU); ConfigError in one sentence naming ``setting`` where the
    file is not a whole checkpoint (torch's own message runs to a paragraph on its zip reader)."""
    # torch.save writes a zip archive, whose directory comes last: a truncated file has none
    if not zipfile.is_zipfile(path):
        raise ConfigError(f"{setting}={str(path)!r} is not a whole checkpoint file: it is truncated (an interrupted copy or "
                          "save) or was not written by torch.save.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, **load_kwargs)
    except Exception as e:  # noqa: BLE001  (whatever torch raises, the file cannot be read)
        first = str(e).strip().splitlines()[0].split(". ")[0].rstrip(".") if str(e).strip() else type(e).__name__
        raise ConfigError(f"{setting}={str(path)!r} is not a readable checkpoint ({first}).") from None


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
