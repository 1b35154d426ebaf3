"""`python -m src.approx`: every method side by side, without training."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import run_cli


def test_approx_cli_writes_table_json_and_chart(tmp_path: Path) -> None:
    out = tmp_path / "approx"
    proc = run_cli("src.approx", "model=tiny_bert", "methods=[none,ntk_cluster,svd]", "approx_metrics.probe_size=4",
                   "task.max_seq_length=32", f"hydra.run.dir={out}", f"paths.cache_dir={tmp_path / 'cache'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["method"]: r for r in json.loads((out / "approx.json").read_text())["rows"]}
    assert set(rows) == {"none", "ntk_cluster", "svd"} and rows["none"]["ntk_sign_rel_err"] == 0
    assert rows["ntk_cluster"]["params"] < rows["none"]["params"] and rows["svd"]["ntk_sign_rel_err"] > 0
    assert "| ntk_cluster |" in (out / "approx.md").read_text() and (out / "approx.png").stat().st_size > 1000
    assert "| ntk_cluster |" in proc.stdout + proc.stderr  # the table is printed


def test_approx_refuses_unknown_method(tmp_path: Path) -> None:
    proc = run_cli("src.approx", "model=tiny_bert", "methods=[ntk_cluster,foo]", f"hydra.run.dir={tmp_path / 'a'}")
    assert proc.returncode == 2 and "unknown method(s) ['foo']" in proc.stdout + proc.stderr
