"""Compression alone, no fine-tuning: ``python -m src.compress [model=...] [ffn_mode=...] out=<folder>``.

The model's MLPs are compressed as ``src.train``'s fusion callback does (``Compressor``: every ``ffn_mode``
option, the task's calibration sample, the cache) and written as ``src.export`` writes a folder (``format``:
hf, onnx, both or gguf, with tokenizer, card and ``export.json``), so ``src.train model.name_or_path=<out>``
continues from it and ``src.evaluate export_dir=<out>`` scores it. With ``stream=true`` (and with
``stream=auto`` when the model would not fit ``memory_gb``) the model is never whole in memory: it is read,
compressed and written one block at a time (``src.pipeline.stream``), as a Hugging Face folder or a GGUF file
(read back from the streamed folder one block at a time); not ONNX, whose export traces the whole model.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import hydra
import psutil
import torch
from omegaconf import DictConfig
from transformers import AutoModelForCausalLM, PreTrainedModel

from src.builders import build_datamodule
from src.export.__main__ import FORMATS, check_out, write_card, write_folder
from src.export.exported import prepare_for_export
from src.export.to_gguf import DTYPES, gguf_unsupported, write_gguf
from src.models import gguf, mlp_io
from src.models.build import build_model, load_hf_config, load_tokenizer
from src.models.shards import INDEX, ShardReader, shard_map, skeleton
from src.models.source import model_identity, resolve_source
from src.modules.kinds import task_classes
from src.pipeline.calibration import Calibrator
from src.pipeline.fuse import FusionReport, compress_model, count_params
from src.pipeline.settings import CompressionSettings
from src.pipeline.stream import compress_streamed, memory_model
from src.preflight import Checked, check_architecture, compression_settings, run_task
from src.utils.config import refusing
from src.utils.errors import ConfigError

log = logging.getLogger(__name__)

STREAM = ("auto", True, False)
STREAMED_FORMATS = ("hf", "gguf")  # gguf: written block by block from the streamed folder (to_gguf's reader)
DEVICES = ("cpu", "cuda")


def check(cfg: DictConfig) -> Checked:
    """Every cheap check before weights load: the command's own settings, the model, the task, the compression."""
    if cfg.format not in FORMATS:
        raise ConfigError(f"format={cfg.format!r} is not an output format; allowed: {list(FORMATS)}.")
    if str(cfg.gguf_dtype).lower() not in DTYPES:
        raise ConfigError(f"gguf_dtype={cfg.gguf_dtype!r} is not a GGUF weight type; allowed: {list(DTYPES)}.")
    if cfg.stream not in STREAM:
        raise ConfigError(f"stream={cfg.stream!r} must be auto, true or false.")
    if cfg.device not in DEVICES or (cfg.device == "cuda" and not torch.cuda.is_available()):
        raise ConfigError(f"device={cfg.device!r} must be cpu or cuda (cuda where a GPU is visible).")
    if cfg.stream is True and cfg.format not in STREAMED_FORMATS:
        raise ConfigError(f"stream=true writes format=hf or gguf, not {cfg.format}: ONNX export traces the whole model in memory; "
                          "run with format=hf, then export the folder to ONNX where it fits memory.")
    if cfg.stream is True and cfg.model.get("config") is not None:
        raise ConfigError(f"stream=true: model={cfg.model.name} is built from model.config with random weights, so there is no folder "
                          "of weights to stream; run with stream=false.")
    check_out(Path(cfg.out), cfg.overwrite)
    if cfg.stream is True and gguf.cache_folder(cfg.model) is None:  # a folder's weights: safetensors, every shard there
        src, _ = resolve_source(cfg.model)
        if Path(src).is_dir():
            shard_map(Path(src))
    if cfg.ffn_mode.name == "none":
        raise ConfigError("ffn_mode=none: src.compress has nothing to do; choose a method (ffn_mode=wanda_sp, ...).")
    hf = load_hf_config(cfg.model)
    check_architecture(cfg, hf)
    task = run_task(cfg, hf)
    _, _, module_cls = task_classes(task.kind)
    if module_cls.head != "generation":
        raise ConfigError(f"model={cfg.model.name} with task={cfg.task.name} is a {module_cls.head} model: src.compress writes causal language "
                          "models (compression without fine-tuning); compress other models in src.train, which trains their head.")
    load_splits, _, _ = task_classes(task.kind)
    compression = compression_settings(cfg, hf)
    check_room(Path(cfg.out), output_bytes(hf, compression, cfg.format, str(cfg.gguf_dtype).lower()))
    return Checked(hf, task, load_splits(task), compression)


