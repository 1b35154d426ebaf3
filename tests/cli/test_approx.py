"""`python -m src.approx`: every method side by side, without training."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import run_cli


def test_approx_cli_writes_table_json_and_chart(tmp_path: Path) -> None:
    out = tmp_path / "approx"
    proc = run_cli("src.approx", "model=tiny_bert", "methods=[none,ntk_cluster,svd]", "seeds=[0,1]", "approx_metrics.probe_size=4",
                   "task.max_seq_length=32", f"hydra.run.dir={out}", f"paths.cache_dir={tmp_path / 'cache'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((out / "approx.json").read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"none", "ntk_cluster", "svd"} and rows["none"]["ntk_sign_rel_err"] == 0
    # the none row is measured like the others (same keys, errors exactly 0), not filled in
    assert {"hidden_rel_err", "output_rel_err/layer_3", "ntk_probe_sign_rel_err"} <= set(rows["none"]) and rows["none"]["hidden_rel_err"] == 0
    assert rows["ntk_cluster"]["params"] < rows["none"]["params"] and rows["svd"]["ntk_sign_rel_err"] > 0
    assert len(result["runs"]) == 6 and result["summary"]["svd"]["ntk_sign_rel_err"]["n"] == 2
    s = result["summary"]["svd"]["hidden_rel_err"]
    assert s["ci_low"] < s["mean"] < s["ci_high"] and "hidden_rel_err" in result["paired"]["svd"]
    md = (out / "approx.md").read_text()
    assert "| ntk_cluster | 2 |" in md and "## Paired differences from ntk_cluster" in md and "## Per layer" in md
    assert (out / "approx.png").stat().st_size > 1000
    assert "| ntk_cluster |" in proc.stdout + proc.stderr  # the table is printed


def test_approx_one_seed_says_n_1(tmp_path: Path) -> None:
    out = tmp_path / "approx"
    proc = run_cli("src.approx", "model=tiny_bert", "methods=[ntk_cluster,prune]", "approx_metrics.probe_size=4",
                   "task.max_seq_length=32", f"hydra.run.dir={out}", f"paths.cache_dir={tmp_path / 'cache'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    md = (out / "approx.md").read_text()
    assert "one seed (n = 1): no interval" in md and "| prune | 1 |" in md and "[" not in md.split("## Per layer")[0].split("|---|")[-1]


def test_approx_refuses_unknown_method(tmp_path: Path) -> None:
    proc = run_cli("src.approx", "model=tiny_bert", "methods=[ntk_cluster,foo]", f"hydra.run.dir={tmp_path / 'a'}")
    assert proc.returncode == 2 and "unknown method(s) ['foo']" in proc.stdout + proc.stderr
