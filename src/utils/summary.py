"""Numbers over seeds, and how the project prints them: intervals, Markdown tables, figures.

Shared by ``src.approx`` (approximation metrics over seeds) and ``src.report`` (a sweep's runs).
Intervals are Student-t intervals over seeds (``scipy.stats``); with one seed there is no interval
and the tables say n = 1.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scipy import stats

from src.utils.io import atomic_path


@dataclass(frozen=True)
class Estimate:
    """Mean of ``n`` values with their sample standard deviation and a two-sided t interval."""

    mean: float
    std: float  # ddof = 1; nan for n < 2
    low: float  # nan for n < 2
    high: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        """The interval lies wholly above or below 0 (a difference the data can separate)."""
        return self.n > 1 and (self.low > 0 or self.high < 0)

    def as_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "std": self.std, "ci_low": self.low, "ci_high": self.high, "n": self.n}


def estimate(values: Sequence[float], confidence: float = 0.95) -> Estimate:
    """Mean, std and the ``confidence`` Student-t interval of ``values`` (nan values dropped)."""
    v = [float(x) for x in values if x is not None and not math.isnan(float(x))]
    n = len(v)
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, math.nan, 0)
    mean = sum(v) / n
    if n == 1:
        return Estimate(mean, math.nan, math.nan, math.nan, 1)
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, df=n - 1)) * std / math.sqrt(n)
    return Estimate(mean, std, mean - half, mean + half, n)


def paired(values: dict[Any, float], reference: dict[Any, float], confidence: float = 0.95) -> Estimate:
    """The interval of the per-key difference ``values[k] - reference[k]`` over the keys both have (seeds)."""
    keys = [k for k in values if k in reference]
    return estimate([values[k] - reference[k] for k in keys], confidence)


def fmt(v: Any, digits: int = 4) -> str:
    """A table cell: ``–`` for missing, thousands separators for large numbers, else ``digits`` significant."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, bool) or isinstance(v, str):
        return str(v)
    if isinstance(v, int) or (isinstance(v, float) and abs(v) >= 1000):
        return f"{v:,.0f}"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def fmt_estimate(e: Estimate, digits: int = 4) -> str:
    """``mean ± std [low, high]``; the bare mean when n = 1 (no interval from one seed) or the values are all equal."""
    if e.n < 2 or e.std == 0:
        return fmt(e.mean, digits)
    return f"{fmt(e.mean, digits)} ± {fmt(e.std, 2)} [{fmt(e.low, digits)}, {fmt(e.high, digits)}]"


def fmt_difference(e: Estimate, digits: int = 3) -> str:
    """A paired difference: ``+mean [low, high]``, bold where the interval excludes 0."""
    if e.n < 2:
        return "–" if e.n == 0 else f"{e.mean:+.{digits}g} (n = 1)"
    text = f"{e.mean:+.{digits}g} [{e.low:+.{digits}g}, {e.high:+.{digits}g}]"
    return f"**{text}**" if e.excludes_zero else text


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub Markdown table (cells are already strings)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)]) + "\n"


@contextmanager
def figure(path: str | Path, figsize: tuple[float, float] = (8, 4)) -> Iterator[Any]:
    """A matplotlib (Agg, files only) figure and axes, saved atomically as PNG to ``path`` on exit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize)
    try:
        yield fig, ax
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
    finally:
        plt.close(fig)
