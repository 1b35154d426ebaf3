"""Compress chosen layers of a whole model with one compression function (no Lightning, no Hydra).

The method sees only ``MLPWeights`` (pure function); this module reads each layer through
``mlp_io``, consults the cache, writes the result back and records the new structure.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from src.methods.refit import apply_refit
from src.methods.refit import output as refit_output
from src.methods.types import Compressed, FusedMLP, MLPCalibration, MLPWeights
from src.models import mlp_io
from src.pipeline.budget import SCORES, allocate, allocate_by_scores, candidate_widths, total_neurons
from src.pipeline.cache import FusionCache, cache_key
from src.pipeline.calibration import Calibrator
from src.pipeline.settings import CompressionSettings

log = logging.getLogger(__name__)


def count_params(model: nn.Module) -> int:
    """Number of parameters (frozen count scales are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters())


def layer_seed(seed: int, layer: int, part: str | None = None) -> int:
    """An independent seed for each (run seed, layer[, part]): random methods draw anew in every layer
    and in every expert of a Mixture-of-Experts block (routed expert e: 1 + e; the shared expert: 0)."""
    entropy = [seed, layer] if part is None else [seed, layer, 0 if part == mlp_io.SHARED else 1 + int(part)]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


@dataclass
class FusionReport:
    """What a compression did: the structure to record in checkpoints and the numbers to log."""

    # plain data: {"method", "layers", "mid_dim", "seed", "widths", "budget", "refit", "experts", "shared_expert",
    # "layer_specs": {layer: layer_spec(...).as_dict()}}
    spec: dict[str, Any]
    params_before: int
    params_after: int
    seconds: float
    layer_stats: dict[int, dict[str, float]] = field(default_factory=dict)  # inertia, seconds, cache_hit (an MoE block: the mean over its parts)
    part_stats: dict[tuple[int, str], dict[str, float]] = field(default_factory=dict)  # (layer, part) of MoE blocks

    def metrics(self) -> dict[str, float]:
        out = {"fusion/params_before": float(self.params_before), "fusion/params_after": float(self.params_after),
               "fusion/compress_seconds": self.seconds}
        for layer, stats in self.layer_stats.items():
            out.update({f"fusion/{k}/layer_{layer}": float(v) for k, v in stats.items()})
        for (layer, part), stats in self.part_stats.items():
            name = part if part == mlp_io.SHARED else f"expert_{part}"
            out.update({f"fusion/{k}/layer_{layer}/{name}": float(v) for k, v in stats.items()})
        return out


def compress_model(
    model: nn.Module,
    settings: CompressionSettings,
    *,
    identity: str | None = None,
    device: torch.device | str = "cpu",
    calibrator: Calibrator | None = None,
) -> FusionReport:
    """Replace the MLP of each of the settings' layers by the method's output at the settings' width, seeded
    ``layer_seed(seed, layer)`` and computed on ``device``: a :class:`Compressor` over a model held whole in
    memory (``src.pipeline.stream`` drives the same one over one block at a time).

    With calibration (``settings.needs_calibration``; ``calibrator`` then required) the layers are compressed
    in order; with ``calibrator.sequential`` each layer's calibration inputs come from the model whose earlier
    layers are compressed already, else from the original model (one pass over all layers first, as a budget
    also needs).
    """
    run = Compressor(settings, identity=identity, device=device)
    run.check(model, calibrator)
    before, layers = count_params(model), list(settings.layers)
    original = calibrator.collect(model, layers) if run.uses_calib and (not calibrator.sequential or settings.budget is not None) else {}
    widths = run.allocate(model, original)
    for layer in layers:
        calib = None
        if run.uses_calib:
            calib = calibrator.collect(model, [layer])[layer] if calibrator.sequential else original[layer]
        run.block(model, layer, widths[layer], calib)
    return run.report(model, before)