# bytes a parameter takes in each written format (hf: float32, or the stored dtype when streamed: float32 bounds both)
BYTES = {"f32": 4, "f16": 2, "bf16": 2, "q8_0": 34 / 32}


def output_bytes(hf: Any, s: CompressionSettings, fmt: str, gguf_dtype: str) -> int:
    """The written model's size, known before any weight loads: the parameters left after removing each chosen layer's
    share of its MLP (width mid_dim of the pretrained width), in each format written."""
    model = skeleton(AutoModelForCausalLM, hf)
    params = sum(t.numel() for t in model.parameters())
    kept = s.mid_dim / mlp_io.config_width(hf)
    params -= round(len(s.layers) * mlp_io.mlp_param_count(hf) * (1 - kept))
    per_param = {"hf": 4, "onnx": 4, "both": 8, "gguf": BYTES[gguf_dtype]}[fmt]
    return int(params * per_param)


def check_room(out: Path, need: int) -> None:
    """Refuse, before any work, an output folder on a disk without room for the compressed model."""
    where = next(p for p in (out, *out.parents) if p.exists())
    free = shutil.disk_usage(where).free
    if need > free:
        raise ConfigError(f"out={str(out)!r}: the compressed model needs about {need / 1e9:.1f} GB and the disk holding it has "
                          f"{free / 1e9:.1f} GB free; free some room or choose another folder.")


def _local_folder(cfg: DictConfig) -> Path:
    """The model's weights as a local folder of safetensors (a GGUF model's dequantized copy; a Hub model's snapshot)."""
    if gguf.cache_folder(cfg.model) is not None:
        return gguf.dequantize_once(dict(cfg.model))
    src, kwargs = resolve_source(cfg.model)
    if Path(src).is_dir():
        return Path(src)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(src, revision=kwargs.get("revision"), allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))


def _stream_wanted(cfg: DictConfig, hf: Any, calib_tokens: int, s: CompressionSettings) -> bool:
    """``stream`` resolved: auto streams when the whole model in float32 and what compressing it holds would not fit."""
    if cfg.stream != "auto" or cfg.model.get("config") is not None:  # a model built from a config has no folder to stream
        return cfg.stream is True
    model = skeleton(AutoModelForCausalLM, hf)
    whole = sum(t.numel() for t in model.parameters()) * 4
    need = whole + memory_model(model, calib_tokens, calib_tokens, width=s.mid_dim, refit=s.refit == "lstsq")["total"]
    have = cfg.memory_gb * 2**30 if cfg.memory_gb is not None else psutil.virtual_memory().available
    streamed = need > have
    log.info("stream=auto: the model in float32 and its compression need about %.1f GiB, %.1f GiB %s: %s", need / 2**30, have / 2**30,
             "given (memory_gb)" if cfg.memory_gb is not None else "available", "streaming one block at a time" if streamed else "in memory")
    if streamed and cfg.format not in STREAMED_FORMATS:
        raise ConfigError(f"the model does not fit {have / 2**30:.1f} GiB, so it is streamed, which writes format=hf or gguf, not "
                          f"format={cfg.format} (ONNX export traces the whole model): run with format=hf (or stream=false where it fits).")
    return streamed


