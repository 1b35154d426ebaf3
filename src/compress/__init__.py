"""Compression methods: pure functions ``compress(w, mid_dim, *, seed, **options)`` of one MLP.

Each takes an :class:`MLPWeights` and returns a :class:`FusedMLP` (width ``mid_dim``) or, for
``svd``, a :class:`LowRankMLP`; none needs data, all run on the device of the weights.
"""

from __future__ import annotations

from collections.abc import Callable

from . import cluster, mmd, ntk_cluster, prune, sketch, svd
from .types import Compressed

METHODS: dict[str, Callable[..., Compressed]] = {
    "ntk_cluster": ntk_cluster.compress,
    "cluster": cluster.compress,
    "sketch": sketch.compress,
    "mmd": mmd.compress,
    "svd": svd.compress,
    "prune": prune.compress,
}
