"""Export a fine-tuned (compressed) checkpoint: ``python -m src.export ckpt_path=... out=DIR [format=hf|onnx|both|gguf]``.

``hf``: a Hugging Face folder (count scales folded; a stock model when the MLP widths are uniform,
else the recorded structure and ``load_exported``). ``onnx``: ``model.onnx`` with dynamic batch and
sequence axes, from the folded model, any per-layer widths (causal LMs: logits without a KV
cache); the export checks itself against PyTorch with ONNX Runtime. Encoder-decoder models get no
ONNX export (``exported.onnx_unsupported``): ``format=onnx`` is refused, ``both`` writes ``hf`` and
says, in the log and the card, why ONNX was skipped. ``gguf``: ``model.gguf`` for llama.cpp
(``gguf_dtype`` f32|f16|bf16|q8_0, either case; ``src.export.to_gguf``: Llama-family causal LMs, per-layer widths as
llama.cpp's ``deci`` architecture; anything else is refused before writing). Every format writes the tokenizer, a model
card (``README.md``, which names the loader) and ``export.json``, which marks the folder as an
export, so that a later export may replace it; any other existing folder is refused unless
``overwrite=true``. The folder is written beside ``out`` and renamed: an interrupted export leaves
no half folder (SIGTERM or Ctrl-C: its temporary folder removed, one line saying so, exit code 128 +
the signal's number), and the temporary folder of a killed one (SIGKILL, the OOM killer) is removed
by the next export to ``out``.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from src.builders import read_checkpoint, restore_module
from src.export.exported import export_onnx, onnx_unsupported, prepare_for_export
from src.export.to_gguf import DTYPES, gguf_unsupported, write_gguf
from src.models import mlp_io
from src.models.build import HEADS, load_tokenizer
from src.modules.kinds import task_classes
from src.modules.lora import merge
from src.pipeline.fuse import count_params
from src.utils.config import refusing
from src.utils.errors import ConfigError
from src.utils.io import atomic_dir

log = logging.getLogger(__name__)

FORMATS = ("hf", "onnx", "both", "gguf")
MARKER = "export.json"
# real inputs for the ONNX self-check (and the card's example)
SAMPLES = ["a gripping, beautifully acted film", "the plot is thin and the jokes fall flat, but the cast tries hard"]


def check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not (out.is_dir() and ((out / MARKER).is_file() or not any(out.iterdir()))) and not overwrite:
        raise ConfigError(f"out={str(out)!r} exists and is not an earlier export (no {MARKER}): choose another folder, or overwrite=true to replace it.")


def _remove_leftovers(dest: Path) -> None:
    """Remove the temporary folders a killed export to ``dest`` left beside it (``atomic_dir``'s, whose cleanup a
    SIGKILL skips). A concurrent export to the same folder would lose its own; two exports to one folder replace
    each other anyway."""
    leftover = re.compile(rf"\.{re.escape(dest.name)}\.[^.]+\.(tmp|old)")  # .<name>.<random>.tmp|old, not another folder's
    for p in dest.parent.iterdir() if dest.parent.is_dir() else ():
        if p.is_dir() and leftover.fullmatch(p.name):
            log.warning("removing %s, left by an interrupted export", p)
            shutil.rmtree(p, ignore_errors=True)


def _loading(meta: dict[str, Any]) -> str:
    """The card's line on the Hugging Face weights: which loader applies."""
    widths, auto = meta["stock_widths"], meta["auto_class"]
    if "hf" not in meta["formats"]:
        return "- Hugging Face weights: not exported"
    if widths:
        sets = ", ".join(f"`{k}={v}`" for k, v in widths.items())
        return f"- Hugging Face weights: a stock model (config.json sets {sets}); load with `{auto}.from_pretrained(folder)`"
    return ("- Hugging Face weights: not a stock model's MLPs (per-layer widths, factors or biases the stock model lacks, recorded "
            f"under `mlp_fusion` in config.json); load with `src.export.exported.load_exported(folder, {auto})`, not plain `from_pretrained`")


