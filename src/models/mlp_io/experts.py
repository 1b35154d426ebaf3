"""A sparse (Mixture-of-Experts) block: router, routed experts, optional shared expert.

Two layouts of the routed experts, one class each, behind one interface (``MoEBlock``):

- ``FusedExperts`` (Mixtral, OLMoE, Qwen2/3-MoE, DeepSeek-V3, gpt-oss; transformers 5): one module with
  3-D parameters ``gate_up_proj`` [E, 2d, h] (gate rows first, then up) and ``down_proj`` [E, h, d], no
  biases, and a top-k router whose forward returns (logits, weights, indices [T, k]); or, as the row's
  ``transposed``/``interleaved``/``bias`` flags say (gpt-oss: transformers' ``is_transposed``,
  ``is_concatenated=False``, ``has_bias``), [E, h, 2d] with gate and up columns alternating, [E, d, h]
  and biases ``gate_up_proj_bias`` [E, 2d], ``down_proj_bias`` [E, h]. Compressed
  experts are written back as one stock experts module of one width (the widest part; narrower
  experts zero-padded), a frozen [E, k] count scale as an ``ExpertScale`` parametrization of
  ``down_proj``, low-rank experts as an ``ExpertLowRank`` factor parametrization.
- ``ModuleExperts`` (Switch Transformers): a ``ModuleDict`` of ``expert_<e>`` dense MLPs (T5's
  ``wi``/``wo``) and a top-1 router with a ``classifier``; compressed experts are written back as
  nn.Linear modules of one width per block, the count scale a ``ScaledLinear`` ``wo`` per expert.

A block's parts are its experts (``"0"``, ``"1"``, ...) and ``"shared"``; each reads as an ``MLPWeights``.
The router and any shared-expert gate are never touched.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from transformers import PretrainedConfig

from src.methods.types import Compressed, FusedMLP, LowRankMLP, MLPWeights
from src.models.replacements import ExpertLowRank, ExpertScale, expert_canonical, expert_native

from . import projections as P
from .dense import DenseMLP
from .families import Family
from .spec import MLPSpec, MoESpec

SHARED = "shared"  # the part name of a block's shared expert; routed experts are "0", "1", ...


@dataclass(frozen=True)
class MoEBlock:
    """One transformer block's sparse MLP. Subclasses implement the routed experts' layout."""

    family: Family
    config: PretrainedConfig
    path: str
    root: nn.Module

    @property
    def activation(self) -> str:
        return self.family.activation(self.config)

    @property
    def experts(self) -> nn.Module:
        return self.root.get_submodule(self.family.experts.path)

    @property
    def router(self) -> nn.Module:
        return self.root.get_submodule(self.family.experts.router)

    @property
    def shared(self) -> DenseMLP | None:
        """The shared expert as a dense MLP, or None."""
        path = self.family.experts.shared
        return None if path is None else DenseMLP(self.family.mlp, self.activation, f"{self.path}.{path}", self.root.get_submodule(path))

    @property
    def num_experts(self) -> int:
        return int(getattr(self.config, self.family.experts.num_attr))

    def parts(self, experts: list[int] | str = "all", shared_expert: bool = True) -> list[str]:
        ids = range(self.num_experts) if experts == "all" else list(experts)
        bad = [e for e in ids if not 0 <= e < self.num_experts]
        if bad:
            raise IndexError(f"experts {bad} out of range: {self.path} has experts 0..{self.num_experts - 1}")
        return [str(e) for e in ids] + ([SHARED] if shared_expert and self.shared is not None else [])

    def read(self, part: str) -> MLPWeights:
        if part == SHARED:
            if self.shared is None:
                raise ValueError(f"{self.path} has no shared expert")
            return self.shared.read()
        e = int(part)
        if not 0 <= e < self.num_experts:
            raise IndexError(f"expert {e} out of range: {self.path} has experts 0..{self.num_experts - 1}")
        return self.read_expert(e)

    def modules(self) -> dict[str, nn.Module]:
        shared = self.shared
        return {"experts": self.experts} | ({f"shared_{n}": m for n, m in shared.modules().items()} if shared else {})

    def param_names(self) -> list[str]:
        names = [f"{self.path}.{self.family.experts.path}.{n}" for n, _ in self.experts.named_parameters()]
        return names + (self.shared.param_names() if self.shared else [])

    @torch.no_grad()
    def routed_tokens(self, x: Tensor) -> dict[str, Tensor]:
        """Which of the block's input tokens x [T, h] each part sees, as masks [T] bool: a routed expert its
        tokens under the block's own router (its top-k), the shared expert every token."""
        chosen = self.chosen(x)  # [T, k]
        masks = {str(e): (chosen == e).any(-1) for e in range(self.num_experts)}
        if self.shared is not None:
            masks[SHARED] = torch.ones(len(x), dtype=torch.bool, device=x.device)
        return masks

    @torch.no_grad()
    def router_counts(self, x: Tensor) -> Tensor:
        """How many of the tokens x [N, h] the router sends to each expert, [E] (a token counts once per top-k expert)."""
        return torch.bincount(self.chosen(x).reshape(-1), minlength=self.num_experts)

    def forward(self, x: Tensor) -> Tensor:
        # the block takes [B, T, h]; sequences stay sequences (Switch's expert capacity counts per sequence)
        out = self.root(x if x.ndim == 3 else x.reshape(1, -1, x.shape[-1]))
        return (out[0] if isinstance(out, tuple) else out).reshape(x.shape)  # gpt-oss: (hidden states, router scores)

    def check_expert(self, activation: str, gated: bool, hidden: int, biased: bool) -> None:
        want, bias = self.expert_gated, self.expert_biased
        if activation != self.activation or gated != want or hidden != self.hidden_size or biased != bias:
            kind = lambda g, b: f"{'gated' if g else 'non-gated'}{' biased' if b else ''}"  # noqa: E731
            raise ValueError(f"an expert of {self.path} must be a {kind(want, bias)} {self.activation!r} MLP of hidden "
                             f"size {self.hidden_size}, got a {kind(gated, biased)} {activation!r} of {hidden}")

    @torch.no_grad()
    def write(self, results: dict[str, MLPWeights | Compressed]) -> None:
        """Write several parts at once. The routed experts stay one width, the widest expert's (parts not
        written keep their weights); a narrower expert is zero-padded and its padding neurons get scale 0.
        Low-rank experts must cover every expert at one rank. The shared expert is written as a dense MLP."""
        results = dict(results)
        if SHARED in results:
            if self.shared is None:
                raise ValueError(f"{self.path} has no shared expert")
            self.shared.write(results.pop(SHARED))
        if not results:
            return
        experts = {int(p): c for p, c in results.items()}
        if any(not 0 <= e < self.num_experts for e in experts):
            raise IndexError(f"experts {sorted(experts)} out of range: {self.path} has experts 0..{self.num_experts - 1}")
        if any(isinstance(c, LowRankMLP) for c in experts.values()):
            fs = [experts.get(e) for e in range(self.num_experts)]
            if not all(isinstance(c, LowRankMLP) for c in fs):
                raise ValueError(f"low-rank experts must cover every expert of {self.path} (0..{self.num_experts - 1}), all low rank")
            if len({c.rank for c in fs}) != 1 or any(set(c.factors) != self.expert_roles for c in fs):
                raise ValueError(f"low-rank experts of {self.path} need {', '.join(sorted(self.expert_roles))} factors of one common rank")
            for c in fs:
                self.check_expert(c.activation, "gate" in c.factors, c.factors["down"][0].shape[0], c.up_bias is not None)
            self.write_lowrank(fs)
            return
        # every expert as (weights, scale or None): the new results, the current weights for the rest
        current = {e: (self.read_expert(e), None) for e in range(self.num_experts) if e not in experts}
        parts = {**current, **{e: (c.weights, c.scale) if isinstance(c, FusedMLP) else (c, None) for e, c in experts.items()}}
        for w, _ in parts.values():
            self.check_expert(w.activation, w.is_gated, w.hidden_size, w.up_bias is not None)
        k = max(w.width for w, _ in parts.values())
        scale = torch.zeros(self.num_experts, k)  # [E, k]: counts, 1 for unscaled neurons, 0 on the padding
        for e, (w, s) in parts.items():
            scale[e, : w.width] = 1 if s is None else s.float().cpu()
        scaled = any(s is not None or w.width < k for w, s in parts.values())
        self.write_experts({e: w for e, (w, _) in parts.items()}, k, scale if scaled else None)

    def spec(self) -> MoESpec:
        """The block's structure: its routed experts' (biases left to the layout) and its shared expert's, if any."""
        shared = self.shared
        return MoESpec(self.experts_spec(), shared.spec(self.family.experts.shared_width(self.config)) if shared else None)

    @torch.no_grad()
    def build(self, spec: MoESpec) -> None:
        """Replace the experts (and the shared expert) with zero-initialised modules of the structure ``spec``."""
        self.build_experts(spec.experts)
        if spec.shared is not None:
            self.shared.build(spec.shared)

    # layout-specific: ``expert_roles``, ``expert_gated`` and ``expert_biased`` (what an expert is), ``width``
    # (the experts' common, padded intermediate size), ``hidden_size`` and the methods below ------------------

    def chosen(self, x: Tensor) -> Tensor:
        """The router's chosen experts of tokens x [T, h], [T, k]."""
        raise NotImplementedError

    def read_expert(self, e: int) -> MLPWeights:
        raise NotImplementedError

    def write_experts(self, weights: dict[int, MLPWeights], k: int, scale: Tensor | None) -> None:
        raise NotImplementedError

    def write_lowrank(self, fs: list[LowRankMLP]) -> None:
        raise NotImplementedError

    def experts_spec(self) -> MLPSpec:
        raise NotImplementedError

    def build_experts(self, ex: MLPSpec) -> None:
        raise NotImplementedError


