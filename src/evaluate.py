"""lm-evaluation-harness on a checkpoint or an export: ``python -m src.evaluate ckpt_path=... | export_dir=...``.

A checkpoint is restored as ``src.export`` restores it (compressed structure, LoRA adapters); an export
folder loads with ``src.export.exported.load_exported``. The tasks are checked first (a Hub task offline
is refused in one sentence, before any model loads). The metrics (``eval/<task>/<metric>``, see
``src.evaluation``) are written to ``eval.json`` beside the checkpoint's run folder or in the export
folder and, for a checkpoint in its run folder, merged into that run's ``results.json``, which
``src.report`` reads.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from src.builders import read_checkpoint, restore_module
from src.evaluation import check_lm_eval, check_positions, lm_eval
from src.export.exported import load_exported
from src.models.build import load_hf_config, load_tokenizer
from src.utils.config import refusing, run_app
from src.utils.errors import ConfigError
from src.utils.io import write_json

log = logging.getLogger(__name__)


def _load(ckpt_path: str | None, export_dir: str | None, check: Callable[[PretrainedConfig, str], None]) -> tuple[Any, Any, Path]:
    """The model, its tokenizer and the folder the results go to; ``check(config, model)`` sees the model's config
    before its weights load."""
    if (ckpt_path is None) == (export_dir is None):
        raise ConfigError("give ckpt_path=<checkpoint> or export_dir=<folder written by src.export>, one of them.")
    if export_dir is not None:
        folder = Path(export_dir)
        meta = folder / "export.json"
        if not meta.is_file():
            raise ConfigError(f"export_dir={export_dir!r} is not a folder written by src.export (no export.json).")
        info = json.loads(meta.read_text())
        if info.get("kind") == "classification" or "hf" not in info.get("formats", []):
            raise ConfigError(f"export_dir={export_dir!r} holds no Hugging Face language model (a classifier, or ONNX/GGUF only): "
                              "lm-evaluation-harness scores a language model's weights.")
        check(AutoConfig.from_pretrained(folder), f"export_dir={export_dir!r}")
        return load_exported(folder, AutoModelForCausalLM), AutoTokenizer.from_pretrained(folder), folder
    path = Path(ckpt_path)
    ckpt = read_checkpoint(path)
    hp = ckpt["hyper_parameters"]
    if hp["task"]["kind"] == "classification":
        raise ConfigError(f"ckpt_path={ckpt_path!r} is a classifier ({hp['model']['name']} on {hp['task']['name']}): lm-evaluation-harness "
                          "scores language models; its test/acc is the task's own evaluation (src.train train=false).")
    check(load_hf_config(hp["model"]), f"model={hp['model']['name']}")
    module = restore_module(ckpt)
    return module.model.eval(), load_tokenizer(hp["model"]), path.parent.parent  # <run>/checkpoints/x.ckpt -> <run>


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Check the tasks, load the model, run lm-eval, write the metrics; returns them."""
    e = cfg.lm_eval
    check_lm_eval(list(e.tasks), list(e.seq_lens), e.limit, e.batch_size)
    model, tokenizer, folder = _load(cfg.ckpt_path, cfg.export_dir, partial(check_positions, list(e.tasks), list(e.seq_lens)))
    metrics = lm_eval(model, tokenizer, list(e.tasks), list(e.seq_lens), e.limit, e.batch_size)
    source = {"ckpt_path": cfg.ckpt_path, "export_dir": cfg.export_dir, "lm_eval": OmegaConf.to_container(e)}
    write_json(folder / "eval.json", {**source, "metrics": metrics})
    results = folder / "results.json"
    if cfg.ckpt_path and results.is_file():  # the run's record: src.report's tables read it
        record = json.loads(results.read_text())
        record["metrics"] = {**record.get("metrics", {}), **metrics}
        write_json(results, record)
    log.info("lm-eval metrics written to %s: %s", folder / "eval.json", {k: round(v, 4) for k, v in metrics.items()})
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    refusing(evaluate, cfg, interrupted="src.evaluate stopped before writing its metrics; eval.json and results.json are as they were")


if __name__ == "__main__":
    run_app(main)
