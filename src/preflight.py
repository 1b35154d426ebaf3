"""The preflight: every cheap check, before any model weights load or any heavy work starts.

``preflight`` checks every setting and input and returns what the builders take (``Checked``): the
task as the model runs it (``run_task``) and the run's compression settings
(``CompressionSettings.from_config``: ``ffn_mode`` resolved against the model's shape and checked), beside
the config, which it leaves as composed (but for ``trainer=auto``'s accelerator and precision, which
``resolve_trainer`` fills first). Each check raises ConfigError with one sentence naming the setting,
its value and what is allowed. Unknown group options (``task=foo``) are refused earlier by Hydra, which
lists the valid ones.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any, NamedTuple

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from transformers import PretrainedConfig

from src.evaluation import check_lm_eval, check_positions
from src.methods.method import Method
from src.models import mlp_io
from src.models.build import DTYPES, HEADS, load_hf_config, max_positions, task_kind
from src.modules.base import FINETUNES
from src.modules.kinds import task_classes
from src.modules.lora import targets
from src.modules.optim import SCHEDULES
from src.pipeline.settings import CompressionSettings
from src.utils.checkpoint_io import read_torch_file
from src.utils.errors import ConfigError
from src.utils.hardware import resolve_trainer

log = logging.getLogger(__name__)


class Checked(NamedTuple):
    """What the preflight read, resolved and checked, and the builders take: the model's transformers config, the
    task as this model runs it (``run_task``), its validated data splits and the run's compression settings (None
    for ``ffn_mode=none``)."""

    hf: PretrainedConfig
    task: DictConfig
    splits: dict[str, Any]
    compression: CompressionSettings | None


def preflight(cfg: DictConfig) -> Checked:
    """Check settings, model files, compression options and data, in that order, resolving the task and the
    compression settings on the way; the config's own values stay as composed."""
    check_run_settings(cfg)
    resolve_trainer(cfg)
    hf = load_hf_config(cfg.model)
    check_architecture(cfg, hf)
    task = run_task(cfg, hf)
    compression = compression_settings(cfg, hf)
    check_finetune(cfg, hf, task.kind)
    check_approx_metrics(cfg, hf, compression)
    if cfg.lm_eval.enabled:
        check_positions(cfg.lm_eval.tasks, cfg.lm_eval.seq_lens, hf, f"model={cfg.model.name}")
    if "check" in cfg.distill:
        instantiate(cfg.distill.check)(cfg, hf)
    load_splits, _, _ = task_classes(task.kind)
    return Checked(hf, task, load_splits(task), compression)


def _positive(value: Any, setting: str) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ConfigError(f"{setting}={value!r} must be a positive integer.")


