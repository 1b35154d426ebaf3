"""A layer's MLP structure as typed records: what ``layer_spec`` reads and ``build_from_spec`` rebuilds.

Where the structure is written down (a checkpoint's ``fusion`` record, an exported folder's
``config.json``) it is plain data, ``as_dict()``; ``spec_from_dict`` reads such a dict back, as every
record written so far holds it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal, get_args

MLPKind = Literal["dense", "fused", "lowrank"]
KINDS: tuple[str, ...] = get_args(MLPKind)


@dataclass(frozen=True)
class MLPSpec:
    """One dense MLP's structure, or that of a sparse block's routed experts (all of one structure).

    ``kind``: dense (the stock projections at the pretrained width), fused (nn.Linear projections of
    another width, or a count scale) or lowrank (factor pairs of ``rank``); ``scaled``: the down
    projection carries a frozen count scale. ``up_bias`` and ``down_bias`` say whether the up (or fused
    gate_up) and the down projection have a bias; None for routed experts, whose layout fixes them.
    """

    kind: MLPKind
    width: int
    scaled: bool = False
    rank: int | None = None
    up_bias: bool | None = None
    down_bias: bool | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown MLP kind {self.kind!r}")

    def as_dict(self) -> dict[str, Any]:
        """Plain data: kind, width, scaled, rank, and the two biases where they are known."""
        return {k: v for k, v in asdict(self).items() if v is not None or k not in ("up_bias", "down_bias")}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MLPSpec:
        """The record ``as_dict`` writes (routed experts' without biases)."""
        return cls(d["kind"], d["width"], d["scaled"], d["rank"], d.get("up_bias"), d.get("down_bias"))


@dataclass(frozen=True)
class MoESpec:
    """A sparse block's structure: its routed experts' and its shared expert's (None where it has none)."""

    experts: MLPSpec
    shared: MLPSpec | None = None
    kind: ClassVar[str] = "moe"

    def as_dict(self) -> dict[str, Any]:
        """Plain data: {"kind": "moe", "experts": ..., "shared": ... or None}."""
        return {"kind": self.kind, "experts": self.experts.as_dict(), "shared": None if self.shared is None else self.shared.as_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MoESpec:
        """The record ``as_dict`` writes."""
        return cls(MLPSpec.from_dict(d["experts"]), None if d.get("shared") is None else MLPSpec.from_dict(d["shared"]))


LayerSpec = MLPSpec | MoESpec


def spec_from_dict(d: Mapping[str, Any]) -> LayerSpec:
    """A recorded layer structure (``as_dict``'s plain data) read back; ValueError for an unknown kind."""
    return MoESpec.from_dict(d) if d["kind"] == MoESpec.kind else MLPSpec.from_dict(d)