def _onnx_line(meta: dict[str, Any]) -> str:
    """The card's line on ``model.onnx``, or why there is none."""
    if meta["onnx_skipped"]:
        return f"- ONNX: skipped; {meta['onnx_skipped']}"
    if "onnx" not in meta["formats"]:
        return "- ONNX: not exported"
    inputs = ", ".join(f"`{n}`" for n in meta["onnx_inputs"])
    cache = "; no KV cache (each call recomputes the whole sequence)" if meta["kind"] == "generation" else ""
    return (f"- ONNX: `model.onnx`, inputs {inputs}, output `logits`, dynamic batch and sequence axes{cache}; "
            f"ONNX Runtime matches PyTorch to a relative error of {meta['onnx_rel_err']:.1e}")


def _gguf_line(meta: dict[str, Any]) -> str:
    """The card's line on ``model.gguf``: which runtimes load it, and how."""
    if "gguf" not in meta["formats"]:
        return "- GGUF: not exported"
    arch = meta["gguf_arch"]
    why = " (llama.cpp's architecture with a width per block: these layers' widths differ)" if arch == "deci" else ""
    fallback = f"; f16 where q8_0 cannot (input width not a multiple of 32): {', '.join(meta['gguf_f16_fallbacks'])}" if meta["gguf_f16_fallbacks"] else ""
    return (f"- GGUF: `model.gguf`, llama.cpp architecture `{arch}`{why}, {meta['gguf_dtype']}{fallback}, with the tokenizer and chat template; "
            "run it with llama.cpp (`llama-cli -m model.gguf -p \"...\"`, `llama-server -m model.gguf`) or llama-cpp-python "
            "(`Llama(model_path=\"model.gguf\")`)")


def _card(meta: dict[str, Any]) -> str:
    metrics = "\n".join(f"| `{k}` | {v:.4f} |" for k, v in sorted(meta["metrics"].items()) if k.startswith(("test/", "best/", "val/")))
    return "\n".join([
        *([f"# {meta['model']} fine-tuned on {meta['task']}, MLPs compressed with {meta['method']}", "",
           f"Exported by mlp-fusion's `src.export` from `{meta['ckpt']}`.", ""] if meta.get("ckpt") else
          [f"# {meta['model']}, MLPs compressed with {meta['method']} (no fine-tuning)", "",
           f"Written by mlp-fusion's `src.compress`, calibrated on {meta['task']} where the method uses data.", ""]),
        f"- compression: `ffn_mode={meta['method']}`, layers {meta['layers']}, widths {meta['widths']}",
        f"- parameters: {meta['params']:,} (count scales folded into the down projections; same outputs)",
        _loading(meta),
        _onnx_line(meta),
        _gguf_line(meta),
        "", "| metric (the run's) | value |", "|---|---|", metrics or "| (no results.json beside the checkpoint) | |", ""])