class FusedExperts(MoEBlock):
    """Routed experts as one module of 3-D parameters (see the module docstring)."""

    expert_roles = {"gate", "up", "down"}
    expert_gated = True

    @property
    def expert_biased(self) -> bool:
        return self.family.experts.bias

    def canonical(self, name: str) -> Tensor:
        """A parameter of the experts (parametrizations applied) in the canonical layout: ``gate_up_proj``
        [E, 2k, h] and its bias [E, 2k] gate first, ``down_proj`` [E, h, k]."""
        ex = self.family.experts
        return expert_canonical(getattr(self.experts, name), ex.transposed and name != "down_proj_bias", ex.interleaved and name.startswith("gate_up"))

    def native(self, name: str, t: Tensor) -> Tensor:
        ex = self.family.experts
        return expert_native(t, ex.transposed and name != "down_proj_bias", ex.interleaved and name.startswith("gate_up"))

    @property
    def width(self) -> int:
        return self.experts.down_proj.shape[1 if self.family.experts.transposed else 2]

    @property
    def hidden_size(self) -> int:
        return self.experts.down_proj.shape[2 if self.family.experts.transposed else 1]

    def chosen(self, x: Tensor) -> Tensor:
        return self.router(x.to(self.router.weight.dtype))[2]  # (logits, top-k weights, top-k ids [T, k])

    def read_expert(self, e: int) -> MLPWeights:
        k = self.width
        gate_up, down = self.canonical("gate_up_proj")[e], self.canonical("down_proj")[e]  # [2k, h] (gate rows, then up rows), [h, k]
        biases = {}
        if self.family.experts.bias:
            b = self.canonical("gate_up_proj_bias")[e]  # [2k]
            biases = dict(gate_bias=b[:k].detach().clone(), up_bias=b[k:].detach().clone(), down_bias=self.experts.down_proj_bias[e].detach().clone())
        return MLPWeights(up=gate_up[k:].detach().clone(), down=down.detach().clone(), gate=gate_up[:k].detach().clone(),
                          activation=self.activation, **biases)

    def _stock(self, width: int) -> nn.Module:
        """A new, uninitialised experts module of the block's own (stock transformers) class at ``width``."""
        old = self.experts
        cls = type(old).__mro__[1] if parametrize.is_parametrized(old) else type(old)  # past parametrize's injected class
        config = copy.copy(getattr(old, "config", None) or self.config)  # keeps _experts_implementation
        setattr(config, self.family.experts.width_attr, width)
        device, dtype = P.device_dtype(old)
        with torch.device("meta"):
            new = cls(config)
        return new.to_empty(device=device).to(dtype)

    def _copy_biases(self, module: nn.Module, biases: dict[int, tuple[Tensor, Tensor, Tensor]], k: int) -> None:
        """Each expert's (gate bias [d], up bias [d], down bias [h]) into ``module`` (zero on padding neurons);
        nothing in a layout without biases."""
        if not self.expert_biased:
            return
        gate_up, down = module.gate_up_proj_bias.new_zeros(self.num_experts, 2 * k), torch.zeros_like(module.down_proj_bias)  # [E, 2k], [E, h]
        for e, (g, u, b) in biases.items():
            gate_up[e, : len(g)], gate_up[e, k : k + len(u)], down[e] = g, u, b
        module.gate_up_proj_bias.copy_(self.native("gate_up_proj_bias", gate_up))
        module.down_proj_bias.copy_(down)

    def write_experts(self, weights: dict[int, MLPWeights], k: int, scale: Tensor | None) -> None:
        module, E, h = self._stock(k), self.num_experts, self.hidden_size
        gate_up = module.gate_up_proj.new_zeros(E, 2 * k, h)
        down = module.down_proj.new_zeros(E, h, k)
        for e, w in weights.items():
            d = w.width
            gate_up[e, :d], gate_up[e, k : k + d], down[e, :, :d] = w.gate, w.up, w.down
        module.gate_up_proj.copy_(self.native("gate_up_proj", gate_up))
        module.down_proj.copy_(self.native("down_proj", down))
        self._copy_biases(module, {e: (w.gate_bias, w.up_bias, w.down_bias) for e, w in weights.items()}, k)
        if scale is not None:
            s = ExpertScale(scale.to(device=down.device, dtype=down.dtype), transposed=self.family.experts.transposed)
            parametrize.register_parametrization(module, "down_proj", s)
        self.root.set_submodule(self.family.experts.path, module)

    def _lowrank(self, module: nn.Module, name: str, factors: list[tuple[Tensor, Tensor]]) -> None:
        ex = self.family.experts
        lowrank = ExpertLowRank(factors, transposed=ex.transposed, interleaved=ex.interleaved and name == "gate_up_proj")
        parametrize.register_parametrization(module, name, lowrank)

    def write_lowrank(self, fs: list[LowRankMLP]) -> None:
        k = fs[0].factors["up"][0].shape[0]
        module = self._stock(k)
        stack = lambda role, side: torch.stack([c.factors[role][side] for c in fs])  # noqa: E731  [E, out, r] / [E, r, in]
        self._lowrank(module, "gate_up_proj", [(stack("gate", 0), stack("gate", 1)), (stack("up", 0), stack("up", 1))])
        self._lowrank(module, "down_proj", [(stack("down", 0), stack("down", 1))])
        self._copy_biases(module, {e: (c.gate_bias, c.up_bias, c.down_bias) for e, c in enumerate(fs)}, k)  # biases stay dense, width k
        self.root.set_submodule(self.family.experts.path, module)

    def fused_weights(self) -> list[str]:
        """Full names of the routed experts' 3-D projection weights as they are stored, where a LoRA update can add to
        them: none when they are low-rank factors (svd) or carry a count scale (``fold_scales`` first)."""
        if parametrize.is_parametrized(self.experts):
            return []
        return [f"{self.path}.{self.family.experts.path}.{n}" for n in ("gate_up_proj", "down_proj")]

    def experts_spec(self) -> MLPSpec:
        ex = self.experts
        lowrank = parametrize.is_parametrized(ex, "gate_up_proj")
        scaled = not lowrank and parametrize.is_parametrized(ex, "down_proj")
        pretrained = getattr(self.config, self.family.experts.width_attr)
        kind = "lowrank" if lowrank else "dense" if not scaled and self.width == pretrained else "fused"
        rank = ex.parametrizations.gate_up_proj.original0.shape[-1] if lowrank else None
        return MLPSpec(kind, self.width, scaled=scaled, rank=rank)

    def build_experts(self, ex: MLPSpec) -> None:
        module = self._stock(ex.width)
        for p in module.parameters():
            p.zero_()
        E, h, k = self.num_experts, self.hidden_size, ex.width
        z = lambda *shape: module.gate_up_proj.new_zeros(shape)  # noqa: E731
        if ex.kind == "lowrank":
            r = ex.rank
            self._lowrank(module, "gate_up_proj", [(z(E, k, r), z(E, r, h)), (z(E, k, r), z(E, r, h))])
            self._lowrank(module, "down_proj", [(z(E, h, r), z(E, r, k))])
        elif ex.scaled:
            parametrize.register_parametrization(module, "down_proj", ExpertScale(z(E, k), transposed=self.family.experts.transposed))
        self.root.set_submodule(self.family.experts.path, module)


