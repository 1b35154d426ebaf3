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

import numpy as np
import sklearn
import torch
from sklearn.cluster import KMeans
from torch import Tensor

from bench.common import FP32_NOTE, BenchResult, Options, Sizes, alternate, compose_config, target
from src.methods.common import sub_mlp_points
from src.methods.ntk_cluster import cluster_sub_mlps
from src.methods.types import MLPWeights
from src.models.build import build_model
from src.models.mlp_io import read_mlp

SKLEARN_N_INIT = 30  # the research code's restarts
TIME_TARGET, INERTIA_TARGET = 20.0, 1.01

# A contestant clusters a layer's sub-MLPs into k centroids [k, P] on call i of the timing loop.
Contestant = Callable[[MLPWeights, int, int], Tensor]


def run(sizes: Sizes, opts: Options) -> BenchResult:
    """Time and inertia of each contestant on each compressed layer of the model and one big layer."""
    device = opts.device
    cfg = compose_config(sizes, opts, "ntk_cluster")
    ours = {k: cfg.ffn_mode.compress[k] for k in ("n_init", "max_iter", "tol")}
    torch.manual_seed(cfg.seed)  # a config-built (random) model gets the same weights every run
    model = build_model(cfg.model, "classification", num_labels=cfg.task.num_labels)
    layers = {f"{cfg.model.name} layer {i}": read_mlp(model, i) for i in sizes.layers}
    h, d, k = sizes.big_layer
    big = resampled_layer(list(layers.values()), h, d, seed=cfg.seed)
    cases = [(name, w, sizes.mid_dim) for name, w in layers.items()] + [(f"{h}x{d} resampled", big, k)]

    contestants = _contestants(ours, sizes.sklearn_n_init, cfg.seed, device)
    for f in contestants.values():  # warm-up on a small problem: thread pools, BLAS, allocator
        f(_head(big, 128), 16, 0)
    rows = [_case(name, w, k, contestants, sizes, device) for name, w, k in cases]
    rows.insert(len(layers), _total(f"{cfg.model.name} layers {_span(sizes.layers)} (sum)", rows[: len(layers)], contestants))

    total, big_row = rows[len(layers)], rows[-1]
    targets = [
        target(f"time ratio sklearn/ours, {total['case']}", total["speedup"], ">=", TIME_TARGET),
        target(f"time ratio sklearn/ours, {big_row['case']}", big_row["speedup"], ">=", TIME_TARGET),
        target("inertia ratio ours/sklearn, worst case", max(r["inertia_ratio"] for r in rows), "<=", INERTIA_TARGET),
    ]
    columns = [("case", "case"), ("points", "points (n x dim -> k)"), ("ours_s", "ours s"), ("sklearn_s", "sklearn n_init=30 s"),
               ("speedup", "time ratio sklearn/ours"), ("inertia_ratio", "inertia ratio ours/sklearn")]
    if "faiss" in contestants:
        columns += [("faiss_s", "faiss s"), ("faiss_inertia_ratio", "inertia ratio faiss/sklearn")]
    return BenchResult(
        name="fusion",
        title="Fusion speed: our k-means (ntk_cluster) vs scikit-learn KMeans(n_init=30, lloyd)",
        columns=columns,
        rows=rows,
        targets=targets,
        notes=_notes(ours, sizes, layers, big, "faiss" in contestants),
        settings={"ours": ours, "sklearn": {"n_init": SKLEARN_N_INIT, "algorithm": "lloyd", "timed_n_init": sizes.sklearn_n_init},
                  "reps": sizes.fusion_reps, "seed": cfg.seed, "big_layer": sizes.big_layer,
                  "versions": _versions(contestants), "precision": "32-true"},
    )


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
    if importlib.util.find_spec("faiss") is not None:
        import faiss

        def faiss_kmeans(w: MLPWeights, k: int, i: int) -> Tensor:
            x = np.ascontiguousarray(sub_mlp_points(w).numpy(), dtype=np.float32)
            km = faiss.Kmeans(x.shape[1], k, niter=opts["max_iter"], nredo=opts["n_init"], seed=seed, min_points_per_centroid=1)
            km.train(x)
            return torch.from_numpy(km.centroids)

        found["faiss"] = faiss_kmeans
    return found


