"""NTK metric: vectorised per-sample gradients (vmap) against a per-sample autograd loop.

Same model, probe set, θ groups and probe output as the fusion callback's metrics: a seeded sample of
``probe_size`` validation sentences, θ = each compressed layer's MLP parameters, f = P(class 0).
"""

from __future__ import annotations

import statistics
from typing import Any

import torch

from bench.common import (
    FP32_NOTE,
    SIZES,
    BenchResult,
    Options,
    Sizes,
    compose_config,
    sync,
    target,
)
from bench.timing import INTERVAL, Stage, paired_ratio, rate_summary, ratio_summary, run_stages, timing_record
from bench.worker import paired_calls
from src.data.classification import ClassificationDataModule, load_classification_splits
from src.metrics.ntk import (
    Kernels,
    class0_prob,
    per_sample_kernels,
    per_sample_kernels_loop,
    rel_err,
)
from src.models.build import build_model, load_tokenizer
from src.models.mlp_io import mlp_param_names

SPEED_TARGET, DIFF_TARGET = 10.0, 1e-5
SIDES = ("loop", "vmap")  # even processes' order


def run(sizes: Sizes, opts: Options) -> BenchResult:
    """Time both implementations over ``opts.processes`` fresh processes (``measure``) and compare their kernels."""
    cfg = compose_config(sizes, opts, "ntk_cluster")
    stage = Stage("ntk", "bench.ntk:measure", SIDES, {"sizes": sizes.name, "options": opts.spec()})
    results = run_stages([stage], opts.processes, opts.threads)["ntk"]
    first = results[0]
    row = {
        "model": cfg.model.name, "samples": first["samples"], "seq_len": first["seq_len"],
        "theta": f"MLPs of layers {list(sizes.layers)}", "params": first["params"],
        "loop_s": rate_summary([statistics.median(r["times"]["loop"]) for r in results]),
        "vmap_s": rate_summary([statistics.median(r["times"]["vmap"]) for r in results]),
        "speedup": ratio_summary([paired_ratio(r["times"]["loop"], r["times"]["vmap"]) for r in results]),
        "max_rel_diff": max(max(r["rel_diffs"].values()) for r in results),
        "rel_diffs": first["rel_diffs"], "times": [r["times"] for r in results],
    }
    chunk = cfg.approx_metrics.chunk_size
    return BenchResult(
        name="ntk",
        title="NTK metric: vectorised per_sample_kernels vs per_sample_kernels_loop",
        columns=[("model", "model"), ("samples", "probe samples"), ("seq_len", "padded length"), ("theta", "θ"), ("params", "θ size"),
                 ("loop_s", "loop s"), ("vmap_s", "vmap s"), ("speedup", "time ratio loop/vmap"), ("max_rel_diff", "max rel diff")],
        rows=[row],
        targets=[target("time ratio loop/vmap (median over processes)", row["speedup"]["median"], ">=", SPEED_TARGET),
                 target("max relative kernel difference", row["max_rel_diff"], "<=", DIFF_TARGET)],
        notes=[
            f"probe set: {sizes.probe_size} Rotten Tomatoes validation sentences (seed 0, as the fusion metrics draw theirs), "
            f"padded to the longest; f = softmax probability of class 0; vmap in chunks of {chunk} samples; one kernel pair "
            "(K_std, K_sign) per layer group.",
            f"{opts.processes} fresh processes (bench.timing), each running a warm-up and {sizes.ntk_reps} rounds, a round the "
            "loop then vmap in even processes and the reverse in odd ones; time ratio: per process the median of the paired "
            f"ratios loop time / vmap time, then the median over processes with its 95 % interval and n ({INTERVAL}).",
            "max rel diff: max over groups, both kernels and the processes of ||K_vmap - K_loop||_F / ||K_loop||_F.",
            FP32_NOTE,
        ],
        settings={"reps": sizes.ntk_reps, "chunk_size": chunk, "probe_size": sizes.probe_size, "groups": first["groups"],
                  "precision": "32-true", "processes": [{k: r[k] for k in ("process", "order", "wall_s")} for r in results]},
        timing=timing_record(opts.processes, opts.threads),
    )


def measure(order: list[str], process: int, sizes: str, options: dict[str, Any]) -> dict[str, Any]:
    """One timed process (bench.worker): the model and probe set, a warm-up and ``ntk_reps`` rounds of both implementations
    in ``order``; their times and the kernels' relative differences."""
    sizes_, opts = SIZES[sizes], Options.from_spec(options)
    device = opts.device
    cfg = compose_config(sizes_, opts, "ntk_cluster")
    cfg.task.max_train_samples = cfg.task.max_eval_samples = sizes_.probe_size  # tokenize only what the probe set needs
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, "classification", device=device, num_labels=cfg.task.num_labels)
    data = ClassificationDataModule(cfg.task, load_tokenizer(cfg.model), load_classification_splits(cfg.task))
    batch = {k: v.to(device) for k, v in data.probe_batch(sizes_.probe_size, seed=0).items()}
    groups = {f"layer_{i}": mlp_param_names(model, i) for i in sizes_.layers}
    chunk = cfg.approx_metrics.chunk_size
    out: dict[str, dict[str, Kernels]] = {}
    fns = {
        "loop": lambda i: out.__setitem__("loop", per_sample_kernels_loop(model, groups, batch, class0_prob)),
        "vmap": lambda i: out.__setitem__("vmap", per_sample_kernels(model, groups, batch, class0_prob, chunk_size=chunk)),
    }
    times = paired_calls(fns, order, sizes_.ntk_reps, warmup=1, sync=lambda: sync(device))
    diffs = {f"{g}/{kind}": rel_err(out["vmap"][g][j], out["loop"][g][j]) for g in groups for j, kind in enumerate(("std", "sign"))}
    return {"times": times, "rel_diffs": diffs, "groups": groups, "samples": batch["input_ids"].shape[0],
            "seq_len": batch["input_ids"].shape[1],
            "params": sum(model.get_parameter(n).numel() for names in groups.values() for n in names)}
