"""The benchmarks' quick mode end to end (tiny models, real data), and the measuring helpers they rely on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from bench.common import alternate, rotated
from bench.finetune import _peak_live_bytes
from bench.run import BENCHMARKS, format_record, main, parse_args


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Compressed layers of the fine-tuning benchmark go to a temporary fusion cache, not the repository's."""
    monkeypatch.setenv("MLP_FUSION_CACHE", str(tmp_path / "cache"))


@pytest.mark.slow  # a CLI run or a full train/resume/export cycle: 15-60 s
def test_quick_mode_writes_every_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    threads = torch.get_num_threads()
    assert main(["--quick", "--out", str(tmp_path / "results")]) == 0
    assert torch.get_num_threads() == threads  # --quick's single thread does not leak into the process
    printed = capsys.readouterr().out
    records = {name: json.loads((tmp_path / "results" / f"{name}.json").read_text()) for name in BENCHMARKS}
    for name, rec in records.items():
        assert rec["name"] == name and rec["mode"] == "quick" and rec["rows"] and rec["targets"]
        assert rec["machine"]["torch_threads"] == 1 and rec["machine"]["cpu"]
        assert f"### {rec['title']}" in printed
        table = [line for line in format_record(rec).splitlines() if line.startswith("|")]  # no "|" inside a cell
        assert len(table) == len(rec["rows"]) + 2 and all(line.count("|") == len(rec["columns"]) + 1 for line in table)
        assert table[0] in printed  # the JSON keeps the column order of the printed table

    fusion = records["fusion"]["rows"]
    assert all(r["ours_s"] > 0 and r["sklearn_s"] > 0 and 0.9 < r["inertia_ratio"] < 1.2 for r in fusion)
    ntk = records["ntk"]["rows"][0]
    assert ntk["max_rel_diff"] <= 1e-5  # correctness, not speed: holds on any machine
    steps = {r["mode"]: r for r in records["finetune"]["rows"]}
    assert set(steps) == {"none", "ntk_cluster", "cluster", "sketch", "mmd", "svd", "prune"}
    assert steps["none"]["bound"] == 1.0
    assert all(r["bound"] > 1.0 and r["peak_mb"] > 0 for mode, r in steps.items() if mode != "none")
    overhead = records["overhead"]["rows"][0]
    assert overhead["steps"] > 0 and overhead["bare_ms"] > 0 and overhead["lightning_ms"] > 0
    inference = records["inference"]
    cases = {(r["model"], r["runtime"], r["batch"]) for r in inference["rows"]}
    runtimes = ("pytorch", "onnxruntime")
    assert cases == {(m, rt, b) for m, bs in (("tiny_bert", (1, 4)), ("tiny_llama", (1, 2))) for rt in runtimes for b in bs}
    assert all(r["original"] > 0 and r["compressed"] > 0 and r["bound"] > 1.0 for r in inference["rows"])
    assert all(c["layers"] == [1, 2, 3] and c["mid_dim"] == 16 for c in inference["settings"]["compression"].values())  # the defaults
    assert inference["settings"]["onnxruntime_intra_op_threads"] == 1 and inference["settings"]["versions"]["onnxruntime"]


def test_names_choose_the_benchmarks(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_args(["inference", "--quick"]).names == ["inference"]
    assert parse_args([]).names == []  # every benchmark
    assert main(["nope"]) == 2 and "unknown benchmark nope" in capsys.readouterr().err


def test_alternate_rotates_the_order_and_skips_warmups() -> None:
    calls: list[tuple[str, int]] = []
    fns = {name: (lambda i, name=name: calls.append((name, i))) for name in "abc"}
    times = alternate(fns, reps=3, device=torch.device("cpu"), warmup=1)
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert calls[:6] == [("a", 0), ("b", 0), ("c", 0), ("b", 1), ("c", 1), ("a", 1)]
    assert rotated(["a", "b", "c"], 5) == ["c", "a", "b"]


def test_peak_live_bytes_replays_allocations() -> None:
    before = torch.ones(1 << 20)  # allocated before the profile: its free is not counted
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        a = torch.ones(1 << 20)  # 4 MiB
        b = torch.ones(1 << 19)  # 2 MiB: 6 MiB live at once
        del a, b, before
        c = torch.ones(1 << 18)  # 1 MiB
        del c
    assert 6 << 20 <= _peak_live_bytes(prof) < 7 << 20