def compress(cfg: DictConfig) -> Path:
    """Check, compress, write ``cfg.out``; returns it."""
    checked = check(cfg)
    s: CompressionSettings = checked.compression
    tokenizer = load_tokenizer(cfg.model)
    batches = None
    if s.needs_calibration:
        datamodule = build_datamodule(cfg, checked)
        batches = datamodule.calib_batches(s.calib.size, s.calib.seed, s.calib.batch_size, s.calib.source)
    calib_tokens = sum(int(b["attention_mask"].sum()) for b in batches) if batches else 0
    out, device = Path(cfg.out), torch.device(cfg.device)
    meta: dict[str, Any] = {"ckpt": None, "model": cfg.model.name, "task": cfg.task.name, "kind": "generation", "method": s.method.name,
                            "layers": list(s.layers), "auto_class": AutoModelForCausalLM.__name__, "onnx_skipped": None,
                            "formats": ["hf", "onnx"] if cfg.format == "both" else [cfg.format], "metrics": {}}
    start = time.perf_counter()
    if _stream_wanted(cfg, checked.hf, calib_tokens, s):
        if cfg.format == "gguf":  # what can be known before any weight loads: the architecture, the tokenizer, RoPE; room for both
            _refuse_gguf(cfg, skeleton(AutoModelForCausalLM, checked.hf), tokenizer)
            check_room(out, sum(output_bytes(checked.hf, s, fmt, str(cfg.gguf_dtype).lower()) for fmt in STREAMED_FORMATS))

        def finish(tmp: Path, model: PreTrainedModel, report: FusionReport) -> None:
            tokenizer.save_pretrained(tmp)
            meta.update(widths=mlp_io.intermediate_sizes(model), stock_widths=mlp_io.stock_widths(model), params=report.params_after,
                        metrics=report.metrics())
            if cfg.format == "gguf":  # the streamed shards read back block by block into model.gguf, then dropped: the folder as in memory
                _refuse_gguf(cfg, model, tokenizer)
                reader = ShardReader(tmp)
                try:
                    meta.update(write_gguf(model, tokenizer, tmp, tmp / "model.gguf", str(cfg.gguf_dtype).lower(), reader=reader))
                finally:
                    reader.close()  # its shards are removed next
                for f in [*tmp.glob("*.safetensors"), tmp / INDEX, tmp / "config.json"]:
                    f.unlink(missing_ok=True)
            write_card(tmp, meta)

        report = compress_streamed(_local_folder(cfg), AutoModelForCausalLM, s, out, batches=batches, identity=model_identity(cfg.model),
                                   device=device, finish=finish)
    else:
        model = build_model(cfg.model, "generation").eval()
        report = compress_model(model, s, identity=model_identity(cfg.model), device=device,
                                calibrator=Calibrator(batches, sequential=s.calib.sequential) if batches else None)
        widths = prepare_for_export(model)
        if cfg.format == "gguf":
            _refuse_gguf(cfg, model, tokenizer)
        meta.update(widths=mlp_io.intermediate_sizes(model), stock_widths=widths, params=count_params(model), metrics=report.metrics())
        write_folder(model, tokenizer, out, meta, widths, str(cfg.gguf_dtype).lower())
    _log_report(report, time.perf_counter() - start, out)
    return out


def _refuse_gguf(cfg: DictConfig, model: PreTrainedModel, tokenizer: Any) -> None:
    """One sentence where ``model`` cannot be a GGUF file llama.cpp runs."""
    if reason := gguf_unsupported(model, tokenizer):
        raise ConfigError(f"format=gguf is refused for model={cfg.model.name}: {reason}; write it with format=hf or onnx.")


def _log_report(report: FusionReport, seconds: float, out: Path) -> None:
    """The report ``src.train`` logs: parameters before and after, each layer's error, the time."""
    errors = ", ".join(f"{i}: {st['calib_err']:.4f}" for i, st in report.layer_stats.items() if "calib_err" in st)
    log.info("compressed with %s: parameters %d -> %d (%.1f %% removed) in %.0f s%s; written to %s (export.json holds every number)",
             report.spec["method"], report.params_before, report.params_after, 100 * (1 - report.params_after / report.params_before), seconds,
             f"; calibration error by layer {errors}" if errors else "", out)


@hydra.main(version_base="1.3", config_path="../conf", config_name="compress")
def main(cfg: DictConfig) -> None:
    refusing(compress, cfg, interrupted=f"the compression to {cfg.out} stopped: nothing was written to it; a streamed run keeps its "
                                        f"finished blocks in .{Path(cfg.out).name}.partial beside it, and a rerun resumes from them")


if __name__ == "__main__":
    main()
