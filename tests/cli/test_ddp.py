"""DDP on two CPU processes (gloo): identical compressed weights, each metric logged once (slow tier)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import run_cli


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = run_cli(
        "src.train", "trainer=ddp_sim", "trainer.max_steps=5", "model=tiny_bert", "task.max_train_samples=64",
        "task.max_eval_samples=32", "task.batch_size=8", f"hydra.run.dir={run}", f"paths.cache_dir={tmp_path / 'cache'}", timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (run / "train.log").read_text()
    digests = dict(re.findall(r"rank (\d): compressed weights sha256 (\w+)", log))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"]  # bit-identical on both ranks
    df = pd.read_csv(run / "metrics.csv")
    for key in ("fusion/ntk_sign_rel_err", "fusion/params_after", "test/acc"):
        assert df[key].notna().sum() == 1, key  # rank zero logs, once
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert json.loads((run / "results.json").read_text())["status"] == "completed"
