"""Fusion speed: the project's k-means on the sub-MLP points against scikit-learn's KMeans.

scikit-learn runs as the research code did, ``KMeans(n_clusters=k, n_init=30, algorithm="lloyd",
random_state=seed)``. Its restarts are independent and run one after the other, so in full mode each
timed fit is one restart (``n_init=1`` with seed + i) and the n_init=30 time is 30 times their
median: a full fit of every layer would take most of an hour on two cores. Quick mode runs n_init=30.
faiss (``faiss-cpu``, not a dependency) joins when it is installed, with our restarts and iterations.
"""

from __future__ import annotations

import importlib.util
import statistics
from collections.abc import Callable
from typing import Any

import numpy as np
import sklearn
import torch
from omegaconf import DictConfig
from sklearn.cluster import KMeans
from torch import Tensor

from bench.common import FP32_NOTE, SIZES, BenchResult, Options, Sizes, compose_config, sync, target
from bench.timing import INTERVAL, Stage, paired_ratio, rate_summary, ratio_summary, run_stages, timing_record
from bench.worker import paired_calls
from src.methods.common import sub_mlp_points
from src.methods.ntk_cluster import cluster_sub_mlps
from src.methods.types import MLPWeights
from src.models.build import build_model
from src.models.mlp_io import read_mlp

SKLEARN_N_INIT = 30  # the research code's restarts
TIME_TARGET, INERTIA_TARGET = 20.0, 1.01

# A contestant clusters a layer's sub-MLPs into k centroids [k, P] on call i of the timing loop.
Contestant = Callable[[MLPWeights, int, int], Tensor]
Case = tuple[str, MLPWeights, int]  # (name, layer, k)


def run(sizes: Sizes, opts: Options) -> BenchResult:
    """Time and inertia of each contestant on each compressed layer of the model and one big layer, over ``opts.processes``
    fresh processes (``measure``)."""
    cfg, ours, layers, big, cases = _setup(sizes, opts)
    sides = ("ours", "sklearn", *(("faiss",) if _has_faiss() else ()))
    stage = Stage("fusion", "bench.fusion:measure", sides, {"sizes": sizes.name, "options": opts.spec()})
    results = run_stages([stage], opts.processes, opts.threads)["fusion"]
    scale = SKLEARN_N_INIT / sizes.sklearn_n_init
    rows = [_case_row(name, w, k, [r["cases"][name] for r in results], scale, sides) for name, w, k in cases]
    rows.insert(len(layers), _total(f"{cfg.model.name} layers {_span(sizes.layers)} (sum)", results, list(layers), scale, sides))

    total, big_row = rows[len(layers)], rows[-1]
    targets = [
        target(f"time ratio sklearn/ours (median over processes), {total['case']}", total["speedup"]["median"], ">=", TIME_TARGET),
        target(f"time ratio sklearn/ours (median over processes), {big_row['case']}", big_row["speedup"]["median"], ">=", TIME_TARGET),
        target("inertia ratio ours/sklearn, worst case", max(r["inertia_ratio"]["median"] for r in rows), "<=", INERTIA_TARGET),
    ]
    columns = [("case", "case"), ("points", "points (n x dim -> k)"), ("ours_s", "ours s"), ("sklearn_s", "sklearn n_init=30 s"),
               ("speedup", "time ratio sklearn/ours"), ("inertia_ratio", "inertia ratio ours/sklearn")]
    if "faiss" in sides:
        columns += [("faiss_s", "faiss s"), ("faiss_inertia_ratio", "inertia ratio faiss/sklearn")]
    return BenchResult(
        name="fusion",
        title="Fusion speed: our k-means (ntk_cluster) vs scikit-learn KMeans(n_init=30, lloyd)",
        columns=columns,
        rows=rows,
        targets=targets,
        notes=_notes(ours, sizes, opts, layers, big, "faiss" in sides),
        settings={"ours": ours, "sklearn": {"n_init": SKLEARN_N_INIT, "algorithm": "lloyd", "timed_n_init": sizes.sklearn_n_init},
                  "reps": sizes.fusion_reps, "seed": cfg.seed, "big_layer": sizes.big_layer,
                  "versions": _versions("faiss" in sides), "precision": "32-true",
                  "processes": [{k: r[k] for k in ("process", "order", "wall_s")} for r in results]},
        timing=timing_record(opts.processes, opts.threads),
    )


