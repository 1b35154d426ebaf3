"""On-disk cache of compressed MLPs: safetensors (never pickle), checksummed, written atomically.

A file holds one layer's result; the key hashes everything the result depends on (the layer's
weights, method, options, width and seed), so a hit is always valid and a corrupted file (bad
checksum, unreadable) is reported, removed and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from src.methods.types import Compressed, FusedMLP, LowRankMLP, MLPWeights
from src.utils.io import atomic_path

log = logging.getLogger(__name__)


def weights_hash(w: MLPWeights) -> str:
    """sha256 over the layer's tensors (float32 bytes, CPU), so identical weights give identical keys."""
    h = hashlib.sha256(w.activation.encode())
    for t in (w.gate, w.up, w.up_bias, w.down, w.down_bias, *((w.gate_bias,) if w.gate_bias is not None else ())):
        h.update(b"-" if t is None else t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def cache_key(w: MLPWeights, **settings: Any) -> str:
    """Key over the weights and every setting that changes the result (method, options, width, seed, device type)."""
    blob = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256((weights_hash(w) + blob).encode()).hexdigest()[:32]


def _flatten(c: Compressed) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if isinstance(c, FusedMLP):
        w = c.weights
        named = {"up": w.up, "down": w.down, "up_bias": w.up_bias, "down_bias": w.down_bias, "gate": w.gate, "gate_bias": w.gate_bias, "scale": c.scale}
        meta = {"kind": "fused", "activation": w.activation}
    else:
        named = {f"{k}.{side}": t for k, (left, right) in c.factors.items() for side, t in (("left", left), ("right", right))}
        named.update({"up_bias": c.up_bias, "down_bias": c.down_bias, "gate_bias": c.gate_bias})
        meta = {"kind": "lowrank", "activation": c.activation}
    tensors = {k: v.detach().cpu().contiguous() for k, v in named.items() if v is not None}
    meta["stats"] = json.dumps(c.stats)
    return tensors, meta


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode() + tensors[k].view(torch.uint8).flatten().numpy().tobytes() if tensors[k].numel() else k.encode())
    return h.hexdigest()


def _unflatten(t: dict[str, torch.Tensor], meta: dict[str, str]) -> Compressed:
    stats = json.loads(meta["stats"])
    if meta["kind"] == "fused":
        w = MLPWeights(up=t["up"], down=t["down"], up_bias=t.get("up_bias"), down_bias=t.get("down_bias"), gate=t.get("gate"),
                       activation=meta["activation"], gate_bias=t.get("gate_bias"))
        return FusedMLP(weights=w, scale=t.get("scale"), stats=stats)
    factors = {k.split(".")[0]: (t[f"{k.split('.')[0]}.left"], t[f"{k.split('.')[0]}.right"]) for k in t if k.endswith(".left")}
    return LowRankMLP(factors=factors, up_bias=t.get("up_bias"), down_bias=t.get("down_bias"), activation=meta["activation"], stats=stats,
                      gate_bias=t.get("gate_bias"))


class FusionCache:
    """Get and put compressed layers under ``root/<key>.safetensors``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def get(self, key: str, device: torch.device | str = "cpu") -> Compressed | None:
        path = self.path(key)
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            if meta.get("checksum") != _checksum(tensors):
                raise ValueError("checksum mismatch")
            result = _unflatten(tensors, meta)
        except Exception as e:  # unreadable or tampered: never trust it, recompute
            log.warning("fusion cache file %s is corrupted (%s): removing it and recomputing.", path, e)
            path.unlink(missing_ok=True)
            return None
        return _to(result, device)

    def put(self, key: str, c: Compressed) -> None:
        tensors, meta = _flatten(c)
        meta["checksum"] = _checksum(tensors)
        with atomic_path(self.path(key)) as tmp:
            save_file(tensors, str(tmp), metadata=meta)


def _to(c: Compressed, device: torch.device | str) -> Compressed:
    t, meta = _flatten(c)
    return _unflatten({k: v.to(device) for k, v in t.items()}, meta)
