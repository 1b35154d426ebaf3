"""Compress chosen layers of a whole model with one compression function (no Lightning, no Hydra).

The method sees only ``MLPWeights`` (pure function); this module reads each layer through
``mlp_io``, consults the cache, writes the result back and records the new structure.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from src.compress.cache import FusionCache, cache_key
from src.compress.types import Compressed
from src.models import mlp_io

log = logging.getLogger(__name__)


def count_params(model: nn.Module) -> int:
    """Number of parameters (frozen count scales are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters())


def layer_seed(seed: int, layer: int) -> int:
    """An independent seed for each (run seed, layer): random methods draw anew in every layer."""
    return int(np.random.SeedSequence([seed, layer]).generate_state(1)[0])


def method_version(fn: Callable[..., Compressed]) -> str:
    """The ``VERSION`` string of the module defining a compression function (a partial's too): it
    changes whenever the method's output changes, so the cache never serves an older method's result."""
    func = fn.func if isinstance(fn, functools.partial) else fn
    return str(getattr(inspect.getmodule(func), "VERSION", "0"))


@dataclass
class FusionReport:
    """What a compression did: the structure to record in checkpoints and the numbers to log."""

    spec: dict[str, Any]  # {"method", "layers", "mid_dim", "seed", "layer_specs": {layer: layer_spec}}
    params_before: int
    params_after: int
    seconds: float
    layer_stats: dict[int, dict[str, float]] = field(default_factory=dict)  # inertia, seconds, cache_hit

    def metrics(self) -> dict[str, float]:
        out = {"fusion/params_before": float(self.params_before), "fusion/params_after": float(self.params_after),
               "fusion/compress_seconds": self.seconds}
        for layer, stats in self.layer_stats.items():
            out.update({f"fusion/{k}/layer_{layer}": float(v) for k, v in stats.items()})
        return out


def compress_model(
    model: nn.Module,
    *,
    method: str,
    fn: Callable[..., Compressed],
    layers: Iterable[int],
    mid_dim: int,
    seed: int,
    options: dict[str, Any] | None = None,
    cache: FusionCache | None = None,
    device: torch.device | str = "cpu",
) -> FusionReport:
    """Replace the MLP of each layer in ``layers`` by ``fn(weights, mid_dim, seed=layer_seed(seed, layer))``,
    computed on ``device``; the cache key includes the method's ``VERSION``."""
    layers = list(layers)
    before, start, stats = count_params(model), time.perf_counter(), {}
    version = method_version(fn)
    for layer in layers:
        t0 = time.perf_counter()
        w = mlp_io.read_mlp(model, layer)
        w_dev = type(w)(**{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in w.__dict__.items()})
        s = layer_seed(seed, layer)
        key = cache_key(w, method=method, version=version, options=options or {}, mid_dim=mid_dim, seed=s, device=torch.device(device).type)
        result = cache.get(key, device) if cache else None
        hit = result is not None
        if result is None:
            result = fn(w_dev, mid_dim, seed=s)
            if cache:
                cache.put(key, result)
        mlp_io.write_mlp(model, layer, result)
        stats[layer] = {**{k: float(v) for k, v in result.stats.items()}, "seconds": time.perf_counter() - t0, "cache_hit": float(hit)}
        log.info("compressed layer %d with %s to width %d in %.2fs%s", layer, method, mid_dim, stats[layer]["seconds"], " (cache hit)" if hit else "")
    spec = {"method": method, "layers": layers, "mid_dim": mid_dim, "seed": seed,
            "layer_specs": {str(i): mlp_io.layer_spec(model, i) for i in layers}}
    return FusionReport(spec, before, count_params(model), time.perf_counter() - start, stats)


def apply_spec(model: nn.Module, spec: dict[str, Any]) -> None:
    """Rebuild the recorded compressed structure with empty weights (a checkpoint's state dict fills them)."""
    for layer, layer_spec in spec["layer_specs"].items():
        mlp_io.build_from_spec(model, int(layer), layer_spec)