def _case(name: str, w: MLPWeights, k: int, contestants: dict[str, Contestant], sizes: Sizes, device: torch.device) -> dict:
    """One layer: every contestant timed ``fusion_reps`` times, alternating; inertias on the same points."""
    points = sub_mlp_points(w)
    centroids: dict[str, list[Tensor]] = {name: [] for name in contestants}
    fns = {c: (lambda i, c=c: centroids[c].append(contestants[c](w, k, i))) for c in contestants}
    times = alternate(fns, sizes.fusion_reps, device, warmup=0)
    ref = min(inertia(points, c) for c in centroids["sklearn"])  # the best of all sklearn restarts timed
    row = {
        "case": name, "points": f"{points.shape[0]} x {points.shape[1]} -> {k}", "n": points.shape[0], "dim": points.shape[1], "k": k,
        "ours_s": statistics.median(times["ours"]), "sklearn_s": statistics.median(times["sklearn"]) * SKLEARN_N_INIT / sizes.sklearn_n_init,
        "ours_inertia": inertia(points, centroids["ours"][0]), "sklearn_inertia": ref,
        "sklearn_restart_inertias": [inertia(points, c) for c in centroids["sklearn"]],
        "times": times,
    }
    row["speedup"] = row["sklearn_s"] / row["ours_s"]
    row["inertia_ratio"] = row["ours_inertia"] / ref
    if "faiss" in contestants:
        row["faiss_s"] = statistics.median(times["faiss"])
        row["faiss_inertia_ratio"] = inertia(points, centroids["faiss"][0]) / ref
    return row


def _total(name: str, rows: list[dict], contestants: dict) -> dict:
    """Every model layer together: summed times, the worst inertia ratio."""
    total = {"case": name, "points": f"{len(rows)} layers"}
    for key in ("ours_s", "sklearn_s", "faiss_s"):
        if key[:-2] in contestants:
            total[key] = sum(r[key] for r in rows)
    total["speedup"] = total["sklearn_s"] / total["ours_s"]
    total["inertia_ratio"] = max(r["inertia_ratio"] for r in rows)
    if "faiss" in contestants:
        total["faiss_inertia_ratio"] = max(r["faiss_inertia_ratio"] for r in rows)
    return total


def _versions(contestants: dict[str, Contestant]) -> dict[str, str]:
    found = {"torch": torch.__version__, "sklearn": sklearn.__version__}
    if "faiss" in contestants:
        import faiss

        found["faiss"] = faiss.__version__
    return found


def _head(w: MLPWeights, n: int) -> MLPWeights:
    """The first ``n`` sub-MLPs of ``w``."""
    return MLPWeights(up=w.up[:n], down=w.down[:, :n], up_bias=w.up_bias[:n], down_bias=w.down_bias, activation=w.activation)


def _span(layers: tuple[int, ...]) -> str:
    return f"{layers[0]}-{layers[-1]}" if list(layers) == list(range(layers[0], layers[-1] + 1)) else ",".join(map(str, layers))


def _notes(opts: dict, sizes: Sizes, layers: dict[str, MLPWeights], big: MLPWeights, has_faiss: bool) -> list[str]:
    src = list(layers.values())
    std = {n: torch.cat([getattr(w, n).flatten() for w in src]).std().item() for n in ("up", "up_bias", "down")}
    h, d, k = sizes.big_layer
    notes = [
        f"ours: src.methods.kmeans via ntk_cluster's cluster_sub_mlps (greedy k-means++, Lloyd, n_init={opts['n_init']}, "
        f"max_iter={opts['max_iter']}, tol={opts['tol']}) on the sub-MLP points [W1 row, b1, W2 col]; median of {sizes.fusion_reps} runs.",
        f"sklearn: KMeans(n_init={SKLEARN_N_INIT}, algorithm='lloyd', max_iter=300, tol=1e-4) on the same points; "
        + (f"time = {SKLEARN_N_INIT} x the median of {sizes.fusion_reps} single-restart fits (seeds seed..seed+{sizes.fusion_reps - 1}); "
           "its inertia is the best of those restarts, which a 30-restart fit can only lower (by the spread of the restarts, in the JSON)."
           if sizes.sklearn_n_init == 1 else f"median of {sizes.fusion_reps} fits; inertia the best of them."),
        f"{h}x{d} resampled: a roberta-base-sized layer (h={h}, d={d} -> k={k}), random weights with every entry drawn from "
        f"the same tensor of the real layers above (W1 std {std['up']:.3f}, b1 std {std['up_bias']:.3f}, W2 std {std['down']:.3f}): "
        "trained-weight scale but no trained structure, a harder case for k-means than real layers.",
        "inertia: sum of squared distances to the nearest centroid, recomputed in float64 for every contestant. "
        "The (sum) row adds the layers' times and shows their worst inertia ratio.",
        FP32_NOTE,
    ]
    if has_faiss:
        notes.append(f"faiss: faiss.Kmeans(niter={opts['max_iter']}, nredo={opts['n_init']}); random initial centroids (no k-means++), "
                     "no convergence test.")
    return notes
