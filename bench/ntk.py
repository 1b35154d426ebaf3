"""NTK metric: vectorised per-sample gradients (vmap) against a per-sample autograd loop.

Same model, probe set, θ groups and probe output as the fusion callback's metrics: a seeded sample of
``probe_size`` validation sentences, θ = each compressed layer's MLP parameters, f = P(class 0).
"""

from __future__ import annotations

import statistics

import torch

from bench.common import (
    FP32_NOTE,
    BenchResult,
    Options,
    Sizes,
    alternate,
    compose_config,
    paired_ratio,
    target,
)
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


def run(sizes: Sizes, opts: Options) -> BenchResult:
    """Time both implementations, alternating, and compare their kernels."""
    device = opts.device
    cfg = compose_config(sizes, opts, "ntk_cluster")
    cfg.task.max_train_samples = cfg.task.max_eval_samples = sizes.probe_size  # tokenize only what the probe set needs
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, "classification", device=device, num_labels=cfg.task.num_labels)
    data = ClassificationDataModule(cfg.task, load_tokenizer(cfg.model), load_classification_splits(cfg.task))
    batch = {k: v.to(device) for k, v in data.probe_batch(sizes.probe_size, seed=0).items()}
    groups = {f"layer_{i}": mlp_param_names(model, i) for i in sizes.layers}
    chunk = cfg.approx_metrics.chunk_size

    out: dict[str, dict[str, Kernels]] = {}
    fns = {
        "loop": lambda i: out.__setitem__("loop", per_sample_kernels_loop(model, groups, batch, class0_prob)),
        "vmap": lambda i: out.__setitem__("vmap", per_sample_kernels(model, groups, batch, class0_prob, chunk_size=chunk)),
    }
    times = alternate(fns, sizes.ntk_reps, device, warmup=1)
    diffs = {f"{g}/{kind}": rel_err(out["vmap"][g][j], out["loop"][g][j]) for g in groups for j, kind in enumerate(("std", "sign"))}
    n_params = sum(model.get_parameter(n).numel() for names in groups.values() for n in names)
    row = {
        "model": cfg.model.name, "samples": batch["input_ids"].shape[0], "seq_len": batch["input_ids"].shape[1],
        "theta": f"MLPs of layers {list(sizes.layers)}", "params": n_params,
        "loop_s": statistics.median(times["loop"]), "vmap_s": statistics.median(times["vmap"]),
        "speedup": paired_ratio(times["loop"], times["vmap"]), "max_rel_diff": max(diffs.values()),
        "rel_diffs": diffs, "times": times,
    }
    return BenchResult(
        name="ntk",
        title="NTK metric: vectorised per_sample_kernels vs per_sample_kernels_loop",
        columns=[("model", "model"), ("samples", "probe samples"), ("seq_len", "padded length"), ("theta", "θ"), ("params", "θ size"),
                 ("loop_s", "loop s"), ("vmap_s", "vmap s"), ("speedup", "time ratio loop/vmap"), ("max_rel_diff", "max rel diff")],
        rows=[row],
        targets=[target("time ratio loop/vmap", row["speedup"], ">=", SPEED_TARGET),
                 target("max relative kernel difference", row["max_rel_diff"], "<=", DIFF_TARGET)],
        notes=[
            f"probe set: {sizes.probe_size} Rotten Tomatoes validation sentences (seed 0, as the fusion metrics draw theirs), "
            f"padded to the longest; f = softmax probability of class 0; vmap in chunks of {chunk} samples; one kernel pair "
            "(K_std, K_sign) per layer group.",
            f"time ratio: median over {sizes.ntk_reps} alternating repetitions (after a warm-up) of loop time / vmap time.",
            "max rel diff: max over groups and both kernels of ||K_vmap - K_loop||_F / ||K_loop||_F.",
            FP32_NOTE,
        ],
        settings={"reps": sizes.ntk_reps, "chunk_size": chunk, "probe_size": sizes.probe_size, "groups": groups, "precision": "32-true"},
    )
