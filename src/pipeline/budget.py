"""Per-layer widths under one parameter budget (``ffn_mode.budget``), from each layer's error at a few widths.

Every chosen layer of a model has the same parameters per neuron, so a budget of a fraction β of
the chosen layers' MLP parameters is ``floor(β · Σ_l d_l)`` neurons in all. Each layer's error
curve (relative calibration error at a few measured widths) is replaced by its lower convex hull,
linear between hull points; handing out neurons greedily by the largest error decrease per neuron
is then optimal for the summed error, and fills the budget exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from src.methods import flap, wanda_sp
from src.methods.types import MLPCalibration, MLPWeights

# ffn_mode.allocation's neuron scores: a budget spread by standardised scores (FLAP's AL-MM) instead of by error curves
SCORES: dict[str, Callable[[MLPWeights, MLPCalibration], Tensor]] = {"flap": flap.scores, "wanda_sp": wanda_sp.scores}
ALLOCATIONS = ("error", *SCORES)


def total_neurons(budget: float, widths: list[int]) -> int:
    """The neurons a budget keeps over layers of ``widths``: floor(β · Σ d_l), robust to β's decimal rounding (5/6 of 6 is 5)."""
    return math.floor(budget * sum(widths) + 1e-6)


def allocate_by_scores(scores: dict[int, Tensor], total: int) -> dict[int, int]:
    """Widths per layer keeping the ``total`` neurons of largest standardised score over all layers (at least 1 a layer).

    FLAP's adaptive structure (AL-MM): each layer's scores [d_l] minus their mean, over their (unbiased)
    std, so that layers whose scores live on other scales compete fairly; the globally lowest go.
    """
    z = {layer: (s.double() - s.double().mean()) / s.double().std() for layer, s in scores.items()}
    pooled = torch.cat(list(z.values()))
    if not 0 < total <= len(pooled):
        raise ValueError(f"a budget of {total} neurons is outside 1..{len(pooled)}")
    cut = pooled.sort(descending=True).values[total - 1]  # the smallest kept standardised score
    return {layer: max(1, int((v >= cut).sum())) for layer, v in z.items()}


def candidate_widths(width: int, budget: float) -> list[int]:
    """Widths to measure a layer of width ``width`` at: fractions of the budget's average width, in [1, width-1]."""
    mean = budget * width
    return sorted({min(max(round(mean * f), 1), width - 1) for f in (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)})


def _hull(curve: dict[int, float]) -> list[tuple[int, float]]:
    """Lower convex hull of the points (width, error), widths increasing."""
    pts: list[tuple[int, float]] = []
    for p in sorted(curve.items()):
        while len(pts) >= 2 and (pts[-1][1] - pts[-2][1]) * (p[0] - pts[-2][0]) >= (p[1] - pts[-2][1]) * (pts[-1][0] - pts[-2][0]):
            pts.pop()  # the middle point lies on or above the chord: not on the lower hull
        pts.append(p)
    return pts


def allocate(errors: dict[int, dict[int, float]], total: int) -> dict[int, int]:
    """Widths per layer, summing to ``total``, that minimise the summed (hull-interpolated) error.

    ``errors[layer][width]`` is the layer's error at a measured width. Raises ValueError when
    ``total`` is outside [Σ smallest measured widths, Σ largest].
    """
    hulls = {layer: _hull(curve) for layer, curve in errors.items()}
    widths = {layer: h[0][0] for layer, h in hulls.items()}
    low, high = sum(widths.values()), sum(max(c) for c in errors.values())
    if not low <= total <= high:
        raise ValueError(f"a budget of {total} neurons is outside the measured widths' range {low}..{high}")
    left, pos = total - low, {layer: 0 for layer in hulls}
    while left > 0:
        # the hull segment with the largest error decrease per neuron, over every layer's next one
        best, best_gain = None, -math.inf
        for layer, h in hulls.items():
            if pos[layer] + 1 < len(h):
                (w0, e0), (w1, e1) = h[pos[layer]], h[pos[layer] + 1]
                gain = (e0 - e1) / (w1 - w0)
                if gain > best_gain:
                    best, best_gain = layer, gain
        h, i = hulls[best], pos[best]
        step = min(h[i + 1][0] - widths[best], left)
        widths[best] += step
        left -= step
        if widths[best] == h[i + 1][0]:
            pos[best] += 1
    return widths
