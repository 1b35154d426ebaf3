"""FLAP (An et al., AAAI 2024): keep the neurons whose output fluctuates most over the calibration tokens.

A neuron's score is its *fluctuation* times its down-projection column's squared norm,
``Var(a_i) · ‖down[:, i]‖₂²`` (FLAP's ``WIFV`` metric), the variance computed as FLAP's official
``BiasGPT`` estimates it, sequence by sequence (``fluctuation``). FLAP's bias compensation (the
removed neurons' mean output folded into the down projection's bias) is ``ffn_mode.refit=bias``,
which ``conf/ffn_mode/flap.yaml`` sets; its adaptive structure across layers (AL-MM: each layer's
scores standardised, the globally lowest removed) is ``ffn_mode.allocation=flap`` with a budget
(``src.pipeline.budget.allocate_by_scores``). docs/methods.md, "flap". Needs calibration data.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import activations, check_mid_dim, keep_top
from .types import FusedMLP, MLPCalibration, MLPWeights

# Bumped whenever this method's output changes: part of the compression cache key.
VERSION = "1"


def needs_calibration(**_: object) -> bool:
    """Always: the score reads the calibration activations."""
    return True


def segments(lengths: Tensor | None, tokens: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Each token's sequence index [T] and each sequence's length [S]; no lengths: every token its own sequence."""
    n = torch.ones(tokens, dtype=torch.long) if lengths is None else lengths.long()
    n = n.to(device)
    return torch.repeat_interleave(torch.arange(len(n), device=device), n), n


def fluctuation(a: Tensor, lengths: Tensor | None = None) -> Tensor:
    """FLAP's running variance of each column of a [T, d] over calibration sequences of ``lengths`` [S] -> [d].

    FLAP's ``BiasGPT.add_batch`` sees one sequence n = 0, 1, ... at a time and keeps the running mean of
    the sequences' means, m_n. Its update of the fluctuation multiplies deviations from the old and the
    new mean, but the old-mean tensor is the new one (updated in place), and the first sequence adds
    nothing; unrolled, its recurrence is

        f = 1/(S−1) · Σ_{n=1}^{S−1} n/(n+1) · Σ_t (a_nt − m_n)²,

    computed here in float64 from per-sequence sums (one sequence: 0). Up to the weights n/(n+1) and
    the first sequence, this is the unbiased variance over tokens times the tokens per sequence.
    """
    seg, n = segments(lengths, len(a), a.device)
    a = a.double()
    sums = torch.zeros(len(n), a.shape[1], dtype=a.dtype, device=a.device).index_add_(0, seg, a)  # [S, d]
    squares = torch.zeros_like(sums).index_add_(0, seg, a * a)  # [S, d]
    counts = torch.arange(1, len(n) + 1, dtype=a.dtype, device=a.device)[:, None]  # [S, 1]: n + 1
    mean = (sums / n[:, None]).cumsum(0) / counts  # m_n, [S, d]
    dev = squares - 2 * mean * sums + n[:, None] * mean**2  # Σ_t (a_nt − m_n)², [S, d]
    if len(n) < 2:
        return torch.zeros(a.shape[1], dtype=a.dtype, device=a.device)
    w = (counts[1:] - 1) / counts[1:]  # n/(n+1), n = 1..S-1
    return (w * dev[1:]).sum(0) / (len(n) - 1)


def scores(w: MLPWeights, calib: MLPCalibration, acts: Tensor | None = None) -> Tensor:
    """FLAP's WIFV score, fluctuation(a_i) · ‖down[:, i]‖₂² [d]; ``acts`` [T, d]: the activations, if computed."""
    a = activations(w, calib.x) if acts is None else acts
    return fluctuation(a, calib.lengths).to(a.dtype) * w.down.to(a.dtype).pow(2).sum(0)


@torch.no_grad()
def compress(w: MLPWeights, mid_dim: int, *, seed: int, calib: MLPCalibration) -> FusedMLP:
    """Keep the top ``mid_dim`` neurons by FLAP's score, in original order (``seed`` unused)."""
    check_mid_dim(w, mid_dim)
    return keep_top(w, mid_dim, scores(w, calib))