def export(ckpt_path: str, out: str, fmt: str = "both", overwrite: bool = False, gguf_dtype: str = "f16") -> Path:
    """Rebuild the checkpoint's model (structure from ``checkpoint["fusion"]``), fold scales, write ``fmt``."""
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt!r} is not an export format; allowed: {list(FORMATS)}.")
    if str(gguf_dtype).lower() not in DTYPES:
        raise ConfigError(f"gguf_dtype={gguf_dtype!r} is not a GGUF weight type this export writes; allowed: {list(DTYPES)}.")
    gguf_dtype = str(gguf_dtype).lower()  # llama.cpp writes the types upper case (F16, Q8_0): either case is meant
    path, dest = Path(ckpt_path), Path(out)
    ckpt = read_checkpoint(path)
    check_out(dest, overwrite)
    hp = ckpt["hyper_parameters"]
    _, _, module_cls = task_classes(hp["task"]["kind"])
    if fmt == "gguf" and module_cls.head != "generation":
        raise ConfigError(f"format=gguf is refused for model={hp['model']['name']}: llama.cpp runs causal LMs, and this is a "
                          f"{module_cls.head} model; export it with format=hf or onnx.")
    skipped = None if fmt in ("hf", "gguf") else onnx_unsupported(module_cls.head)
    if skipped and fmt == "onnx":
        raise ConfigError(f"format=onnx is refused for model={hp['model']['name']}: {skipped}; export it with format=hf.")
    model = restore_module(ckpt).model.eval()
    merge(model)  # finetune=lora: the adapters into the weights
    widths = prepare_for_export(model)
    tokenizer = load_tokenizer(hp["model"])
    if fmt == "gguf" and (reason := gguf_unsupported(model, tokenizer)):
        raise ConfigError(f"format=gguf is refused for model={hp['model']['name']}: {reason}; export it with format=hf or onnx.")
    fusion = ckpt.get("fusion") or {}
    results = path.parent.parent / "results.json"  # the run folder's, when the checkpoint is still in it
    meta: dict[str, Any] = {
        "ckpt": str(path), "model": hp["model"]["name"], "task": hp["task"]["name"], "kind": hp["task"]["kind"],
        "method": fusion.get("method", "none"), "layers": fusion.get("layers", []), "widths": mlp_io.intermediate_sizes(model),
        "params": count_params(model), "stock_widths": widths, "auto_class": HEADS[module_cls.head].__name__,
        "formats": ["hf"] if skipped else ["hf", "onnx"] if fmt == "both" else [fmt], "onnx_skipped": skipped,
        "metrics": json.loads(results.read_text()).get("metrics", {}) if results.is_file() else {},
    }
    write_folder(model, tokenizer, dest, meta, widths, gguf_dtype)
    log.info("exported %s to %s (%s)%s", path, dest, "+".join(meta["formats"]),
             "" if widths else "; not a stock model: load with src.export.exported.load_exported")
    return dest


def write_folder(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, dest: Path, meta: dict[str, Any], widths: dict[str, int] | None,
                 gguf_dtype: str = "f16") -> None:
    """Write the prepared (``prepare_for_export``) ``model`` in ``meta["formats"]`` with its tokenizer, card and
    ``export.json`` into ``dest``, atomically (the folder written beside it and renamed)."""
    _remove_leftovers(dest)
    with atomic_dir(dest, overwrite=True) as tmp:
        if "hf" in meta["formats"]:
            # a stock model keeps transformers' original checkpoint names (any loader reads it); one with a
            # recorded structure keeps the module tree's names, which load_exported loads into that structure
            # (transformers 5 renames MoE experts on save: experts.gate_up_proj -> experts.0.w1 ...)
            model.save_pretrained(tmp, save_original_format=widths is not None)
        tokenizer.save_pretrained(tmp)
        if "gguf" in meta["formats"]:
            meta |= write_gguf(model, tokenizer, tmp, tmp / "model.gguf", gguf_dtype)
        if "onnx" in meta["formats"]:
            samples = dict(tokenizer(SAMPLES, padding=True, return_tensors="pt"))
            meta["onnx_inputs"], meta["onnx_rel_err"] = export_onnx(model, tmp / "model.onnx", samples)
        write_card(tmp, meta)
    if meta.get("onnx_skipped"):
        log.warning("ONNX skipped: %s; format=both wrote the Hugging Face folder only", meta["onnx_skipped"])


def write_card(folder: Path, meta: dict[str, Any]) -> None:
    """The model card (``README.md``) and ``export.json``, which marks ``folder`` as an export."""
    (folder / "README.md").write_text(_card(meta))
    (folder / MARKER).write_text(json.dumps(meta, indent=2, default=str) + "\n")


def _export(cfg: DictConfig) -> None:
    export(cfg.ckpt_path, cfg.out, cfg.format, cfg.overwrite, cfg.gguf_dtype)


@hydra.main(version_base="1.3", config_path="../../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    refusing(_export, cfg, interrupted=f"the export to {cfg.out} stopped: nothing was written there (an earlier export in it is kept) "
                                       "and its temporary folder was removed")


if __name__ == "__main__":
    main()
