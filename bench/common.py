"""What the benchmarks share: sizes, the project's configs, real batches, timers, results and the machine."""

from __future__ import annotations

import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.flop_counter import FlopCounterMode

import src.utils.config  # noqa: F401  (registers the config resolvers)
from src.builders import build_datamodule
from src.callbacks.fusion import FusionCallback
from src.data.classification import load_rt_polarity
from src.models.build import load_hf_config, load_tokenizer
from src.models.source import model_identity
from src.modules.optim import build_adamw, build_schedule
from src.pipeline.fuse import FusionReport
from src.pipeline.settings import CompressionSettings
from src.preflight import compression_settings, preflight

CONF = str(Path(__file__).resolve().parents[1] / "conf")


# ---------------------------------------------------------------------------------------------
# sizes


@dataclass(frozen=True)
class Shape:
    """A model of realistic size: random weights built from ``conf/model/<model>.yaml``, fed random token ids."""

    model: str  # conf/model entry
    head: str  # "classification" (cross-entropy over the classes) | "generation" (next-token cross-entropy)
    seq_len: int  # tokens per sequence (no padding)
    batch_size: int = 0  # finetune: sequences per step (scale: unused, the metrics' probe size is the config's)
    layers: tuple[int, ...] | None = None  # compressed layers; None: the model's defaults (its fusion_defaults)
    overrides: tuple[str, ...] = ()  # Hydra overrides of conf/train.yaml for it (quick mode: toy sizes of the architecture)


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
    processes: int  # fresh processes each comparison runs in (bench.timing); --processes overrides it
    shapes: dict[str, Shape]  # finetune's --shape choices besides "default" (the mode's model on real sentences)
    scale: tuple[Shape, ...]  # the scale benchmark's models


# quick mode's stand-ins for the realistic shapes: each architecture at toy sizes, so that the same code runs in seconds
_TOY = ("model.config.hidden_size=32", "model.config.intermediate_size=64", "model.config.num_hidden_layers=4",
        "model.config.num_attention_heads=2")
_TOY_LLAMA = (*_TOY, "model.config.num_key_value_heads=1")
# the scale benchmark times the project's setup as it is: no fusion cache (a cache hit would time nothing), a causal-LM task
_SCALE = ("task=rt_review", "ffn_mode.cache=false")

FULL = Sizes(
    name="full", overrides=("model=minilm",), layers=(2, 3, 4, 5), mid_dim=384, big_layer=(768, 3072, 768),
    probe_size=32, sklearn_n_init=1, fusion_reps=3, ntk_reps=5, step_reps=10, overhead_steps=22,
    inference=(("minilm", "classification", ((1, 64), (32, 64))), ("smollm2", "generation", ((1, 128), (8, 128)))),
    inference_reps=7, processes=5,
    shapes={"roberta_base": Shape("bench_roberta_base", "classification", seq_len=128, batch_size=32),
            "llama_1b": Shape("bench_llama_1b", "generation", seq_len=256, batch_size=16)},
    scale=(Shape("bench_llama_1b", "generation", seq_len=128, layers=(13, 14, 15), overrides=_SCALE),
           Shape("bench_llama3_8b", "generation", seq_len=128, layers=(30, 31), overrides=_SCALE)),
)
QUICK = Sizes(
    name="quick", overrides=("model=tiny_bert", "task.batch_size=8", "task.max_seq_length=32"), layers=(1, 2, 3),
    mid_dim=16, big_layer=(32, 128, 32), probe_size=8, sklearn_n_init=30, fusion_reps=2, ntk_reps=2, step_reps=3,
    overhead_steps=6,
    inference=(("tiny_bert", "classification", ((1, 16), (4, 16))), ("tiny_smollm2", "generation", ((1, 16), (2, 16)))),
    inference_reps=2, processes=2,
    shapes={"roberta_base": Shape("bench_roberta_base", "classification", seq_len=16, batch_size=4, overrides=_TOY),
            "llama_1b": Shape("bench_llama_1b", "generation", seq_len=16, batch_size=4, overrides=_TOY_LLAMA)},
    scale=tuple(Shape(model, "generation", seq_len=16, layers=(2, 3),
                      overrides=(*_SCALE, *_TOY_LLAMA, "approx_metrics.probe_size=8", "task.calib_size=16"))
                for model in ("bench_llama_1b", "bench_llama3_8b")),
)
SIZES = {sizes.name: sizes for sizes in (FULL, QUICK)}


