"""Export a fine-tuned (compressed) checkpoint as a Hugging Face folder: ``python -m src.export ckpt_path=... out=DIR``."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from src.builders import task_classes
from src.models.build import load_tokenizer
from src.models.exported import prepare_for_export
from src.models.fuse import apply_spec
from src.utils.errors import ConfigError
from src.utils.io import atomic_dir

log = logging.getLogger(__name__)


def export(ckpt_path: str, out: str) -> Path:
    """Rebuild the checkpoint's model (structure from ``checkpoint["fusion"]``), fold scales, save with tokenizer."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise ConfigError(f"ckpt_path={ckpt_path!r} is not a file.")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    hp = ckpt.get("hyper_parameters", {})
    if "model" not in hp or "task" not in hp:
        raise ConfigError(f"ckpt_path={ckpt_path!r} is not a checkpoint of this project (no model/task hyper-parameters).")
    _, _, module_cls = task_classes(hp["task"]["kind"])
    module = module_cls(hp["model"], hp["task"], hp["optim"])  # builds the pretrained architecture
    if ckpt.get("fusion"):
        apply_spec(module.model, ckpt["fusion"])
    module.load_state_dict(ckpt["state_dict"])
    model = module.model.eval()
    prepare_for_export(model)
    dest = Path(out)
    with atomic_dir(dest, overwrite=True) as tmp:  # an interrupted export never leaves a half folder at `out`
        model.save_pretrained(tmp)
        load_tokenizer(hp["model"]).save_pretrained(tmp)
    log.info("exported %s to %s%s", path, dest, " (per-layer widths in config.json: load with src.models.exported.load_exported)" if hasattr(model.config, "mlp_fusion") else "")
    return dest


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    try:
        export(cfg.ckpt_path, cfg.out)
    except ConfigError as e:
        log.error("%s", e)
        sys.exit(2)


if __name__ == "__main__":
    main()
