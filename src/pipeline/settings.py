"""A run's compression settings, resolved once: what the fusion callback, ``compress_model``, the
checkpoint's record, ``src.approx``, ``src.train``'s results and the benchmarks read.

:meth:`CompressionSettings.from_config` builds them from ``conf/ffn_mode`` and the model's shape (its
config, before any weights load): it fills the layers and the width the config leaves null and refuses
a bad setting in one sentence. ``src.preflight`` calls it, once per run; tests and scripts build
settings without a config with :meth:`CompressionSettings.of`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from src.methods.method import Method
from src.methods.refit import REFITS, TOWARDS
from src.methods.types import OptionError
from src.utils.errors import ConfigError

from .budget import ALLOCATIONS

if TYPE_CHECKING:
    from src.methods.types import Compressed
    from src.models.mlp_io import LayerSpec, ModelShape

# The options that make a variant of a method (ntk_keep at keep 0.25 is not ntk_keep at 0.5): src.train
# records them in results.json (``CompressionSettings.variant``) and src.report gives each variant its own row.
VARIANT_OPTIONS = ("keep", "refit", "weighting", "budget", "allocation")

CALIB_SOURCES = ("task", "mixed")  # ffn_mode.calib.source


@dataclass(frozen=True)
class CalibSettings:
    """The calibration sample (``ffn_mode.calib``): ``size`` training inputs drawn with ``seed``, read in
    batches of ``batch_size``; ``sequential``: each layer sees the inputs of the model compressed up to it."""

    size: int = 0
    seed: int = 0
    sequential: bool = True
    batch_size: int = 32
    source: str = "task"  # one of CALIB_SOURCES: task | mixed (half the sample general text, src.data.general_text)


@dataclass(frozen=True)
class CompressionSettings:
    """Which layers to compress, how, and with what (``conf/ffn_mode/_base.yaml`` says what each means)."""

    method: Method
    layers: tuple[int, ...]
    mid_dim: int
    seed: int = 0
    refit: str = "none"  # one of refit.REFITS
    refit_ridge: float | str = 1e-3  # or "auto": chosen on held-out calibration sequences
    refit_toward: str = "zero"  # one of refit.TOWARDS: what the ridge shrinks the refit toward
    budget: float | None = None
    allocation: str = "error"  # how a budget's neurons are spread over layers: one of budget.ALLOCATIONS
    experts: str | tuple[int, ...] = "all"  # Mixture-of-Experts models: "all" or routed expert ids
    shared_expert: bool = True
    re_init_layers: tuple[int, ...] = ()
    calib: CalibSettings = field(default_factory=CalibSettings)
    cache_dir: str | None = None  # the fusion cache's root (a folder per method under it); None: no cache

    @classmethod
    def from_config(cls, f: Mapping[str, Any], method: Method, shape: ModelShape, fusion_defaults: Mapping[str, Any],
                    model: str) -> CompressionSettings:
        """The settings ``f`` (``cfg.ffn_mode`` as plain values) says for compressing with ``method`` a model of ``shape``
        (``model`` names it): the layers and width ``f`` leaves null from ``fusion_defaults`` (``model.fusion_defaults``:
        the top ``top_layers`` fraction of each stack, ``width`` of the MLP width), then each option checked, the
        method's own last (its ``check`` hook); a bad one is a ConfigError of one sentence."""
        layers = _layers(shape.top_layers(fusion_defaults["top_layers"]) if f.get("layers") is None else f["layers"], shape)
        experts = _experts(f, shape, layers, model)
        d = shape.width
        mid_dim = max(1, round(fusion_defaults["width"] * d)) if f.get("mid_dim") is None else f["mid_dim"]
        _positive(mid_dim, "ffn_mode.mid_dim")
        if not 1 <= mid_dim <= d - 1:
            raise ConfigError(f"ffn_mode.mid_dim={mid_dim} is out of range: the model's MLPs have width {d}, so allowed is 1..{d - 1}.")
        extra = [i for i in f.get("re_init_layers") or [] if i not in layers]
        if extra:
            raise ConfigError(f"ffn_mode.re_init_layers has {extra}, which are not among ffn_mode.layers={layers}.")
        c = f["calib"]
        if not _whole(c["size"]) or c["size"] < 0:
            raise ConfigError(f"ffn_mode.calib.size={c['size']!r} must be a non-negative integer (0 = data-free).")
        _positive(c["batch_size"], "ffn_mode.calib.batch_size")
        for setting, value, allowed in (("calib.source", c["source"], CALIB_SOURCES), ("refit", f["refit"], REFITS),
                                        ("refit_toward", f["refit_toward"], TOWARDS), ("allocation", f["allocation"], ALLOCATIONS)):
            if value not in allowed:
                raise ConfigError(f"ffn_mode.{setting}={value!r} must be one of {', '.join(allowed)}.")
        if c["source"] == "mixed" and len(shape.stacks) > 1:
            raise ConfigError("ffn_mode.calib.source=mixed adds general text as decoder-less inputs, which an encoder-decoder model "
                              "cannot take: use ffn_mode.calib.source=task.")
        ridge = f["refit_ridge"]
        if ridge != "auto" and (isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or ridge <= 0):
            raise ConfigError(f"ffn_mode.refit_ridge={ridge!r} must be a positive number or auto (chosen on held-out calibration sequences).")
        budget = f["budget"]
        if budget is not None and not (isinstance(budget, float) and 0 < budget < 1):
            raise ConfigError(f"ffn_mode.budget={budget!r} must be a fraction of the chosen layers' MLP parameters in (0, 1), e.g. 0.25.")
        if shape.experts and budget is not None:
            raise ConfigError(f"ffn_mode.budget={budget} allocates per-layer widths, but model={model} is a Mixture-of-Experts "
                              "model, whose compressed experts keep one per-expert width (ffn_mode.mid_dim): leave the budget at null.")
        s = cls(method=method, layers=tuple(layers), mid_dim=mid_dim, seed=f["seed"], refit=f["refit"], refit_ridge=ridge,
                refit_toward=f["refit_toward"], budget=budget, allocation=f["allocation"], experts=experts,
                shared_expert=f.get("shared_expert", True), re_init_layers=tuple(f.get("re_init_layers") or ()),
                calib=CalibSettings(c["size"], c["seed"], c["sequential"], c["batch_size"], c["source"]),
                cache_dir=f["cache_dir"] if f["cache"] else None)
        if s.calib.size == 0 and s.needs_calibration:
            what = f"refit={s.refit}" if s.refit != "none" else "a budget" if s.budget is not None else f"ffn_mode={method.name} with these options"
            raise ConfigError(f"ffn_mode.calib.size=0 is data-free, but {what} needs calibration data: set ffn_mode.calib.size > 0.")
        try:
            method.validate(d, mid_dim, s.calib.size)
        except OptionError as e:
            raise ConfigError(f"ffn_mode.{e}") from None
        return s

    @classmethod
    def of(cls, fn: Callable[..., Compressed], layers: Iterable[int], mid_dim: int, *, name: str | None = None,
           **settings: Any) -> CompressionSettings:
        """Settings for compressing with ``fn`` (a method's compress, or a partial with its options) without
        a config; the other fields keep their defaults unless given."""
        return cls(method=Method.of(fn, name), layers=tuple(layers), mid_dim=mid_dim, **settings)

    def resolved(self) -> dict[str, Any]:
        """What these settings filled in where ``ffn_mode`` may leave them null (the model's defaults): ``src.train``
        records them in ``results.json`` and W&B's run config."""
        return {"mid_dim": self.mid_dim, "layers": list(self.layers)}

    @property
    def needs_calibration(self) -> bool:
        """Whether compressing reads calibration data: a refit, a budget, or a method that declares it."""
        return self.refit != "none" or self.budget is not None or self.method.needs_calibration

    def variant(self) -> dict[str, Any]:
        """The variant options (``VARIANT_OPTIONS``) these settings have: refit and budget, and the method's own
        keep or weighting where it takes them."""
        values = {**self.method.options, "refit": self.refit, "budget": self.budget,
                  **({"allocation": self.allocation} if self.budget is not None else {})}
        return {k: values[k] for k in VARIANT_OPTIONS if k in values}

    def _experts(self) -> str | list[int]:
        return self.experts if self.experts == "all" else list(self.experts)

    def spec(self, widths: Mapping[int, int], layer_specs: Mapping[int, LayerSpec], has_experts: bool) -> dict[str, Any]:
        """What a checkpoint records (``checkpoint["fusion"]``, plain data), from the widths and structures the compression
        produced; the experts settings where compressed blocks hold experts."""
        spec = {"method": self.method.name, "layers": list(self.layers), "mid_dim": self.mid_dim, "seed": self.seed,
                "widths": {str(i): k for i, k in widths.items()}, "budget": self.budget, "allocation": self.allocation, "refit": self.refit,
                "layer_specs": {str(i): s.as_dict() for i, s in layer_specs.items()}}
        if has_experts:
            spec.update(experts=self._experts(), shared_expert=self.shared_expert)
        return spec

    def matches(self, spec: Mapping[str, Any]) -> bool:
        """Whether a checkpoint's record (``spec``) holds this compression: method, layers, width, budget and
        experts (a record without experts, of a dense model or an older one, matches any)."""
        experts = self._experts()
        return (spec["method"] == self.method.name and list(spec["layers"]) == list(self.layers) and spec["mid_dim"] == self.mid_dim
                and spec.get("budget") == self.budget and spec.get("experts", experts) == experts)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive(value: Any, setting: str) -> None:
    if not _whole(value) or value < 1:
        raise ConfigError(f"{setting}={value!r} must be a positive integer.")


