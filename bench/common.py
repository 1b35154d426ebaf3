"""What the benchmarks share: sizes, the project's configs, real batches, alternating timers, results."""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor, nn
from torch.optim import AdamW, Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.flop_counter import FlopCounterMode
from transformers import get_linear_schedule_with_warmup

import src.utils.config  # noqa: F401  (registers the config resolvers)
from src.data.classification import load_rt_polarity
from src.models.build import load_hf_config, load_tokenizer
from src.builders import build_datamodule
from src.models.fuse import FusionReport, needs_calibration
from src.preflight import preflight, resolve

CONF = str(Path(__file__).resolve().parents[1] / "conf")


# ---------------------------------------------------------------------------------------------
# sizes


@dataclass(frozen=True)
class Sizes:
    """Problem sizes and repetitions of one mode; model, task, optimizer and methods come from conf/."""

    name: str  # "full" | "quick"
    overrides: tuple[str, ...]  # Hydra overrides of conf/train.yaml (model, task sizes)
    layers: tuple[int, ...]  # compressed layers
    mid_dim: int  # compressed width
    big_layer: tuple[int, int, int]  # (h, d, k) of the synthetic roberta-base-sized layer
    probe_size: int  # NTK probe samples
    sklearn_n_init: int  # restarts per timed scikit-learn fit; its n_init=30 time is scaled from them
    fusion_reps: int
    ntk_reps: int
    step_reps: int  # timed training steps per model (fine-tuning cost)
    overhead_steps: int  # Lightning steps, each followed by a bare step (framework overhead)
    # inference speed: (model, head, its (batch, length) cases), compressed with the project's defaults
    inference: tuple[tuple[str, str, tuple[tuple[int, int], ...]], ...]
    inference_reps: int


FULL = Sizes(
    name="full", overrides=("model=minilm",), layers=(2, 3, 4, 5), mid_dim=384, big_layer=(768, 3072, 768),
    probe_size=32, sklearn_n_init=1, fusion_reps=3, ntk_reps=5, step_reps=10, overhead_steps=22,
    inference=(("minilm", "classification", ((1, 64), (32, 64))), ("smollm2", "generation", ((1, 128), (8, 128)))),
    inference_reps=7,
)
QUICK = Sizes(
    name="quick", overrides=("model=tiny_bert", "task.batch_size=8", "task.max_seq_length=32"), layers=(1, 2, 3),
    mid_dim=16, big_layer=(32, 128, 32), probe_size=8, sklearn_n_init=30, fusion_reps=2, ntk_reps=2, step_reps=3,
    overhead_steps=6,
    inference=(("tiny_bert", "classification", ((1, 16), (4, 16))), ("tiny_llama", "generation", ((1, 16), (2, 16)))),
    inference_reps=2,
)


# ---------------------------------------------------------------------------------------------
# configs and data


def compose_config(sizes: Sizes, ffn_mode: str | None = "ntk_cluster", device: torch.device | None = None,
                   output_dir: str = str(Path(tempfile.gettempdir()) / "mlp-fusion-bench"), model: str | None = None,
                   default_fusion: bool = False) -> DictConfig:
    """conf/train.yaml composed in-process as ``python -m src.train`` would, resolved.

    ``output_dir`` is the run folder the config's paths point to (nothing is written there unless a
    benchmark runs Lightning); on CUDA the trainer is ``trainer=gpu`` kept at fp32, as on CPU.
    ``model`` replaces the sizes' model; ``ffn_mode=None`` keeps the model's default method (what
    ``python -m src.train model=<model>`` compresses with); ``default_fusion`` keeps the ffn_mode's own
    layers and mid_dim instead of the sizes', filled from the model's config as ``python -m src.train`` fills them.
    """
    overrides = [o for o in sizes.overrides if model is None or not o.startswith("model=")]
    overrides += ([f"model={model}"] if model else []) + ([f"ffn_mode={ffn_mode}"] if ffn_mode else [])
    if ffn_mode != "none" and not default_fusion:
        overrides += [f"ffn_mode.layers=[{','.join(map(str, sizes.layers))}]", f"ffn_mode.mid_dim={sizes.mid_dim}"]
    if device is not None and device.type == "cuda":
        overrides += ["trainer=gpu", "trainer.precision=32-true"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)  # resolves ${hydra:runtime.cwd} in paths
    GlobalHydra.instance().clear()
    with open_dict(cfg):
        cfg.paths.output_dir = output_dir
        del cfg.hydra
    if default_fusion:  # before the interpolations resolve: the fusion callback's settings point to these
        resolve(cfg, load_hf_config(cfg.model))
    OmegaConf.resolve(cfg)
    return cfg


