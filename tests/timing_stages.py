"""Stages for tests/unit/bench/test_timing.py's child processes (``bench.worker``): standard library only, so that a child starts fast."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import bench.worker


def record(order: list[str], process: int, log: str, name: str) -> dict[str, Any]:
    """Appends ``name process`` to ``log`` (the order the children ran in) and returns what the child saw."""
    with open(log, "a") as f:
        f.write(f"{name} {process}\n")
    calls: list[str] = []
    times = bench.worker.paired_calls({side: (lambda i, side=side: calls.append(side)) for side in order}, order, reps=2, warmup=1)
    return {"order_seen": order, "calls": calls, "times": times, "threads": os.environ["OMP_NUM_THREADS"],
            "worker": str(Path(bench.worker.__file__).resolve())}


def fail(order: list[str], process: int) -> dict[str, Any]:
    """Prints a screenful to stderr, then fails."""
    for i in range(50):
        print(f"chatter {i}", file=sys.stderr)
    raise ValueError("the model file is missing")
