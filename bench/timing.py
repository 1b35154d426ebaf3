"""Timing over fresh processes: each runtime of a comparison in its own processes, ratios over k of them with an interval.

The sides of a comparison (original and compressed model in one runtime, Lightning and a bare step, ...)
run in one process and are paired call by call (:func:`bench.worker.paired_calls`); a process's ratio
is the median of its paired ratios. Something fixed for the life of a process (where memory-mapped
weights land, the virtual machine's neighbours) moves all of a process's calls alike, so no number of
calls in one process shows it: each stage runs in ``k`` fresh processes (``python -m bench.worker``),
the sides' order (loading and calls) reversed in every other one, and every ratio is reported over the
processes: median, 95 % interval, n and the per-process values. Different runtimes never share a
process (llama.cpp's threads never run beside PyTorch's or ONNX Runtime's pools).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scipy import stats

CONFIDENCE = 0.95
INTERVAL = ("95 % t interval over the processes of the mean log ratio (scipy.stats.t, n - 1 degrees of freedom), exponentiated: "
            "an interval of the ratios' geometric mean; none for n = 1, [v, v] where every process gave v")
ORDER = "the sides in their listed order in even processes (original first), reversed in odd ones, for loading and for every round of calls"
STDERR_TAIL = 20  # lines of a failed child's stderr quoted in the error
ROOT = Path(__file__).resolve().parents[1]  # the children's working directory: bench/ and src/ import from this checkout
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")  # every pool of a child sized at its start


class StageError(RuntimeError):
    """A child process of a stage failed; the message names the stage and the process and quotes the tail of its stderr."""


@dataclass(frozen=True)
class Stage:
    """What each child process of one runtime's comparison runs: ``target(order, process, **args)``."""

    name: str  # in errors and records, e.g. "tiny_bert onnxruntime"
    target: str  # "module:function", e.g. "bench.runtimes:onnxruntime"
    sides: tuple[str, ...]  # even processes' order; odd processes reverse it
    args: dict[str, Any] = field(default_factory=dict)  # JSON-able


def side_order(sides: Sequence[str], process: int) -> list[str]:
    """The sides' order in process ``process``: as listed in even processes, reversed in odd ones."""
    return list(sides) if process % 2 == 0 else list(reversed(sides))


def run_stages(stages: Sequence[Stage], processes: int, threads: int) -> dict[str, list[dict[str, Any]]]:
    """Every stage in ``processes`` fresh processes, one process at a time: process j of every stage, then j + 1, so that a
    slow spell of the machine hits the stages alike. Each stage's results in process order, each with its ``process``,
    ``order`` and ``wall_s`` (the child's life: imports, loading, timing)."""
    results: dict[str, list[dict[str, Any]]] = {stage.name: [] for stage in stages}
    with tempfile.TemporaryDirectory(prefix="mlp-fusion-timing-") as folder:
        for process in range(processes):
            for stage in stages:
                results[stage.name].append(run_process(stage, process, threads, Path(folder)))
    return results


def run_process(stage: Stage, process: int, threads: int, folder: Path) -> dict[str, Any]:
    """One child of ``stage`` on ``threads`` threads; its result with ``process``, ``order`` and ``wall_s``, or a StageError."""
    order = side_order(stage.sides, process)
    spec, out = folder / f"spec-{process}.json", folder / f"result-{process}.json"
    spec.write_text(json.dumps({"stage": stage.target, "process": process, "order": order, "args": stage.args}))
    out.unlink(missing_ok=True)
    env = {**os.environ, **dict.fromkeys(THREAD_VARIABLES, str(threads))}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "bench.worker", str(spec), str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0 or not out.exists():
        tail = "\n".join(done.stderr.strip().splitlines()[-STDERR_TAIL:]) or "(stderr empty)"
        raise StageError(f"stage {stage.name!r}, process {process} ({stage.target}) exited with status {done.returncode}; "
                         f"the end of its stderr:\n{tail}")
    return {**json.loads(out.read_text()), "process": process, "order": order, "wall_s": wall}


# ---------------------------------------------------------------------------------------------
# summaries over processes


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median of the per-call ratios ``num[i] / den[i]`` (both sides of a pair ran back to back): one process's ratio."""
    return statistics.median(n / d for n, d in zip(num, den, strict=True))


def interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """``confidence`` t interval of positive ratios' geometric mean (a t interval of their logs' mean, exponentiated).

    None for fewer than two values (no spread to estimate); (v, v) where every value is v (scipy's t would
    return nan for a zero standard error). Logs, because a ratio's errors multiply: 0.9 and 1/0.9 are as far
    from 1.
    """
    if len(values) < 2:
        return None
    logs = [math.log(v) for v in values]
    if max(logs) == min(logs):
        return values[0], values[0]
    lo, hi = stats.t.interval(confidence, len(logs) - 1, loc=statistics.fmean(logs), scale=stats.sem(logs))
    return math.exp(lo), math.exp(hi)


def ratio_summary(per_process: Sequence[float]) -> dict[str, Any]:
    """A ratio over processes: median, 95 % interval (:func:`interval`; None for n = 1), geometric mean, n and the values."""
    ci = interval(per_process)
    return {"median": statistics.median(per_process), "interval": list(ci) if ci else None,
            "gmean": float(stats.gmean(per_process)), "n": len(per_process), "per_process": list(per_process)}


def rate_summary(per_process: Sequence[float]) -> dict[str, Any]:
    """An absolute rate or time over processes: median and spread (min, max), n and the values."""
    return {"median": statistics.median(per_process), "min": min(per_process), "max": max(per_process), "n": len(per_process),
            "per_process": list(per_process)}


def mapped(summary: dict[str, Any], fn: Callable[[float], float]) -> dict[str, Any]:
    """A ratio summary through an increasing ``fn`` (e.g. ``ratio / bound``: of_bound), its interval's ends mapped alike."""
    return {**summary, "median": fn(summary["median"]), "gmean": fn(summary["gmean"]),
            "interval": [fn(v) for v in summary["interval"]] if summary["interval"] else None,
            "per_process": [fn(v) for v in summary["per_process"]]}


def timing_record(processes: int, threads: int) -> dict[str, Any]:
    """How a result's ratios were measured (the record's ``timing``)."""
    return {"processes": processes, "threads": threads, "order": ORDER, "interval": INTERVAL,
            "ratio": "per process: the median of the paired per-call ratios; over processes: the median of those"}