def _require(ok: bool, setting: str, value: Any, allowed: str) -> None:
    if not ok:
        shown = "null" if value is None else repr(list(value) if OmegaConf.is_list(value) else value)
        raise ConfigError(f"{setting}={shown} must be {allowed}.")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_run_settings(cfg: DictConfig) -> None:
    """The ranges of the run's settings, ``optim`` and ``trainer`` that their types (``src/utils/schema.py``,
    checked by Hydra while composing) cannot say, then batch sizes, sequence length, sample limits."""
    _require(0 <= cfg.seed < 2**32, "seed", cfg.seed, f"in 0..{2**32 - 1}")
    o = cfg.optim
    # 0 is allowed: a step that changes nothing (tests/unit/data/test_generation.py compares metrics around one)
    _require(_number(o.lr) and o.lr >= 0, "optim.lr", o.lr, "a number >= 0, e.g. 1e-4 (0: the steps change no weight)")
    _require(_number(o.weight_decay) and o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "a number >= 0 (0: no weight decay)")
    _require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", o.betas, "two numbers in [0, 1), e.g. [0.9, 0.98]")
    _require(_number(o.eps) and o.eps > 0, "optim.eps", o.eps, "a positive number, e.g. 1e-6")
    _require(0 <= o.warmup_ratio < 1, "optim.warmup_ratio", o.warmup_ratio, "a fraction of the training steps in [0, 1), e.g. 0.06")
    _require(o.schedule in SCHEDULES, "optim.schedule", o.schedule, " or ".join(SCHEDULES))
    _require(_number(o.power) and o.power >= 0, "optim.power", o.power, "a number >= 0 (1.0 decays linearly, 0 keeps the rate after the warm-up)")
    f = cfg.finetune
    _require(f.name in FINETUNES, "finetune", f.name, f"{' or '.join(FINETUNES)} (conf/finetune)")
    if f.name == "lora":
        _require(isinstance(f.rank, int) and f.rank >= 1, "finetune.rank", f.rank, "an integer >= 1, e.g. 16")
        _require(_number(f.alpha) and f.alpha > 0, "finetune.alpha", f.alpha, "a number > 0, e.g. 32 (the update is scaled by alpha / rank)")
        _require(_number(f.dropout) and 0 <= f.dropout < 1, "finetune.dropout", f.dropout, "a fraction in [0, 1), e.g. 0.05")
        _require(bool(f.target_modules), "finetune.target_modules", f.target_modules, "a non-empty list of Linear names, e.g. [q_proj, v_proj]")
    if cfg.lm_eval.enabled:
        if cfg.task.kind == "classification":
            raise ConfigError(f"lm_eval.enabled=true is refused for task={cfg.task.name}: lm-evaluation-harness scores language models, "
                              "and this run trains a classifier (its test/acc is the task's own evaluation).")
        e = cfg.lm_eval
        check_lm_eval(e.tasks, e.seq_lens, e.limit, e.batch_size)
    dtype = cfg.model.get("dtype")
    _require(dtype is None or dtype in DTYPES, "model.dtype", dtype, f"one of {', '.join(DTYPES)} (the loaded weights' torch dtype)")
    check_trainer_settings(cfg)
    for key in ("max_seq_length", "batch_size", "eval_batch_size", "max_train_samples", "max_eval_samples"):
        _positive(cfg.task.get(key), f"task.{key}")


def check_trainer_settings(cfg: DictConfig) -> None:
    """``trainer``: how long training runs (and that it runs at all, and ends, where ``train=true``), clipping,
    logging, batch limits, validation interval, accumulation, devices."""
    t = cfg.trainer
    _require(t.max_epochs is None or t.max_epochs >= -1, "trainer.max_epochs", t.max_epochs,
             "a number of epochs >= 1, -1 (no limit: trainer.max_steps ends training) or null (Lightning's default)")
    _require(t.max_steps >= -1, "trainer.max_steps", t.max_steps, "a number of optimizer steps >= 1, or -1 (no limit: trainer.max_epochs ends training)")
    for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches"):
        v = t[key]
        _require(v is None or (isinstance(v, int) and v >= 0) or (isinstance(v, float) and 0 <= v <= 1), f"trainer.{key}", v,
                 "null (all batches), a number of batches >= 0 or a fraction of them in [0, 1]")
    if cfg.train:
        zeros = [f"trainer.{k}={t[k]}" for k in ("max_epochs", "max_steps", "limit_train_batches") if t[k] == 0]
        if zeros:
            raise ConfigError(f"{' and '.join(zeros)} {'train' if len(zeros) > 1 else 'trains'} no step: "
                              f"raise {'them' if len(zeros) > 1 else 'it'}, or set train=false to evaluate without training.")
        if t.max_epochs == -1 and t.max_steps == -1:
            raise ConfigError("trainer.max_epochs=-1 and trainer.max_steps=-1 never end training: limit one of them, e.g. trainer.max_epochs=3.")
    clip = t.gradient_clip_val
    _require(clip is None or (_number(clip) and clip >= 0), "trainer.gradient_clip_val", clip, "null or a number >= 0 (null or 0: no clipping)")
    _require(t.log_every_n_steps >= 1, "trainer.log_every_n_steps", t.log_every_n_steps, "a positive integer")
    _require(t.num_sanity_val_steps >= -1, "trainer.num_sanity_val_steps", t.num_sanity_val_steps, "a number of batches >= 0, or -1 (all)")
    v = t.val_check_interval
    _require(v is None or (isinstance(v, int) and v >= 1) or (isinstance(v, float) and 0 < v <= 1), "trainer.val_check_interval", v,
             "null (once an epoch), a number of training batches >= 1 or a fraction of an epoch in (0, 1]")
    _require(t.accumulate_grad_batches >= 1, "trainer.accumulate_grad_batches", t.accumulate_grad_batches, "a positive integer")
    d = t.devices
    ok = (isinstance(d, int) and not isinstance(d, bool) and (d == -1 or d >= 1)) \
        or (OmegaConf.is_list(d) and len(d) > 0 and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in d)) \
        or (isinstance(d, str) and re.fullmatch(r"auto|-1|\d+|\d+(,\d+)*,?", d.strip()) is not None and d.strip() != "0")
    _require(ok, "trainer.devices", d, "a number of devices >= 1, -1 (all), a list of device ids or auto")
    _require(t.deterministic in (True, False, None, "warn"), "trainer.deterministic", t.deterministic, "true, false or warn")