def measure(order: list[str], process: int, sizes: str, options: dict[str, Any]) -> dict[str, Any]:
    """One timed process (bench.worker): a warm-up of every contestant, then each case's ``fusion_reps`` rounds, a round
    calling the contestants in ``order``; the times and the inertias of the centroids they found."""
    sizes_, opts = SIZES[sizes], Options.from_spec(options)
    cfg, ours, _, big, cases = _setup(sizes_, opts)
    contestants = _contestants(ours, sizes_.sklearn_n_init, cfg.seed, opts.device)
    for c in order:  # warm-up on a small problem: thread pools, BLAS, allocator
        contestants[c](_head(big, 128), 16, 0)
    found = {}
    for name, w, k in cases:
        points = sub_mlp_points(w)
        centroids: dict[str, list[Tensor]] = {c: [] for c in order}
        fns = {c: (lambda i, c=c: centroids[c].append(contestants[c](w, k, i))) for c in order}
        found[name] = {"times": paired_calls(fns, order, sizes_.fusion_reps, warmup=0, sync=lambda: sync(opts.device)),
                       "inertias": {c: [inertia(points, x) for x in centroids[c]] for c in order}}
    return {"cases": found}


def _setup(sizes: Sizes, opts: Options) -> tuple[DictConfig, dict[str, Any], dict[str, MLPWeights], MLPWeights, list[Case]]:
    """The config, our k-means options, the model's compressed layers, the big resampled layer and the cases (the same in
    every process: seeded)."""
    cfg = compose_config(sizes, opts, "ntk_cluster")
    ours = {k: cfg.ffn_mode.compress[k] for k in ("n_init", "max_iter", "tol")}
    torch.manual_seed(cfg.seed)  # a config-built (random) model gets the same weights every run
    model = build_model(cfg.model, "classification", num_labels=cfg.task.num_labels)
    layers = {f"{cfg.model.name} layer {i}": read_mlp(model, i) for i in sizes.layers}
    h, d, k = sizes.big_layer
    big = resampled_layer(list(layers.values()), h, d, seed=cfg.seed)
    return cfg, ours, layers, big, [(name, w, sizes.mid_dim) for name, w in layers.items()] + [(f"{h}x{d} resampled", big, k)]


def resampled_layer(source: list[MLPWeights], h: int, d: int, seed: int) -> MLPWeights:
    """A random MLP (hidden ``h``, width ``d``) whose entries are drawn with replacement from the same
    tensor of the ``source`` layers: the scale and distribution of trained weights, not their structure."""
    gen = torch.Generator().manual_seed(seed)

    def draw(tensors: list[Tensor], shape: tuple[int, ...]) -> Tensor:
        pool = torch.cat([t.flatten() for t in tensors])
        return pool[torch.randint(len(pool), shape, generator=gen)]

    return MLPWeights(
        up=draw([w.up for w in source], (d, h)), down=draw([w.down for w in source], (h, d)),
        up_bias=draw([w.up_bias for w in source], (d,)), down_bias=draw([w.down_bias for w in source], (h,)),
        activation=source[0].activation,
    )


def inertia(points: Tensor, centroids: Tensor) -> float:
    """Sum of squared distances of the points to their nearest centroid, in float64 (one rule for all)."""
    x, c = points.double().cpu(), centroids.double().cpu()
    d2 = (x * x).sum(1, keepdim=True) - 2 * x @ c.T + (c * c).sum(1)
    return d2.min(1).values.clamp_min(0).sum().item()


