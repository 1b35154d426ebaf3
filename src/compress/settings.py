"""A run's compression settings, resolved once: what the fusion callback, ``compress_model``, the
checkpoint's record, ``src.approx``, ``src.train``'s results and the benchmarks read.

``src.builders.compression_settings`` builds them from ``conf/ffn_mode`` after the preflight filled
in the layers and the width; tests and scripts build them with :meth:`CompressionSettings.of`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .method import Method

if TYPE_CHECKING:
    from .types import Compressed

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
    source: str = "task"  # task | mixed (half the sample general text, src.data.general_text)


@dataclass(frozen=True)
class CompressionSettings:
    """Which layers to compress, how, and with what (``conf/ffn_mode/_base.yaml`` says what each means)."""

    method: Method
    layers: tuple[int, ...]
    mid_dim: int
    seed: int = 0
    refit: str = "none"  # none | lstsq | bias
    refit_ridge: float | str = 1e-3  # or "auto": chosen on held-out calibration sequences
    refit_toward: str = "zero"  # zero | compressed: what the ridge shrinks the refit toward
    budget: float | None = None
    allocation: str = "error"  # how a budget's neurons are spread over layers: error | flap | wanda_sp
    experts: str | tuple[int, ...] = "all"  # Mixture-of-Experts models: "all" or routed expert ids
    shared_expert: bool = True
    re_init_layers: tuple[int, ...] = ()
    calib: CalibSettings = field(default_factory=CalibSettings)
    cache_dir: str | None = None  # the fusion cache's root (a folder per method under it); None: no cache

    @classmethod
    def of(cls, fn: Callable[..., Compressed], layers: Iterable[int], mid_dim: int, *, name: str | None = None,
           **settings: Any) -> CompressionSettings:
        """Settings for compressing with ``fn`` (a method's compress, or a partial with its options) without
        a config; the other fields keep their defaults unless given."""
        return cls(method=Method.of(fn, name), layers=tuple(layers), mid_dim=mid_dim, **settings)

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

    def spec(self, widths: Mapping[int, int], layer_specs: Mapping[int, dict[str, Any]], has_experts: bool) -> dict[str, Any]:
        """What a checkpoint records (``checkpoint["fusion"]``), from the widths and structures the compression
        produced; the experts settings where compressed blocks hold experts."""
        spec = {"method": self.method.name, "layers": list(self.layers), "mid_dim": self.mid_dim, "seed": self.seed,
                "widths": {str(i): k for i, k in widths.items()}, "budget": self.budget, "allocation": self.allocation, "refit": self.refit,
                "layer_specs": {str(i): s for i, s in layer_specs.items()}}
        if has_experts:
            spec.update(experts=self._experts(), shared_expert=self.shared_expert)
        return spec

    def matches(self, spec: Mapping[str, Any]) -> bool:
        """Whether a checkpoint's record (``spec``) holds this compression: method, layers, width, budget and
        experts (a record without experts, of a dense model or an older one, matches any)."""
        experts = self._experts()
        return (spec["method"] == self.method.name and list(spec["layers"]) == list(self.layers) and spec["mid_dim"] == self.mid_dim
                and spec.get("budget") == self.budget and spec.get("experts", experts) == experts)
