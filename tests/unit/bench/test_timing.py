"""The timing harness (bench.timing, bench.worker) and the machine record: structure, pairing, order, the interval
arithmetic on given numbers. Never a speed."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest
import torch

from bench.common import LIBRARIES, machine, vector_extensions
from bench.run import _fmt, format_record, machine_line
from bench.timing import (
    ROOT,
    STDERR_TAIL,
    Stage,
    StageError,
    interval,
    mapped,
    paired_ratio,
    rate_summary,
    ratio_summary,
    run_stages,
    side_order,
    timing_record,
)
from bench.worker import paired_calls

T_975 = {1: 12.706204736174694, 4: 2.7764451051977934}  # Student's t quantiles (tables), by degrees of freedom


def test_side_order_alternates_between_processes() -> None:
    assert side_order(("original", "compressed"), 0) == ["original", "compressed"]
    assert side_order(("original", "compressed"), 1) == ["compressed", "original"]
    assert side_order(("a", "b", "c"), 4) == ["a", "b", "c"] and side_order(("a", "b", "c"), 3) == ["c", "b", "a"]


def test_paired_calls_runs_rounds_in_order_and_skips_warmups() -> None:
    calls: list[tuple[str, int]] = []
    fns = {name: (lambda i, name=name: calls.append((name, i))) for name in ("original", "compressed")}
    times = paired_calls(fns, ["compressed", "original"], reps=3, warmup=1)
    assert calls == [(name, i) for i in range(4) for name in ("compressed", "original")]  # the i-th calls back to back
    assert list(times) == ["compressed", "original"] and all(len(t) == 3 and min(t) >= 0 for t in times.values())
    synced: list[int] = []
    paired_calls(fns, ["original"], reps=1, warmup=0, sync=lambda: synced.append(1))
    assert len(synced) == 2  # before and after the call


def test_paired_ratio_is_the_median_of_the_per_call_ratios() -> None:
    assert paired_ratio([2.0, 3.0, 10.0], [1.0, 2.0, 2.0]) == 2.0  # ratios 2, 1.5, 5; the ratio of the medians would be 1.5
    with pytest.raises(ValueError):
        paired_ratio([1.0, 2.0], [1.0])  # unpaired calls


def test_interval_of_two_processes() -> None:
    lo, hi = interval([1.0, 1.2])
    mean = sem = math.log(1.2) / 2  # logs 0 and ln 1.2: their mean, and sd / sqrt(2) = |difference| / 2
    assert lo == pytest.approx(math.exp(mean - T_975[1] * sem)) and hi == pytest.approx(math.exp(mean + T_975[1] * sem))
    assert (lo, hi) == pytest.approx((0.343989, 3.488488), rel=1e-5)  # one degree of freedom: wide, as it should be


def test_interval_of_five_processes() -> None:
    values = [1.05, 1.10, 1.08, 1.12, 1.07]
    logs = [math.log(v) for v in values]
    half = T_975[4] * statistics.stdev(logs) / math.sqrt(5)
    assert interval(values) == pytest.approx((math.exp(statistics.fmean(logs) - half), math.exp(statistics.fmean(logs) + half)))
    assert interval(values) == pytest.approx((1.050738, 1.117760), rel=1e-5)
    assert interval(values, confidence=0.5)[1] < interval(values)[1]


def test_interval_of_identical_values_and_of_one() -> None:
    assert interval([1.1, 1.1, 1.1]) == (1.1, 1.1)  # no spread: the value itself, not scipy's nan
    assert interval([1.1]) is None  # one process: no interval


def test_summaries() -> None:
    two = ratio_summary([1.0, 1.2])
    assert two["median"] == pytest.approx(1.1) and two["n"] == 2 and two["per_process"] == [1.0, 1.2]
    assert two["gmean"] == pytest.approx(math.sqrt(1.2)) and two["interval"] == pytest.approx([0.343989, 3.488488], rel=1e-5)
    assert ratio_summary([0.9])["interval"] is None and ratio_summary([0.9])["n"] == 1
    of_bound = mapped(two, lambda v: v / 1.2)
    assert of_bound["median"] == pytest.approx(1.1 / 1.2) and of_bound["per_process"] == pytest.approx([1 / 1.2, 1.0])
    assert of_bound["interval"] == pytest.approx([0.343989 / 1.2, 3.488488 / 1.2], rel=1e-5) and of_bound["n"] == 2
    assert mapped(ratio_summary([0.9]), lambda v: 2 * v)["interval"] is None
    assert rate_summary([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3, "per_process": [3.0, 1.0, 2.0]}


def test_cells_show_median_interval_and_n() -> None:
    assert _fmt(ratio_summary([1.0, 1.2])) == "1.1 [0.344, 3.488] (n=2)"
    assert _fmt(ratio_summary([1.25])) == "1.25 (n=1)"
    assert _fmt(rate_summary([3.0, 1.0, 2.0])) == "2 (1 to 3)"
    assert _fmt(0.5) == "0.5" and _fmt(12345.6) == "12346" and _fmt(None) == ""


def test_stages_run_in_fresh_processes_interleaved_with_alternating_order(tmp_path: Path) -> None:
    log = tmp_path / "log"
    stages = [Stage(name, "tests.timing_stages:record", ("original", "compressed"), {"log": str(log), "name": name})
              for name in ("pytorch", "onnxruntime")]
    results = run_stages(stages, processes=3, threads=2)
    assert log.read_text().split("\n")[:-1] == [f"{s} {p}" for p in range(3) for s in ("pytorch", "onnxruntime")]
    for name in ("pytorch", "onnxruntime"):
        found = results[name]
        assert [r["process"] for r in found] == [0, 1, 2]
        assert [r["order"] for r in found] == [r["order_seen"] for r in found] == [["original", "compressed"], ["compressed", "original"],
                                                                                  ["original", "compressed"]]
        assert found[1]["calls"] == ["compressed", "original"] * 3  # one warm-up round, two timed ones
        assert all(r["threads"] == "2" and r["wall_s"] > 0 and len(r["times"]["original"]) == 2 for r in found)
        assert all(Path(r["worker"]).is_relative_to(ROOT) for r in found)  # the children run this checkout's code


def test_a_failed_child_names_its_stage_and_quotes_its_stderr() -> None:
    with pytest.raises(StageError) as err:
        run_stages([Stage("llama.cpp f32", "tests.timing_stages:fail", ("original", "compressed"))], processes=2, threads=1)
    message = str(err.value)
    assert message.startswith("stage 'llama.cpp f32', process 0 (tests.timing_stages:fail) exited with status 1")
    assert "ValueError: the model file is missing" in message and "chatter 0\n" not in message  # the tail only
    assert len(message.splitlines()) == STDERR_TAIL + 1


def test_vector_extensions_from_flags() -> None:
    assert vector_extensions({"sse4_2", "avx2", "avx512f", "avx512_vnni", "amx_tile"}, "x86_64") == ["AVX2", "AVX-512", "AVX-512 VNNI", "AMX"]
    assert vector_extensions({"sse4_2"}, "x86_64") == []
    assert vector_extensions({"asimd", "sve"}, "aarch64") == ["NEON", "SVE"]
    assert vector_extensions(set(), "arm64") == ["NEON"]  # macOS: no /proc/cpuinfo, NEON all the same


def test_machine_record_names_cpu_threads_gpu_and_versions() -> None:
    m = machine(torch.device("cpu"), threads=3)
    assert {"cpu", "arch", "vector", "cores", "cpus", "threads", "torch_threads", "device", "gpu", "versions", "python", "os",
            "load_avg_1m"} <= set(m)
    assert m["cpu"] and m["threads"] == 3 and m["cpus"] >= 1 and isinstance(m["vector"], list)
    assert set(m["versions"]) == set(LIBRARIES) and m["versions"]["torch"] and m["versions"]["onnxruntime"]
    assert m["gpu"] is None or isinstance(m["gpu"], str)
    line = machine_line(m)
    assert line.startswith(m["cpu"]) and "threads 3" in line and f"torch {m['versions']['torch']}" in line


def test_record_renders_intervals_and_the_timing() -> None:
    speedup = ratio_summary([1.05, 1.10, 1.08, 1.12, 1.07])
    record = {"title": "T", "command": "python -m bench.run x", "mode": "full", "wall_s": 1.0, "machine": machine(torch.device("cpu"), 2),
              "timing": timing_record(5, 2), "columns": [("runtime", "runtime"), ("speedup", "speed-up")],
              "rows": [{"runtime": "pytorch", "speedup": speedup}], "targets": [], "notes": []}
    text = format_record(record)
    assert "| pytorch | 1.08 [1.051, 1.118] (n=5) |" in text and "over 5 fresh processes per comparison, threads 2 in each" in text


def test_the_beside_experiment_summarises_each_variant_over_its_processes() -> None:
    """bench.beside's rows on given numbers: per process the median paired ratio original / compressed, over processes its
    summary; the original's rate from its median call; the table names the processes' allowed CPUs, threads and RSS."""
    from bench.beside import _row, _table

    def process(j: int, pp: float) -> dict:
        times = {"pp": {"original": [pp, pp, pp], "compressed": [pp / 1.1] * 3}, "tg": {"original": [2.0] * 3, "compressed": [1.0, 2.0, 1.0]}}
        return {"times": times, "beside": ["pytorch"], "state": {"affinity": [0, 1], "threads": 5, "rss_mb": 900.0}, "order": ["original", "compressed"]}

    flops = {"pp": {"original": 11, "compressed": 10}, "tg": {"original": 3, "compressed": 2}}
    row = _row("pytorch", [process(0, 0.2), process(1, 0.25)], 128, flops)
    assert row["pp"]["per_process"] == pytest.approx([1.1, 1.1]) and row["pp"]["interval"] == pytest.approx([1.1, 1.1])
    assert row["tg"]["per_process"] == [2.0, 2.0] and row["tg_bound"] == 1.5
    assert row["pp_original"]["per_process"] == pytest.approx([640.0, 512.0])  # 128 tokens / the median call; tg: 64 / 2 s
    record = {"command": "python -m bench.beside", "wall_s": 1.0, "machine": machine(torch.device("cpu"), 2), "rows": [row],
              "interval": "95 % t"}
    assert "| pytorch | 1.100 [1.100, 1.100] (n=2) | 2.000 [2.000, 2.000] (n=2) | 576 (512 to 640) | 32 (32 to 32) | [2] | 5 | 900 |" in _table(record)
