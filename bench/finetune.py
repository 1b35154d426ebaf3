"""Fine-tuning cost: time per training step and peak memory of each fused model against the full one.

The bound a fused model can reach is the FLOP ratio of one training step (forward + backward,
counted by ``torch.utils.flop_counter.FlopCounterMode``); the target is a measured speed-up of at
least 90 % of it. The model is the mode's (MiniLM; tiny_bert in quick mode) on real sentences or, with
``--shape``, one sized for a GPU: a random RoBERTa-base classifier or 1B Llama causal LM
(``conf/model/bench_*.yaml``; toy sizes of the same architectures in quick mode) on random token ids.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor
from torch.profiler import ProfilerActivity, profile

from bench.common import (
    SIZES,
    BenchResult,
    Options,
    Shape,
    Sizes,
    adamw,
    compose_config,
    compress,
    count_flops,
    forward_backward,
    optimizer_step,
    precision_note,
    random_tokens,
    real_batches,
    settings,
    shape_config,
    sync,
    target,
    timed,
)
from bench.timing import INTERVAL, Stage, mapped, paired_ratio, rate_summary, ratio_summary, run_stages, timing_record
from src.models.build import build_model

MODES = ("none", "ntk_cluster", "cluster", "sketch", "mmd", "svd", "prune")  # every one data-free: no calibration data
BOUND_TARGET = 0.9
WARMUP = 2  # untimed steps per model: the first allocates AdamW's moments


class Trainee:
    """One model in training: the (compressed) model, its optimizer and schedule."""

    def __init__(self, cfg: DictConfig, head: str, opts: Options, total_steps: int) -> None:
        self.mode, self.precision = cfg.ffn_mode.name, opts.precision
        torch.manual_seed(cfg.seed)  # a config-built (random) model gets the same weights for every mode
        labels = {"num_labels": cfg.task.num_labels} if head == "classification" else {}
        self.model = build_model(cfg.model, head, device=opts.device, **labels)  # a random model is initialised there
        if self.mode != "none":
            compress(self.model, cfg, opts.device)
        self.model.train()
        self.opt, self.sched = adamw(self.model, cfg.optim, total_steps, opts.precision)
        self.clip = cfg.trainer.gradient_clip_val

    def step(self, batch: dict[str, Tensor], device: torch.device) -> tuple[float, float]:
        """One training step; returns the seconds of forward + backward and of the whole step."""
        fwd_bwd = timed(lambda: forward_backward(self.model, batch, self.precision), device)
        rest = timed(lambda: optimizer_step(self.model, self.opt, self.sched, self.clip), device)
        return fwd_bwd, fwd_bwd + rest

    def flops(self, batch: dict[str, Tensor]) -> int:
        """FLOPs of forward + backward on ``batch`` (matrix products; the optimizer's work is not counted)."""
        flops = count_flops(lambda: forward_backward(self.model, batch, self.precision))
        self.opt.zero_grad(set_to_none=True)
        return flops

    def persistent_bytes(self) -> int:
        """Bytes held between steps: parameters, buffers and the optimizer's state."""
        tensors = [*self.model.parameters(), *self.model.buffers()]
        tensors += [t for state in self.opt.state.values() for t in state.values() if isinstance(t, Tensor)]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return sum(storages.values())

    def peak_step_bytes(self, batch: dict[str, Tensor], device: torch.device) -> int:
        """Peak bytes allocated within one training step and live at once (activations, gradients, temporaries)."""
        def run() -> None:
            forward_backward(self.model, batch, self.precision)
            optimizer_step(self.model, self.opt, self.sched, self.clip)

        if device.type == "cuda":
            sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            start = torch.cuda.memory_allocated(device)
            run()
            sync(device)
            return torch.cuda.max_memory_allocated(device) - start
        with _fd2_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            run()
        return _peak_live_bytes(prof)


def run(sizes: Sizes, opts: Options) -> BenchResult:
    """Time training steps of every mode's model over ``opts.processes`` fresh processes (``measure``); the first also
    counts FLOPs and memory.

    ``opts.shape``: the mode's own model on real sentences ("default"), or a realistic shape (a random
    model on random token ids) on its default layers and width.
    """
    device, shape = opts.device, sizes.shapes.get(opts.shape)
    cfgs = _configs(sizes, opts)
    head = shape.head if shape else "classification"
    stage = Stage("finetune", "bench.finetune:measure", MODES, {"sizes": sizes.name, "options": opts.spec()})
    results = run_stages([stage], opts.processes, opts.threads)["finetune"]
    rows = [_row(mode, results) for mode in MODES]
    cfg, fused = cfgs["none"], settings(cfgs["ntk_cluster"])
    batch_size, seq_len = results[0]["batch_shape"]
    inputs = (f"batch {batch_size} x {seq_len} random token ids (uniform over the {cfg.model.config.vocab_size}-word vocabulary, "
              "no padding)"
              if shape else f"batch {batch_size} real Rotten Tomatoes training sentences padded to {seq_len} tokens")
    loss = "next-token cross-entropy at every position (causal LM)" if head == "generation" else "cross-entropy of the classifier"
    checkpointing = "; activation checkpointing of every block" if opts.checkpointing else ""
    return BenchResult(
        name="finetune",
        title=f"Fine-tuning cost: fused vs full {cfg.model.name}, layers {list(fused.layers)} -> width {fused.mid_dim}",
        columns=[("mode", "ffn_mode"), ("params_m", "params M"), ("gflops", "GFLOP/step"), ("bound", "FLOP bound"),
                 ("step_ms", "step ms"), ("speedup", "speed-up"), ("of_bound", "of bound"), ("fwd_bwd_speedup", "fwd+bwd speed-up"),
                 ("fwd_bwd_of_bound", "fwd+bwd of bound"), ("peak_mb", "peak MB"), ("memory_ratio", "memory full/fused")],
        rows=rows,
        targets=[target(f"speed-up / FLOP bound (median over processes), {r['mode']}", r["of_bound"]["median"], ">=", BOUND_TARGET)
                 for r in rows if r["mode"] != "none"],
        notes=[
            f"one step: {inputs}, {loss}, backward, grad-norm clipping {cfg.trainer.gradient_clip_val}, the project's AdamW and "
            f"linear schedule (src.modules.optim); dropout on{checkpointing}. "
            f"{opts.processes} fresh processes (bench.timing), each building all seven models (in the listed order in even "
            f"processes, reversed in odd ones), then {WARMUP} warm-up and {sizes.step_reps} timed rounds, a round stepping every "
            "model once in that order.",
            precision_note(opts.precision),
            "FLOP bound = FLOPs of the full model's forward + backward / the fused model's (FlopCounterMode: matrix products "
            "only); speed-up: per process the median over rounds of the paired ratio full time / fused time, then the median "
            f"over processes with its 95 % interval and n ({INTERVAL}); 'of bound' = speed-up / bound; step ms: median "
            "(min to max) over the processes of each process's median step. fwd+bwd columns leave out the optimizer step, "
            "which the FLOP count does not cover.",
            "peak MB = persistent state (parameters, buffers, AdamW moments) + the peak of the bytes allocated during one "
            + ("step and live at once (torch.cuda.max_memory_allocated over the step)." if device.type == "cuda" else
               "step and live at once, replayed from the PyTorch profiler's allocation events (exact for PyTorch's CPU "
               "allocator; blind to memory outside it, e.g. oneDNN scratch). Not the process RSS, which holds all seven models.")
            + " FLOPs and memory are counted in process 0 after its timing (n = 1: counts, not timings).",
        ],
        settings={"modes": MODES, "reps": sizes.step_reps, "warmup": WARMUP, "shape": opts.shape, "model": cfg.model.name,
                  "head": head, "precision": opts.precision, "checkpointing": opts.checkpointing, "layers": list(fused.layers),
                  "mid_dim": fused.mid_dim, "batch_size": batch_size, "seq_len": seq_len, "inputs": "random" if shape else "rt_polarity",
                  "processes": [{k: r[k] for k in ("process", "order", "wall_s", "step", "fwd_bwd")} for r in results]},
        timing=timing_record(opts.processes, opts.threads),
    )


def measure(order: list[str], process: int, sizes: str, options: dict[str, Any]) -> dict[str, Any]:
    """One timed process (bench.worker): every mode's model built in ``order``, then warm-up and timed steps, a round at a
    time, each round stepping the models in ``order``. Process 0 then counts each model's FLOPs and memory (after the
    timing, which they do not disturb)."""
    sizes_, opts = SIZES[sizes], Options.from_spec(options)
    device, shape = opts.device, sizes_.shapes.get(opts.shape)
    cfgs = _configs(sizes_, opts)
    head = shape.head if shape else "classification"
    trainees = {mode: Trainee(cfgs[mode], head, opts, WARMUP + sizes_.step_reps + 2) for mode in order}
    n_batches = WARMUP + sizes_.step_reps
    batches = _random_batches(cfgs["none"], shape, n_batches, device) if shape else real_batches(cfgs["none"], n_batches, device)
    fwd_bwd: dict[str, list[float]] = {mode: [] for mode in order}
    step: dict[str, list[float]] = {mode: [] for mode in order}
    for i in range(n_batches):
        for mode in order:
            fb, s = trainees[mode].step(batches[i], device)
            if i >= WARMUP:
                fwd_bwd[mode].append(fb)
                step[mode].append(s)
    out = {"fwd_bwd": fwd_bwd, "step": step, "batch_shape": list(batches[0]["input_ids"].shape),
           "params_m": {mode: sum(p.numel() for p in t.model.parameters()) / 1e6 for mode, t in trainees.items()}}
    if process == 0:
        out["flops"] = {mode: t.flops(batches[0]) for mode, t in trainees.items()}
        out["memory"] = {mode: t.persistent_bytes() + t.peak_step_bytes(batches[0], device) for mode, t in trainees.items()}
    return out


def _configs(sizes: Sizes, opts: Options) -> dict[str, DictConfig]:
    """Every mode's config: the mode's model, or ``opts.shape``'s on its default layers and width."""
    shape = sizes.shapes.get(opts.shape)
    extra = ["model.gradient_checkpointing=true"] if opts.checkpointing else []
    return {mode: shape_config(sizes, opts, shape, mode, extra) if shape else compose_config(sizes, opts, mode, extra=extra)
            for mode in MODES}


def _random_batches(cfg: DictConfig, shape: Shape, n: int, device: torch.device) -> list[dict[str, Tensor]]:
    """``n`` batches of ``shape``'s random token ids (batch i drawn with seed + i), on ``device``."""
    num_labels = cfg.task.num_labels if shape.head == "classification" else None
    return [{k: v.to(device) for k, v in random_tokens(shape.batch_size, shape.seq_len, cfg.model.config.vocab_size, cfg.seed + i,
                                                          num_labels).items()} for i in range(n)]


def _row(mode: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    """A table row over the processes: step times and speed-ups (per process the median of the paired ratios full / fused),
    FLOPs, bound and memory from process 0 (the memory ratio with n = 1: a count, not a timing)."""
    flops, memory = results[0]["flops"], results[0]["memory"]
    bound = flops["none"] / flops[mode]
    speedup = ratio_summary([paired_ratio(r["step"]["none"], r["step"][mode]) for r in results])
    fb_speedup = ratio_summary([paired_ratio(r["fwd_bwd"]["none"], r["fwd_bwd"][mode]) for r in results])
    return {
        "mode": mode, "params_m": results[0]["params_m"][mode], "gflops": flops[mode] / 1e9, "bound": bound,
        "step_ms": rate_summary([1e3 * statistics.median(r["step"][mode]) for r in results]), "speedup": speedup,
        "of_bound": mapped(speedup, lambda v: v / bound),
        "fwd_bwd_ms": rate_summary([1e3 * statistics.median(r["fwd_bwd"][mode]) for r in results]), "fwd_bwd_speedup": fb_speedup,
        "fwd_bwd_of_bound": mapped(fb_speedup, lambda v: v / bound),
        "peak_mb": memory[mode] / 2**20, "memory_ratio": ratio_summary([memory["none"] / memory[mode]]),
    }


@contextmanager
def _fd2_silenced() -> Iterator[None]:
    """Kineto writes "USDT: profiler_start/stop" straight to file descriptor 2 on every profile: keep it
    out of the tables (an exception still propagates and prints once fd 2 is back)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _peak_live_bytes(prof: profile) -> int:
    """Replay the CPU allocation events of a profile: the peak of bytes allocated inside it and not yet freed.

    Frees of blocks allocated before the profile started are ignored, so the result is what the
    profiled code needed on top of what already existed.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    memory = sorted((e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0), key=lambda e: e["ts"])
    live: dict[int, int] = {}
    current = peak = 0
    for e in memory:
        addr, nbytes = e["args"]["Addr"], e["args"]["Bytes"]
        if nbytes > 0:
            live[addr] = live.get(addr, 0) + nbytes
            current += nbytes
        elif addr in live:
            current -= live.pop(addr)
        peak = max(peak, current)
    return peak
