"""A dense MLP (a dense block's, a shared expert, a Switch expert) in any ``DenseLayout``: read, write, record, rebuild."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from src.methods.types import Compressed, FusedMLP, LowRankMLP, MLPWeights
from src.models.replacements import LowRankLinear, ScaledLinear

from . import projections as P
from .families import DenseLayout
from .spec import MLPSpec


@dataclass(frozen=True)
class DenseMLP:
    """One dense MLP: its layout, activation, root's name in the model and root module."""

    layout: DenseLayout
    activation: str
    path: str
    root: nn.Module

    def modules(self) -> dict[str, nn.Module]:
        """The projection modules as they exist ({"gate", "up", "down"} or {"gate_up", "down"})."""
        return {name: self.root.get_submodule(p) for name, p in self.layout.modules().items()}

    def module(self, name: str) -> nn.Module:
        return self.root.get_submodule(self.layout.modules()[name])

    @property
    def width(self) -> int:
        if self.layout.gate_up:
            return P.shape(self.module("gate_up"))[0] // 2
        return P.shape(self.module("up"))[0]

    @property
    def hidden_size(self) -> int:
        return P.shape(self.module("down"))[0]

    def param_names(self) -> list[str]:
        prefix = f"{self.path}." if self.path else ""
        return [f"{prefix}{p}.{n}" for p in self.layout.modules().values() for n, _ in self.root.get_submodule(p).named_parameters()]

    def input_module(self) -> nn.Module:
        return self.root.get_submodule(self.layout.input)

    def forward(self, x: Tensor) -> Tensor:
        """[..., h] -> [..., h]: no dropout, residual or norm."""
        act = self.root.get_submodule(self.layout.act)
        if self.layout.gate_up:
            gate, up = self.module("gate_up")(x).chunk(2, dim=-1)
            hid = act(gate) * up
        elif self.layout.gate:
            hid = act(self.module("gate")(x)) * self.module("up")(x)
        else:
            hid = act(self.module("up")(x))
        return self.module("down")(hid)  # [..., k] -> [..., h]

    # ----------------------------------------------------------------------------------------- read / write

    @torch.no_grad()
    def read(self) -> MLPWeights:
        """The MLP in the [out, in] layout (copies), as the dense MLP it computes (scales folded, factors multiplied)."""
        mods = self.modules()
        b = {n: None if P.bias(m) is None else P.bias(m).detach().clone() for n, m in mods.items()}
        w = {n: P.effective_weight(m).detach().clone() for n, m in mods.items()}
        if self.layout.gate_up:
            if b["gate_up"] is not None:
                raise ValueError(f"{self.path}: a fused gate_up projection with a bias is not supported")
            d = w["gate_up"].shape[0] // 2
            w.update(gate=w["gate_up"][:d], up=w["gate_up"][d:])
            b["up"] = None
        if self.layout.gate and b["gate"] is not None:
            raise ValueError("gated MLPs with a gate bias (mlp_bias=True) are not supported")
        return MLPWeights(up=w["up"], down=w["down"], up_bias=b["up"], down_bias=b["down"], gate=w.get("gate"), activation=self.activation)

    def check(self, activation: str, gated: bool, hidden: int) -> None:
        if activation != self.activation:
            raise ValueError(f"activation {activation!r} != the model's {self.activation!r}")
        if gated != self.layout.gated:
            raise ValueError(f"a {'gated' if gated else 'non-gated'} MLP cannot go into a {self.layout.name} MLP")
        if hidden != self.hidden_size:
            raise ValueError(f"hidden size {hidden} != the model's {self.hidden_size}")

    def _replace(self, name: str, new: nn.Module) -> None:
        """Swap a projection, giving the new module the dtype and device of the one it replaces."""
        device, dtype = P.device_dtype(self.module(name))
        self.root.set_submodule(self.layout.modules()[name], new.to(device=device, dtype=dtype))

    @torch.no_grad()
    def write(self, compressed: MLPWeights | Compressed) -> None:
        """``MLPWeights`` are copied into the existing same-width modules; a ``FusedMLP`` replaces the
        projections with nn.Linear of width k (down: ScaledLinear when it has a scale); a ``LowRankMLP``
        replaces each projection with a LowRankLinear (a fused gate_up: one of rank 2r, block-diagonal left)."""
        if isinstance(compressed, MLPWeights):
            w = compressed
            self.check(w.activation, w.is_gated, w.hidden_size)
            if self.layout.gate_up:
                P.copy_dense(self.module("gate_up"), torch.cat([w.gate, w.up]), None)
            else:
                biases = {"gate": None, "up": w.up_bias, "down": w.down_bias}
                for name in ("gate", "up"):
                    if name in self.layout.modules():
                        P.copy_dense(self.module(name), getattr(w, name), biases[name])
            P.copy_dense(self.module("down"), w.down, w.down_bias)
        elif isinstance(compressed, FusedMLP):
            w = compressed.weights
            self.check(w.activation, w.is_gated, w.hidden_size)
            assert compressed.scale is None or compressed.scale.shape == (w.width,), "scale must be [k]"
            new = {"down": P.linear(w.down, w.down_bias, compressed.scale)}
            if self.layout.gate_up:
                new["gate_up"] = P.linear(torch.cat([w.gate, w.up]), w.up_bias)
            else:
                new["up"] = P.linear(w.up, w.up_bias)
                if w.is_gated:
                    new["gate"] = P.linear(w.gate, None)
            for name, m in new.items():
                self._replace(name, m)
        elif isinstance(compressed, LowRankMLP):
            self._write_lowrank(compressed)
        else:
            raise TypeError(f"cannot write a {type(compressed).__name__}")

    def _write_lowrank(self, f: LowRankMLP) -> None:
        roles = {"gate", "up", "down"} if self.layout.gated else {"up", "down"}
        self.check(f.activation, "gate" in f.factors, f.factors["down"][0].shape[0])
        if set(f.factors) != roles or len({r.shape[0] for _, r in f.factors.values()}) != 1:
            raise ValueError(f"LowRankMLP needs factors for {sorted(roles)} of one common rank")
        biases = {"gate": None, "up": f.up_bias, "down": f.down_bias}
        if self.layout.gate_up:  # [gate; up] = blockdiag(L_gate, L_up) @ [R_gate; R_up]: exact, rank 2r
            (lg, rg), (lu, ru) = f.factors["gate"], f.factors["up"]
            self._replace("gate_up", P.lowrank(torch.block_diag(lg, lu), torch.cat([rg, ru]), None))
            roles = {"down"}
        for role in roles:
            left, right = f.factors[role]
            self._replace(role, P.lowrank(left, right, biases[role]))

    # ----------------------------------------------------------------------------------------- structure records

    def spec(self, pretrained_width: int) -> MLPSpec:
        """The MLP's structure: dense (stock modules at ``pretrained_width``), fused or lowrank, and its biases."""
        mods = self.modules()
        down = mods["down"]
        native = Conv1D if self.layout.conv1d else nn.Linear
        if isinstance(down, LowRankLinear):
            kind = "lowrank"
        elif all(type(m) is native for m in mods.values()) and self.width == pretrained_width:
            kind = "dense"
        else:
            kind = "fused"
        up = mods.get("up", mods.get("gate_up"))
        return MLPSpec(kind, self.width, scaled=isinstance(down, ScaledLinear), rank=down.rank if kind == "lowrank" else None,
                       up_bias=P.bias(up) is not None, down_bias=P.bias(down) is not None)

    @torch.no_grad()
    def build(self, spec: MLPSpec) -> None:
        """Replace the projections with zero-initialised modules of the structure ``spec`` (from ``spec``)."""
        h, k, kind, r = self.hidden_size, spec.width, spec.kind, spec.rank
        conv1d = self.layout.conv1d
        new = {"down": P.empty(kind, h, k, spec.down_bias, rank=r, scaled=spec.scaled, conv1d=conv1d)}
        if self.layout.gate_up:
            new["gate_up"] = P.empty(kind, 2 * k, h, spec.up_bias, rank=None if r is None else 2 * r)
        else:
            new["up"] = P.empty(kind, k, h, spec.up_bias, rank=r, conv1d=conv1d)
            if self.layout.gate:
                new["gate"] = P.empty(kind, k, h, False, rank=r)
        for name, m in new.items():
            self._replace(name, m)