def _contestants(opts: dict, sklearn_n_init: int, seed: int, device: torch.device) -> dict[str, Contestant]:
    """ours (on ``device``), sklearn and, when installed, faiss (on the CPU)."""

    def ours(w: MLPWeights, k: int, i: int) -> Tensor:
        w = MLPWeights(**{f: (v.to(device) if isinstance(v, Tensor) else v) for f, v in w.__dict__.items()})
        return cluster_sub_mlps(w, k, seed=seed, **opts)[0].centroids  # the same fit every call

    def sklearn(w: MLPWeights, k: int, i: int) -> Tensor:
        km = KMeans(n_clusters=k, n_init=sklearn_n_init, algorithm="lloyd", random_state=seed + i)
        return torch.from_numpy(km.fit(sub_mlp_points(w).numpy()).cluster_centers_)  # new restarts every call

    found = {"ours": ours, "sklearn": sklearn}
    if _has_faiss():
        import faiss

        def faiss_kmeans(w: MLPWeights, k: int, i: int) -> Tensor:
            x = np.ascontiguousarray(sub_mlp_points(w).numpy(), dtype=np.float32)
            km = faiss.Kmeans(x.shape[1], k, niter=opts["max_iter"], nredo=opts["n_init"], seed=seed, min_points_per_centroid=1)
            km.train(x)
            return torch.from_numpy(km.centroids)

        found["faiss"] = faiss_kmeans
    return found


def _has_faiss() -> bool:
    """Whether faiss-cpu (not a dependency) is installed."""
    return importlib.util.find_spec("faiss") is not None


def _case_row(name: str, w: MLPWeights, k: int, found: list[dict[str, Any]], scale: float, sides: tuple[str, ...]) -> dict[str, Any]:
    """One layer over the processes: each contestant's median time, the paired time ratio sklearn (scaled to n_init=30) /
    ours, and the inertias against the best sklearn restart of the process."""
    n, dim = sub_mlp_points(w).shape
    ref = [min(f["inertias"]["sklearn"]) for f in found]  # the best of all sklearn restarts timed
    row = {
        "case": name, "points": f"{n} x {dim} -> {k}", "n": n, "dim": dim, "k": k,
        "ours_s": rate_summary([statistics.median(f["times"]["ours"]) for f in found]),
        "sklearn_s": rate_summary([statistics.median(f["times"]["sklearn"]) * scale for f in found]),
        "speedup": ratio_summary([paired_ratio([t * scale for t in f["times"]["sklearn"]], f["times"]["ours"]) for f in found]),
        "inertia_ratio": ratio_summary([f["inertias"]["ours"][0] / r for f, r in zip(found, ref, strict=True)]),
        "ours_inertia": found[0]["inertias"]["ours"][0], "sklearn_inertia": ref[0],
        "sklearn_restart_inertias": found[0]["inertias"]["sklearn"], "times": [f["times"] for f in found],
    }
    if "faiss" in sides:
        row["faiss_s"] = rate_summary([statistics.median(f["times"]["faiss"]) for f in found])
        row["faiss_inertia_ratio"] = ratio_summary([f["inertias"]["faiss"][0] / r for f, r in zip(found, ref, strict=True)])
    return row


def _total(name: str, results: list[dict[str, Any]], layers: list[str], scale: float, sides: tuple[str, ...]) -> dict[str, Any]:
    """Every model layer together: per process the sums of the layers' median times and their ratio (times of different
    layers do not pair), and the worst inertia ratio."""
    def total(r: dict[str, Any], c: str) -> float:
        return sum(statistics.median(r["cases"][layer]["times"][c]) for layer in layers) * (scale if c == "sklearn" else 1)

    def worst(r: dict[str, Any], c: str) -> float:
        return max(r["cases"][layer]["inertias"][c][0] / min(r["cases"][layer]["inertias"]["sklearn"]) for layer in layers)

    row = {"case": name, "points": f"{len(layers)} layers", **{f"{c}_s": rate_summary([total(r, c) for r in results]) for c in sides},
           "speedup": ratio_summary([total(r, "sklearn") / total(r, "ours") for r in results]),
           "inertia_ratio": ratio_summary([worst(r, "ours") for r in results])}
    if "faiss" in sides:
        row["faiss_inertia_ratio"] = ratio_summary([worst(r, "faiss") for r in results])
    return row