def run_task(cfg: DictConfig, hf: PretrainedConfig) -> DictConfig:
    """The task as the model ``hf`` describes runs it, a new config (``cfg.task`` stays as composed): ``kind``
    (seq2seq on an encoder-decoder model, whatever the task: ``build.task_kind``) and, where the task declares it,
    ``model_max_positions`` (generation tasks cut their sequences to fit it)."""
    kind = task_kind(cfg.task.kind, hf)
    if kind != cfg.task.kind:
        log.info("model=%s is an encoder-decoder model: task=%s runs as the %s kind (text-to-text)", cfg.model.name, cfg.task.name, kind)
    positions = {"model_max_positions": max_positions(hf)} if "model_max_positions" in cfg.task else {}
    return OmegaConf.merge(OmegaConf.to_container(cfg.task, resolve=True), {"kind": kind, **positions})


def compression_settings(cfg: DictConfig, hf: PretrainedConfig) -> CompressionSettings | None:
    """The run's compression settings (None for ``ffn_mode=none``): ``cfg.ffn_mode`` resolved against the shape of the
    model ``hf`` describes and checked, by ``CompressionSettings.from_config``; the config is left as it is."""
    f = cfg.ffn_mode
    if f.name == "none":
        return None
    method = Method.of(instantiate(f.compress, _convert_="all"), f.name)
    options = OmegaConf.to_container(f, resolve=True)
    return CompressionSettings.from_config(options, method, mlp_io.model_shape(hf), cfg.model.fusion_defaults, cfg.model.name)


def check_finetune(cfg: DictConfig, hf: PretrainedConfig, kind: str) -> None:
    """``finetune=lora``: ``target_modules`` names a Linear of the model, read from its skeleton (built on the meta
    device: no memory, no weights, with the head of the task's ``kind``), as ``add_lora`` would after compression."""
    f = cfg.finetune
    if f.name != "lora":
        return
    _, _, module_cls = task_classes(kind)
    try:
        with torch.device("meta"):
            skeleton = HEADS[module_cls.head].from_config(hf, trust_remote_code=bool(cfg.model.get("trust_remote_code")))
    except Exception:  # noqa: BLE001  (a skeleton that cannot be built here: add_lora still refuses the names after loading)
        return
    if targets(skeleton, list(f.target_modules)) or (f.get("experts") and mlp_io.fused_expert_weights(skeleton)):
        return
    parts = {name.rsplit(".", 1)[-1] for name, _ in skeleton.named_modules()}
    linear = sorted({name.rsplit(".", 1)[-1] for name in targets(skeleton, list(parts))})
    raise ConfigError(f"finetune.target_modules={list(f.target_modules)} names no Linear module of model={cfg.model.name}, whose "
                      f"Linear modules are named {', '.join(linear)}.")


