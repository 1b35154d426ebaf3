"""One process of a timed comparison: ``python -m bench.worker SPEC OUT`` (started by :mod:`bench.timing`).

SPEC is a JSON file ``{"stage": "module:function", "process": j, "order": [...], "args": {...}}``; the
function runs in this fresh process as ``function(order, process, **args)`` and its JSON-able result
is written to OUT (a file, not stdout: the runtimes print to stdout). This module imports nothing
beyond the standard library, so that a child loads only the runtime its stage times.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def paired_calls(calls: dict[str, Callable[[int], Any]], order: Sequence[str], reps: int, warmup: int,
                 sync: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Seconds of ``reps`` timed rounds of the calls after ``warmup`` untimed ones.

    A round runs every side of ``order`` once, in that order, with the round's index as argument, so that
    the i-th calls of the sides ran back to back (a pair: a slow spell hits both). ``sync`` waits for
    queued device work before each clock reading.
    """
    times: dict[str, list[float]] = {name: [] for name in order}
    for i in range(warmup + reps):
        for name in order:
            if sync:
                sync()
            start = time.perf_counter()
            calls[name](i)
            if sync:
                sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def main(argv: Sequence[str]) -> int:
    """Run the spec's stage and write its result; an exception's traceback goes to stderr, which the parent reports."""
    spec_path, out_path = argv
    spec = json.loads(Path(spec_path).read_text())
    module, name = spec["stage"].split(":")
    stage = getattr(importlib.import_module(module), name)
    result = stage(spec["order"], spec["process"], **spec["args"])
    Path(out_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