@dataclass(frozen=True)
class Options:
    """What the command line sets besides the mode: where, at what precision and on how many threads and processes the
    benchmarks run, and finetune's model."""

    device: torch.device
    precision: str = "32-true"  # of training and inference steps: "32-true" | "bf16-mixed"
    shape: str = "default"  # finetune's model: "default" (the mode's, on real sentences) or a key of Sizes.shapes
    checkpointing: bool = False  # finetune: activation checkpointing of every block (model.gradient_checkpointing)
    threads: int = 1  # CPU threads of every library, in the timed processes as in this one
    processes: int = 2  # fresh processes per comparison (bench.timing)

    def spec(self) -> dict[str, Any]:
        """The options as JSON, for a child process (bench.worker)."""
        return {"device": str(self.device), "precision": self.precision, "shape": self.shape, "checkpointing": self.checkpointing,
                "threads": self.threads, "processes": self.processes}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Options:
        """The options :meth:`spec` wrote."""
        return cls(**{**spec, "device": torch.device(spec["device"])})


# ---------------------------------------------------------------------------------------------
# configs and data


def compose_config(sizes: Sizes, opts: Options, ffn_mode: str | None = "ntk_cluster", *, model: str | None = None,
                   default_fusion: bool = False, extra: Sequence[str] = (),
                   output_dir: str = str(Path(tempfile.gettempdir()) / "mlp-fusion-bench")) -> DictConfig:
    """conf/train.yaml composed in-process as ``python -m src.train`` would, resolved.

    ``output_dir`` is the run folder the config's paths point to (nothing is written there unless a
    benchmark runs Lightning). The trainer is ``trainer=cpu`` or ``trainer=gpu`` at ``opts.precision``
    (not ``trainer=auto``: the command line chooses). ``model`` replaces the sizes' model;
    ``ffn_mode=None`` keeps the model's default method (what ``python -m src.train model=<model>``
    compresses with); ``default_fusion`` keeps the ffn_mode's own layers and mid_dim instead of the
    sizes' (``settings`` fills them from the model's config as ``python -m src.train`` does, where
    ``extra``, more overrides applied last, leaves them unset).
    """
    overrides = [o for o in sizes.overrides if model is None or not o.startswith("model=")]
    overrides += ([f"model={model}"] if model else []) + ([f"ffn_mode={ffn_mode}"] if ffn_mode else [])
    if ffn_mode != "none" and not default_fusion:
        overrides += [f"ffn_mode.layers=[{','.join(map(str, sizes.layers))}]", f"ffn_mode.mid_dim={sizes.mid_dim}"]
    overrides += [f"trainer={'gpu' if opts.device.type == 'cuda' else 'cpu'}", f"trainer.precision={opts.precision}", *extra]
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)  # resolves ${hydra:runtime.cwd} in paths
    GlobalHydra.instance().clear()
    with open_dict(cfg):
        cfg.paths.output_dir = output_dir
        del cfg.hydra
    OmegaConf.resolve(cfg)
    return cfg


def settings(cfg: DictConfig) -> CompressionSettings | None:
    """The config's compression settings (None for ``ffn_mode=none``), resolved and checked against the model's
    config as ``python -m src.train``'s preflight does."""
    return compression_settings(cfg, load_hf_config(cfg.model))


def shape_config(sizes: Sizes, opts: Options, shape: Shape, ffn_mode: str, extra: Sequence[str] = ()) -> DictConfig:
    """The config of ``shape``'s model compressed with ``ffn_mode`` on its layers (the model's defaults
    where the shape names none) at the model's default width."""
    layers = [f"ffn_mode.layers=[{','.join(map(str, shape.layers))}]"] if shape.layers and ffn_mode != "none" else []
    return compose_config(sizes, opts, ffn_mode, model=shape.model, default_fusion=True, extra=(*shape.overrides, *layers, *extra))


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


def random_tokens(n: int, seq_len: int, vocab_size: int, seed: int, num_labels: int | None = None) -> dict[str, Tensor]:
    """``n`` sequences of ``seq_len`` token ids drawn uniformly from the vocabulary, unpadded (attention
    mask all ones). labels: a random class of ``num_labels`` per sequence (a classifier), else the ids
    themselves (a causal LM's targets: position t predicts labels[t + 1])."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(vocab_size, (n, seq_len), generator=gen)
    labels = torch.randint(num_labels, (n,), generator=gen) if num_labels else ids.clone()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def compress(model: nn.Module, cfg: DictConfig, device: torch.device) -> FusionReport:
    """Compress ``model`` in place as ``python -m src.train`` does at setup: the fusion callback with the
    config's compression settings (same cache, identity and options), with its approximation metrics off (they
    measure quality, not cost); a setting that reads calibration data gets the task's DataModule."""
    s = settings(cfg)
    datamodule = build_datamodule(cfg, preflight(cfg)) if s.needs_calibration else None
    callback = FusionCallback(s, {"enabled": False}, model_identity(cfg.model))
    return callback.compress_and_measure(model, device, datamodule=datamodule, probe_fns={})


# ---------------------------------------------------------------------------------------------
# training steps (the bare PyTorch side)

PRECISIONS = ("32-true", "bf16-mixed")