def real_batches(cfg: DictConfig, n_batches: int, device: torch.device) -> list[dict[str, Tensor]]:
    """The first ``n_batches`` Rotten Tomatoes training batches of ``task.batch_size`` sentences.

    Padded to ``task.max_seq_length`` (training pads to each batch's longest), so that every step has
    the same shape and one step's FLOP count holds for all.
    """
    train = load_rt_polarity(cfg.task.split_seed)["train"]
    tok = load_tokenizer(cfg.model)
    size, batches = cfg.task.batch_size, []
    for i in range(n_batches):
        rows = train.iloc[i * size : (i + 1) * size]
        enc = tok(rows.text.tolist(), padding="max_length", truncation=True, max_length=cfg.task.max_seq_length,
                  return_tensors="pt")
        batch = {**enc, "labels": torch.tensor(rows.label.tolist())}
        batches.append({k: v.to(device) for k, v in batch.items()})
    return batches


def compress(model: nn.Module, cfg: DictConfig, device: torch.device) -> FusionReport:
    """Compress ``model`` in place as ``python -m src.train`` does at setup: the fusion callback built
    from ``cfg.ffn_mode`` (same cache, identity and options), with its approximation metrics off (they
    measure quality, not cost); a setting that reads calibration data gets the task's DataModule."""
    f = cfg.ffn_mode
    datamodule = build_datamodule(cfg, preflight(cfg)[1]) if needs_calibration(instantiate(f.compress), f.refit, f.budget) else None
    callback = instantiate(f.callback, metrics={"enabled": False})
    return callback.compress_and_measure(model, device, datamodule=datamodule, probe_fns={})


# ---------------------------------------------------------------------------------------------
# training steps (the bare PyTorch side)


def adamw(model: nn.Module, optim: DictConfig, total_steps: int) -> tuple[Optimizer, LRScheduler]:
    """AdamW and linear warm-up/decay with the project's settings (``FineTuneModule.configure_optimizers``)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    opt = AdamW([{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)
    return opt, get_linear_schedule_with_warmup(opt, int(optim.warmup_ratio * total_steps), total_steps)


def forward_backward(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Cross-entropy of the classifier on ``batch`` and its backward pass; returns the loss."""
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    loss = F.cross_entropy(logits, batch["labels"])
    loss.backward()
    return loss.detach()


def optimizer_step(model: nn.Module, opt: Optimizer, sched: LRScheduler, clip: float) -> None:
    """Gradient-norm clipping, AdamW, the schedule, gradients dropped (what Lightning does per step)."""
    nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------
# timing


def sync(device: torch.device) -> None:
    """Wait for queued device work, so that a timer reads finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall seconds of ``fn()``, device work included."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of ``fn()`` as ``torch.utils.flop_counter.FlopCounterMode`` counts them (matrix products;
    element-wise work is not counted): the one FLOP rule of the benchmarks."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def rotated(names: Sequence[str], r: int) -> list[str]:
    """``names`` rotated by ``r``: no side always runs first (or right after the same other side)."""
    k = r % len(names)
    return [*names[k:], *names[:k]]


def alternate(fns: dict[str, Callable[[int], Any]], reps: int, device: torch.device, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of ``reps`` timed calls of each fn after ``warmup`` untimed ones, interleaved.

    Call ``i`` (warm-ups first) runs every fn once with argument ``i``, in an order rotated by ``i``,
    so that slow spells of a shared machine hit every side alike.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + reps):
        for name in rotated(list(fns), i):
            seconds = timed(partial(fns[name], i), device)
            if i >= warmup:
                times[name].append(seconds)
    return times


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median of the per-repetition ratios ``num[i] / den[i]`` (both sides of a pair ran back to back)."""
    return statistics.median(n / d for n, d in zip(num, den, strict=True))


# ---------------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class Target:
    """One target of the issue: the measured value, the goal and whether it was met."""

    what: str
    value: float
    goal: str  # e.g. ">= 20"
    met: bool


def target(what: str, value: float, op: str, threshold: float) -> Target:
    """A Target for ``value op threshold`` with op ``>=`` or ``<=``."""
    met = value >= threshold if op == ">=" else value <= threshold
    return Target(what, value, f"{op} {threshold:g}", bool(met))


@dataclass
class BenchResult:
    """What one benchmark measured: a table (rows keyed like ``columns``), targets, notes, settings."""

    name: str
    title: str
    columns: list[tuple[str, str]]  # (row key, column header), in print order
    rows: list[dict[str, Any]]
    targets: list[Target]
    notes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)


def machine(device: torch.device) -> dict[str, Any]:
    """The machine a table was measured on: CPU model, CPUs, torch threads, GPU, load."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor())
    info = {
        "cpu": cpu,
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
