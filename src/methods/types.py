"""Weight containers shared by every compression method.

All tensors use the ``nn.Linear`` layout ``[out, in]``; the architecture adapters in
``src.models.mlp_io`` convert from and to each family's own layout (GPT-2's ``Conv1D`` is
``[in, out]``). Compression methods only ever see these containers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class MLPWeights:
    """One MLP ``y = down(act(gate(x)) * up(x)) + b_out`` (gated) or ``down(act(up(x) + b_up)) + b_out``.

    h = hidden size, d = intermediate size (number of sub-MLPs). A gated MLP may have biases on gate
    and up (gpt-oss) and a gated form other than ``act(g) * u`` (``src.methods.common.gated_form``).
    """

    up: Tensor  # [d, h]  W1: fc1 / intermediate.dense / c_fc / up_proj
    down: Tensor  # [h, d]  W2: fc2 / output.dense / c_proj / down_proj
    up_bias: Tensor | None = None  # [d]
    down_bias: Tensor | None = None  # [h]
    gate: Tensor | None = None  # [d, h]  gated MLPs only (gate_proj)
    activation: str = "gelu"  # a transformers.activations.ACT2FN key, or a gated form (common.gated_form)
    gate_bias: Tensor | None = None  # [d]  gated MLPs with biases only (gpt-oss)

    @property
    def hidden_size(self) -> int:
        return self.up.shape[1]

    @property
    def width(self) -> int:
        return self.up.shape[0]

    @property
    def is_gated(self) -> bool:
        return self.gate is not None

    def __post_init__(self) -> None:
        d, h = self.up.shape
        assert self.down.shape == (h, d), f"down {tuple(self.down.shape)} != {(h, d)}"
        assert self.gate is None or self.gate.shape == (d, h)
        assert self.up_bias is None or self.up_bias.shape == (d,)
        assert self.down_bias is None or self.down_bias.shape == (h,)
        assert self.gate_bias is None or (self.gate is not None and self.gate_bias.shape == (d,)), "gate_bias needs a gate, [d]"


@dataclass(frozen=True)
class MLPCalibration:
    """One MLP's behaviour on the T non-padding calibration tokens (docs/methods.md section 6).

    ``x`` are the MLP's inputs (from the original model or, sequentially, from the model whose
    earlier chosen layers are compressed already) and ``y`` the original MLP's outputs on them.
    Both are kept, not only XᵀX: a refit needs the compressed MLP's activations on X, which depend
    on the method's output.
    """

    x: Tensor  # [T, h]
    y: Tensor  # [T, h]
    # tokens of each calibration sequence [S], in order, summing to T; None where the grouping is lost
    # (a Mixture-of-Experts part's routed tokens). FLAP's running statistics go sequence by sequence.
    lengths: Tensor | None = None

    def __post_init__(self) -> None:
        assert self.x.ndim == 2 and self.x.shape == self.y.shape, f"x {tuple(self.x.shape)} vs y {tuple(self.y.shape)}"
        assert self.lengths is None or int(self.lengths.sum()) == len(self.x), "lengths must sum to the tokens T"

    def to(self, device: torch.device, dtype: torch.dtype) -> MLPCalibration:
        """x and y on ``device`` in ``dtype`` (lengths stay on the CPU: they count tokens)."""
        return MLPCalibration(self.x.to(device, dtype), self.y.to(device, dtype), self.lengths)


@dataclass(frozen=True)
class FusedMLP:
    """A width-k MLP, optionally with a frozen per-neuron scale applied after the activation.

    ``scale`` holds the k-means cluster sizes of MLP fusion (``ntk_cluster``): the layer computes
    ``down(scale * act(...)) + b_out``. It is a buffer, never trained.
    """

    weights: MLPWeights  # width k
    scale: Tensor | None = None  # [k]
    stats: dict[str, float] = field(default_factory=dict)  # e.g. {"inertia": ...}


@dataclass(frozen=True)
class LowRankMLP:
    """An MLP whose matrices are each a rank-r product ``left @ right`` (truncated SVD).

    ``factors[name] = (left [out, r], right [r, in])`` for name in ``up``, ``down`` (and ``gate``).
    """

    factors: dict[str, tuple[Tensor, Tensor]]
    up_bias: Tensor | None = None  # [d]
    down_bias: Tensor | None = None  # [h]
    activation: str = "gelu"
    stats: dict[str, float] = field(default_factory=dict)
    gate_bias: Tensor | None = None  # [d]

    @property
    def rank(self) -> int:
        return self.factors["up"][1].shape[0]


Compressed = FusedMLP | LowRankMLP


class OptionError(ValueError):
    """A method's option is out of range: ``str(e)`` reads ``<option>=<value> <what is allowed>``.

    Raised by a method's ``check`` hook (which its ``compress`` calls too); the preflight turns it
    into the run's one-sentence refusal, naming the setting as ``ffn_mode.<option>``.
    """

    def __init__(self, option: str, value: object, allowed: str) -> None:
        super().__init__(f"{option}={value!r} {allowed}")