def check_approx_metrics(cfg: DictConfig, hf: PretrainedConfig, compression: CompressionSettings | None) -> None:
    """The probe set's size, and a memory budget that holds the original's copied MLPs (those ``compression``
    compresses) and at least one layer's per-sample gradients."""
    m = cfg.approx_metrics
    if compression is None or not m.enabled:
        return
    _positive(m.probe_size, "approx_metrics.probe_size")
    _positive(m.chunk_size, "approx_metrics.chunk_size")
    per_layer = mlp_io.mlp_param_count(hf) * 4  # float32 bytes of one layer's MLP
    n_layers = len(compression.layers)
    copy, need = n_layers * per_layer, m.probe_size * per_layer  # the copy; one layer's per-sample gradients
    if not isinstance(m.max_memory_gb, (int, float)) or m.max_memory_gb * 2**30 < copy + need:
        raise ConfigError(
            f"approx_metrics.max_memory_gb={m.max_memory_gb!r} cannot hold the per-sample gradients of one layer's MLP "
            f"({m.probe_size} probe samples x {mlp_io.mlp_param_count(hf):,} parameters x 4 bytes = {need / 2**30:.2f} GB) "
            f"and the original's copy of the {n_layers} compressed MLPs ({copy / 2**30:.2f} GB): "
            "raise it, lower approx_metrics.probe_size, or set approx_metrics.enabled=false."
        )


def check_architecture(cfg: DictConfig, hf: PretrainedConfig) -> None:
    """Compression and distillation need an MLP layout we know."""
    if cfg.ffn_mode.name == "none" and cfg.distill.name == "none":
        return
    try:
        mlp_io.family_of(hf)
    except ValueError as e:
        raise ConfigError(f"model={cfg.model.name}: {e}") from None


def resolve_ckpt_path(cfg: DictConfig, compression: CompressionSettings | None) -> str | None:
    """``last`` means <run dir>/checkpoints/last.ckpt; a path must exist and match model, task and the run's
    ``compression`` (the preflight's)."""
    if cfg.ckpt_path is None:
        return None
    path = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt" if cfg.ckpt_path == "last" else Path(cfg.ckpt_path)
    if not path.is_file():
        hint = " (ckpt_path=last resumes the run in hydra.run.dir=<its folder>)" if cfg.ckpt_path == "last" else ""
        raise ConfigError(f"ckpt_path={cfg.ckpt_path!r}: no checkpoint file at {path}{hint}.")
    ckpt = read_torch_file(path, mmap=True)
    hp = ckpt.get("hyper_parameters", {})
    if hp.get("model", {}).get("name") != cfg.model.name or hp.get("task", {}).get("name") != cfg.task.name:
        raise ConfigError(
            f"ckpt_path={str(path)!r} belongs to model={hp.get('model', {}).get('name')} task={hp.get('task', {}).get('name')}, "
            f"not model={cfg.model.name} task={cfg.task.name}."
        )
    fusion = ckpt.get("fusion") or None  # written by the fusion callback
    if (fusion is None) != (compression is None) or (fusion and not compression.matches(fusion)):
        got = f"ffn_mode={fusion['method']} layers={fusion['layers']} mid_dim={fusion['mid_dim']}" if fusion else "ffn_mode=none"
        now = f"ffn_mode={cfg.ffn_mode.name}" + (f" layers={list(compression.layers)} mid_dim={compression.mid_dim}" if compression else "")
        raise ConfigError(f"ckpt_path={str(path)!r} was compressed with {got}, but this run asks for {now}.")
    return str(path)