def default_precision(device: torch.device) -> str:
    """What the project trains at on ``device`` under trainer=auto (src.utils.hardware): bf16-mixed on a
    GPU (every GPU the benchmarks target has bfloat16), 32-true on the CPU."""
    return "bf16-mixed" if device.type == "cuda" else "32-true"


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """The autocast Lightning's precision plugin puts around the forward: bfloat16 under bf16-mixed, none under 32-true."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")


# the note of a benchmark that computes in fp32 whatever --precision says
FP32_NOTE = ("precision 32-true: fp32 throughout, as the project compresses and measures (at setup, outside the training "
             "precision's autocast); --precision applies to the training and inference steps only.")


def precision_note(precision: str) -> str:
    """A table's note on the precision of its training or inference steps."""
    if precision == "bf16-mixed":
        return ("precision bf16-mixed: forwards (and the loss) under torch.autocast(dtype=torch.bfloat16), backwards outside it; "
                "weights, gradients and AdamW states in fp32.")
    return "precision 32-true: fp32 throughout."


def adamw(model: nn.Module, optim: DictConfig, total_steps: int, precision: str) -> tuple[Optimizer, LRScheduler]:
    """The project's AdamW (parameter groups, implementation for ``precision``) and schedule, as
    ``FineTuneModule.configure_optimizers`` builds them."""
    opt = build_adamw(model.named_parameters(), optim, precision)
    return opt, build_schedule(opt, optim, total_steps)


def forward_backward(model: nn.Module, batch: dict[str, Tensor], precision: str) -> Tensor:
    """The loss on ``batch`` under the precision's autocast, and its backward; returns the loss.

    A classifier's logits [B, C]: cross-entropy against ``labels`` [B]. A causal LM's [B, T, V]:
    next-token cross-entropy, position t against ``labels[:, t + 1]`` (-100 ignored), over the
    B·(T-1) positions. The logits go to float32 for the loss.
    """
    with autocast(batch["input_ids"].device, precision):
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        if logits.ndim == 3:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten())
        else:
            loss = F.cross_entropy(logits.float(), batch["labels"])
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
    """What one benchmark measured: a table (rows keyed like ``columns``), targets, notes, settings and, where its ratios
    come from fresh processes, how (``bench.timing.timing_record``)."""

    name: str
    title: str
    columns: list[tuple[str, str]]  # (row key, column header), in print order
    rows: list[dict[str, Any]]
    targets: list[Target]
    notes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    timing: dict[str, Any] | None = None


# /proc/cpuinfo flag -> the vector extension it shows (x86 "flags", Arm "Features"), in record order
VECTOR_FLAGS = (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_vnni", "AVX-512 VNNI"), ("avx512_bf16", "AVX-512 BF16"),
                ("amx_tile", "AMX"), ("asimd", "NEON"), ("sve", "SVE"))
# record key -> distribution: the libraries a timing depends on, read from the installed metadata (nothing imported)
LIBRARIES = {"torch": "torch", "transformers": "transformers", "onnxruntime": "onnxruntime", "llama_cpp": "llama-cpp-python",
             "numpy": "numpy", "scipy": "scipy", "sklearn": "scikit-learn"}


def vector_extensions(flags: set[str], arch: str) -> list[str]:
    """The vector extensions in a CPU's flags (VECTOR_FLAGS); every 64-bit Arm CPU has NEON, flags line or not (macOS
    has no /proc/cpuinfo)."""
    found = [name for flag, name in VECTOR_FLAGS if flag in flags]
    if arch.lower() in ("arm64", "aarch64") and "NEON" not in found:
        found.append("NEON")
    return found


def library_versions() -> dict[str, str | None]:
    """Installed versions of LIBRARIES, None for one that is not installed."""
    found: dict[str, str | None] = {}
    for key, dist in LIBRARIES.items():
        try:
            found[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[key] = None
    return found


def machine(device: torch.device, threads: int) -> dict[str, Any]:
    """The machine a table was measured on: CPU model, vector extensions, cores, CPUs, the threads the timed processes
    used, GPU, library versions, OS, load."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    fields = [tuple(part.strip() for part in line.split(":", 1)) for line in lines if ":" in line]

    def first(key: str) -> str | None:
        return next((value for name, value in fields if name == key), None)

    flags = set((first("flags") or first("Features") or "").split())
    # (physical id, core id) pairs are the physical cores; Arm's /proc/cpuinfo has neither: none counted
    cores = {(p, c) for p, c in zip((v for k, v in fields if k == "physical id"), (v for k, v in fields if k == "core id"), strict=False)}
    return {
        "cpu": first("model name") or platform.processor() or platform.machine(),
        "arch": platform.machine(),
        "vector": vector_extensions(flags, platform.machine()),
        "cores": len(cores) or None,
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads": threads,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device if device.type == "cuda" else 0) if torch.cuda.is_available() else None,
        "versions": library_versions(),
        "python": platform.python_version(),
        "os": platform.platform(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