class Compressor:
    """One compression run, block by block: the method, its cache and the settings; the per-layer and
    per-part numbers gathered for the report.

    Results are cached under the settings' ``cache_dir``, keyed by the layer's weights, the method's name,
    version and options (with the model's ``identity``, where given), the width, the seed and the device
    type (and, with calibration, the calibration tensors and the refit settings). With calibration the
    method receives the layer's ``MLPCalibration`` if it takes ``calib``, ``refit`` re-fits or compensates
    each down projection (``src.methods.refit``), and ``budget`` (a fraction of the chosen layers' MLP
    parameters) replaces the one ``mid_dim`` by per-layer widths (``src.pipeline.budget``: by error curves,
    or by scores ranked over layers as FLAP's ``allocation``).

    In a Mixture-of-Experts block every chosen part is compressed on its own (``experts``: "all" or
    expert ids; ``shared_expert``): routed experts to the per-expert width, the shared expert to the same
    fraction of its width; each part has its own seed and cache key. With calibration each part gets the
    block-input tokens its router sends it (``mlp_io.routed_tokens``; the shared expert all) and its own
    outputs on them; a budget is not available for experts.
    """

    def __init__(self, settings: CompressionSettings, *, identity: str | None = None, device: torch.device | str = "cpu") -> None:
        self.s, self.method = settings, settings.method
        self.dev = torch.device(device)
        self.cache = FusionCache(Path(settings.cache_dir) / self.method.name) if settings.cache_dir is not None else None
        self.options = {**self.method.options, **({"identity": identity} if identity is not None else {})}
        self.uses_calib = settings.needs_calibration
        self.start = time.perf_counter()
        self.widths: dict[int, int] = {}
        self.layer_specs: dict[int, Any] = {}
        self.stats: dict[int, dict[str, float]] = {}
        self.part_stats: dict[tuple[int, str], dict[str, float]] = {}
        self.sparse: set[int] = set()

    def check(self, model: nn.Module, calibrator: Calibrator | None) -> None:
        """Refuse what cannot run before any layer is compressed."""
        s = self.s
        if self.uses_calib and calibrator is None:
            raise ValueError(f"{self.method.name} with refit={s.refit} budget={s.budget} needs calibration data (a Calibrator)")
        sparse = [layer for layer in s.layers if mlp_io.is_sparse(model, layer)]
        if sparse and s.budget is not None:
            raise ValueError(f"a budget ({s.budget}) allocates dense layers' widths; Mixture-of-Experts layers {sparse} keep one per-expert width")

    def allocate(self, model: nn.Module, original: dict[int, MLPCalibration]) -> dict[int, int]:
        """Each chosen layer's width: ``mid_dim``, or the budget's allocation from the original model's
        calibration statistics (``original``, every chosen layer's)."""
        if self.s.budget is None:
            return {layer: self.s.mid_dim for layer in self.s.layers}
        return self.allocate_from(model, {layer: self.evidence(model, layer, original[layer]) for layer in self.s.layers})

    def evidence(self, model: nn.Module, layer: int, calib: MLPCalibration) -> Tensor | dict[int, float]:
        """What the budget ranks layer ``layer`` by, from its calibration on the original model: its neurons' scores
        [d] (``allocation`` one of ``SCORES``), or its calibration error at each candidate width. Layer by layer,
        so that a streamed run can gather it one block at a time."""
        s, w = self.s, mlp_io.read_mlp(model, layer)
        if s.allocation in SCORES:
            return SCORES[s.allocation](w, calib.to(self.dev, torch.float32))
        return {k: self.compress(w, k, layer, calib)[0].stats["calib_err"] for k in candidate_widths(w.width, s.budget)}

    def allocate_from(self, model: nn.Module, evidence: dict[int, Tensor | dict[int, float]]) -> dict[int, int]:
        """The budget's widths from every chosen layer's ``evidence``; ``model``'s MLPs are the original ones (a
        skeleton will do: only their widths are read)."""
        s = self.s
        total = total_neurons(s.budget, [mlp_io.read_mlp(model, layer).width for layer in s.layers])
        widths = allocate_by_scores(evidence, total) if s.allocation in SCORES else allocate(evidence, total)
        log.info("budget %.3f of the chosen layers' MLP parameters by %s: widths %s (%d neurons)", s.budget, s.allocation, widths, total)
        return widths

    def compress(self, w: MLPWeights, width: int, layer: int, calib: MLPCalibration | None, part: str | None = None) -> tuple[Compressed, bool]:
        """One MLP (a layer's, or a part of its block) compressed to ``width``, from the cache where it holds it;
        (result, whether the cache had it)."""
        s, seed = self.s, layer_seed(self.s.seed, layer, part)
        keyed = {"method": self.method.name, "version": self.method.version, "options": self.options, "mid_dim": width, "seed": seed,
                 "device": self.dev.type}
        if part is not None:
            keyed["part"] = part
        if calib is not None:
            keyed.update(calib=calib_hash(calib), refit=s.refit, refit_ridge=s.refit_ridge, refit_toward=s.refit_toward)
        key = cache_key(w, **keyed)
        result = self.cache.get(key, self.dev) if self.cache else None
        if result is not None:
            return result, True
        # on the compute device, in float32 (a bf16 model's k-means and least squares would lose precision);
        # the calibration too: under FSDP the model (and so its activations) stays on the CPU during setup
        w_dev = type(w)(**{k: (v.to(self.dev, torch.float32) if torch.is_tensor(v) else v) for k, v in w.__dict__.items()})
        if calib is not None:
            calib = calib.to(self.dev, torch.float32)
        result = self.method(w_dev, width, seed=seed, calib=calib)
        if calib is not None:  # every refit but none reads calibration data (settings.needs_calibration)
            result = apply_refit(result, calib, s.refit, s.refit_ridge, s.refit_toward)
        if self.cache:
            self.cache.put(key, result)
        return result, False

    def block(self, model: nn.Module, layer: int, width: int, calib: MLPCalibration | None) -> None:
        """Compress layer ``layer``'s MLP (a dense MLP, or each chosen part of a sparse block) to ``width`` in
        place; ``calib``: the layer's calibration (its MLP's inputs X [T, h] and outputs), where used."""
        t0, s = time.perf_counter(), self.s
        self.widths[layer] = width
        if not mlp_io.is_sparse(model, layer):
            result, hit = self.compress(mlp_io.read_mlp(model, layer), width, layer, calib)
            mlp_io.write_mlp(model, layer, result)
            self.stats[layer] = {**{k: float(v) for k, v in result.stats.items()}, "width": float(width),
                                 "seconds": time.perf_counter() - t0, "cache_hit": float(hit)}
            log.info("compressed layer %d with %s to width %d in %.2fs%s", layer, self.method.name, width, self.stats[layer]["seconds"],
                     " (cache hit)" if hit else "")
        else:
            self.sparse.add(layer)
            expert_width = mlp_io.intermediate_sizes(model)[layer]
            routed = mlp_io.routed_tokens(model, layer, calib.x) if calib is not None else {}  # the block's input tokens, then each part's share
            results = {}
            for part in mlp_io.mlp_parts(model, layer, s.experts, s.shared_expert):
                w = mlp_io.read_mlp(model, layer, part)
                # the shared expert keeps the routed experts' fraction: mid_dim / expert width
                k = width if part != mlp_io.SHARED else max(1, round(width * w.width / expert_width))
                part_calib = None
                if calib is not None:
                    x = calib.x[routed[part]] if routed[part].any() else calib.x  # an expert the sample never reaches: all tokens
                    if not routed[part].any():
                        log.warning("layer %d expert %s receives none of the %d calibration tokens: calibrated on all of them", layer, part, len(calib.x))
                    part_calib = MLPCalibration(x=x, y=refit_output(FusedMLP(w), x).to(x.dtype))
                t1 = time.perf_counter()
                results[part], hit = self.compress(w, k, layer, part_calib, part)
                self.part_stats[(layer, part)] = {**{n: float(v) for n, v in results[part].stats.items()}, "width": float(k),
                                                  "seconds": time.perf_counter() - t1, "cache_hit": float(hit)}
            mlp_io.write_parts(model, layer, results)
            rows = [self.part_stats[(layer, p)] for p in results]
            self.stats[layer] = {n: sum(r[n] for r in rows) / len(rows) for n in rows[0]}  # the mean over the block's parts
            self.stats[layer].update(width=float(width), seconds=time.perf_counter() - t0)
            log.info("compressed %d parts of MoE layer %d with %s to width %d in %.2fs (%d cache hits)", len(results), layer, self.method.name,
                     width, self.stats[layer]["seconds"], sum(int(r["cache_hit"]) for r in rows))
        self.layer_specs[layer] = mlp_io.layer_spec(model, layer)

    def report(self, model: nn.Module | None, params_before: int, params_after: int | None = None) -> FusionReport:
        """The run's record, in the settings' layer order; ``params_after`` where ``model`` is not whole in memory."""
        layers = list(self.s.layers)
        spec = self.s.spec({i: self.widths[i] for i in layers}, {i: self.layer_specs[i] for i in layers}, has_experts=bool(self.sparse))
        after = count_params(model) if params_after is None else params_after
        return FusionReport(spec, params_before, after, time.perf_counter() - self.start, {i: self.stats[i] for i in layers}, self.part_stats)


def calib_hash(calib: MLPCalibration) -> str:
    """sha256 of a layer's calibration tensors: the calibration sample's identity in the cache key."""
    h = hashlib.sha256()
    for t in (calib.x, calib.y, *(() if calib.lengths is None else (calib.lengths,))):
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def apply_spec(model: nn.Module, spec: Mapping[str, Any]) -> None:
    """Rebuild the recorded compressed structure (a ``FusionReport.spec``, or an exported config's ``mlp_fusion``: plain
    data) with empty weights (a checkpoint's state dict fills them)."""
    for layer, layer_spec in spec["layer_specs"].items():
        mlp_io.build_from_spec(model, int(layer), mlp_io.spec_from_dict(layer_spec))