def _layers(layers: Any, shape: ModelShape) -> list[int]:
    """``ffn_mode.layers``: a non-empty list of distinct layer indices of the model."""
    if not isinstance(layers, list) or not all(_whole(i) for i in layers):
        raise ConfigError(f"ffn_mode.layers={layers!r} must be a list of layer indices, e.g. [2,3,4,5].")
    if not layers:
        raise ConfigError("ffn_mode.layers=[] is empty: list at least one layer, or use ffn_mode=none.")
    bad = [i for i in layers if not 0 <= i < shape.num_layers]
    if bad:
        raise ConfigError(f"ffn_mode.layers has {bad} out of range: the model has layers 0..{shape.num_layers - 1}.")
    if len(set(layers)) != len(layers):
        raise ConfigError(f"ffn_mode.layers={layers} repeats a layer; each layer can be compressed once.")
    return layers


def _experts(f: Mapping[str, Any], shape: ModelShape, layers: list[int], model: str) -> str | tuple[int, ...]:
    """Mixture-of-Experts options: ``ffn_mode.experts`` (all, or expert ids in range), ``ffn_mode.shared_expert``, and
    every chosen block holds experts; a dense model takes only the default ``experts=all``. Returns the experts."""
    experts = f.get("experts", "all")
    if not shape.experts:
        if experts != "all":
            raise ConfigError(f"ffn_mode.experts={experts!r} applies to Mixture-of-Experts models, but model={model} is dense: leave it at all.")
        return "all"
    if experts != "all":
        if not isinstance(experts, list) or not experts or not all(_whole(e) for e in experts):
            raise ConfigError(f"ffn_mode.experts={experts!r} must be all or a non-empty list of expert ids, e.g. [0,3].")
        bad = [e for e in experts if not 0 <= e < shape.experts]
        if bad:
            raise ConfigError(f"ffn_mode.experts has {bad} out of range: model={model} has experts 0..{shape.experts - 1} in each sparse block.")
        if len(set(experts)) != len(experts):
            raise ConfigError(f"ffn_mode.experts={experts} repeats an expert; each expert can be compressed once.")
    if not isinstance(f.get("shared_expert", True), bool):
        raise ConfigError(f"ffn_mode.shared_expert={f['shared_expert']!r} must be true or false.")
    dense = [i for i in layers if i not in shape.sparse]
    if dense:
        raise ConfigError(f"ffn_mode.layers has {dense}, blocks without experts: model={model} holds experts in blocks {list(shape.sparse)}.")
    return experts if experts == "all" else tuple(experts)