def _versions(has_faiss: bool) -> dict[str, str]:
    found = {"torch": torch.__version__, "sklearn": sklearn.__version__}
    if has_faiss:
        import faiss

        found["faiss"] = faiss.__version__
    return found


def _head(w: MLPWeights, n: int) -> MLPWeights:
    """The first ``n`` sub-MLPs of ``w``."""
    return MLPWeights(up=w.up[:n], down=w.down[:, :n], up_bias=w.up_bias[:n], down_bias=w.down_bias, activation=w.activation)


def _span(layers: tuple[int, ...]) -> str:
    return f"{layers[0]}-{layers[-1]}" if list(layers) == list(range(layers[0], layers[-1] + 1)) else ",".join(map(str, layers))


def _notes(ours: dict[str, Any], sizes: Sizes, opts: Options, layers: dict[str, MLPWeights], big: MLPWeights,
           has_faiss: bool) -> list[str]:
    src = list(layers.values())
    std = {n: torch.cat([getattr(w, n).flatten() for w in src]).std().item() for n in ("up", "up_bias", "down")}
    h, d, k = sizes.big_layer
    notes = [
        f"ours: src.methods.kmeans via ntk_cluster's cluster_sub_mlps (greedy k-means++, Lloyd, n_init={ours['n_init']}, "
        f"max_iter={ours['max_iter']}, tol={ours['tol']}) on the sub-MLP points [W1 row, b1, W2 col]; median of {sizes.fusion_reps} runs.",
        f"sklearn: KMeans(n_init={SKLEARN_N_INIT}, algorithm='lloyd', max_iter=300, tol=1e-4) on the same points; "
        + (f"time = {SKLEARN_N_INIT} x the median of {sizes.fusion_reps} single-restart fits (seeds seed..seed+{sizes.fusion_reps - 1}); "
           "its inertia is the best of those restarts, which a 30-restart fit can only lower (by the spread of the restarts, in the JSON)."
           if sizes.sklearn_n_init == 1 else f"median of {sizes.fusion_reps} fits; inertia the best of them."),
        f"{h}x{d} resampled: a roberta-base-sized layer (h={h}, d={d} -> k={k}), random weights with every entry drawn from "
        f"the same tensor of the real layers above (W1 std {std['up']:.3f}, b1 std {std['up_bias']:.3f}, W2 std {std['down']:.3f}): "
        "trained-weight scale but no trained structure, a harder case for k-means than real layers.",
        "inertia: sum of squared distances to the nearest centroid, recomputed in float64 for every contestant. "
        "The (sum) row adds the layers' times and shows their worst inertia ratio.",
        f"{opts.processes} fresh processes (bench.timing), each timing every case in {sizes.fusion_reps} rounds, a round calling "
        "ours then sklearn in even processes and the reverse in odd ones; time ratio: per process the median of the paired "
        "ratios (the (sum) row: the ratio of the summed medians), then the median over processes with its 95 % interval and "
        f"n ({INTERVAL}); times: median (min to max) over the processes. The inertias repeat in every process (seeded fits).",
        FP32_NOTE,
    ]
    if has_faiss:
        notes.append(f"faiss: faiss.Kmeans(niter={ours['max_iter']}, nredo={ours['n_init']}); random initial centroids (no k-means++), "
                     "no convergence test.")
    return notes