class ModuleExperts(MoEBlock):
    """Routed experts as a ModuleDict of dense MLPs (Switch Transformers)."""

    def expert(self, e: int) -> DenseMLP:
        prefix = self.family.experts.expert_prefix
        return DenseMLP(self.family.mlp, self.activation, f"{self.path}.{self.family.experts.path}.{prefix}{e}", self.experts[f"{prefix}{e}"])

    @property
    def expert_roles(self) -> set[str]:
        return {"gate", "up", "down"} if self.family.mlp.gated else {"up", "down"}

    @property
    def expert_gated(self) -> bool:
        return self.family.mlp.gated

    expert_biased = False  # Switch's experts: T5's bias-free wi / wo

    @property
    def width(self) -> int:
        return self.expert(0).width

    @property
    def hidden_size(self) -> int:
        return self.expert(0).hidden_size

    def chosen(self, x: Tensor) -> Tensor:
        # the classifier's top-1 (the router's forward also applies the per-batch expert capacity, left out here)
        return self.router.classifier(x.to(self.router.classifier.weight.dtype)).argmax(-1, keepdim=True)  # [T, 1]

    def read_expert(self, e: int) -> MLPWeights:
        return self.expert(e).read()

    def write_experts(self, weights: dict[int, MLPWeights], k: int, scale: Tensor | None) -> None:
        """Every expert at width ``k``: ``wi`` an nn.Linear [k, h], ``wo`` an nn.Linear [h, k] or, with a
        block scale, a ScaledLinear whose scale [k] is the expert's row of it."""
        for e, w in weights.items():
            d = w.width
            up, down = w.up.new_zeros(k, w.hidden_size), w.down.new_zeros(w.hidden_size, k)  # zero-padded to k
            up[:d], down[:, :d] = w.up, w.down
            mlp = self.expert(e)
            mlp.write(FusedMLP(MLPWeights(up=up, down=down, activation=w.activation), None if scale is None else scale[e].to(down)))

    def write_lowrank(self, fs: list[LowRankMLP]) -> None:
        for e, c in enumerate(fs):  # one LowRankLinear per projection of each expert
            self.expert(e).write(c)

    def experts_spec(self) -> MLPSpec:
        spec = self.expert(0).spec(getattr(self.config, self.family.experts.width_attr))  # all experts share one structure (write)
        return replace(spec, up_bias=None, down_bias=None)

    def build_experts(self, ex: MLPSpec) -> None:
        for e in range(self.num_experts):  # Switch: each expert's wi / wo, no biases
            self.expert(e).build(replace(ex, up_bias=False, down_bias=False))


LAYOUTS: dict[str, type[MoEBlock]] = {"fused": FusedExperts, "modules": ModuleExperts}
