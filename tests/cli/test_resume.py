"""Resume after SIGKILL, SIGTERM or SIGINT mid-epoch reaches the metrics of an uninterrupted run (slow tier)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, run_cli

ARGS = ["model=minilm", "ffn_mode=ntk_cluster", "approx_metrics.enabled=false", "task.max_train_samples=160", "task.batch_size=16",
        "task.max_eval_samples=64", "trainer.max_epochs=2", "callbacks.periodic_checkpoint.every_n_train_steps=3"]


def _final(run: Path) -> dict:
    res = json.loads((run / "results.json").read_text())
    assert res["status"] == "completed", res
    return res["metrics"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The uninterrupted run (folder) and the shared cache setting."""
    tmp = tmp_path_factory.mktemp("resume")
    cache = f"paths.cache_dir={tmp / 'cache'}"
    assert run_cli("src.train", *ARGS, cache, f"hydra.run.dir={tmp / 'straight'}", timeout=900).returncode == 0
    return tmp / "straight", cache


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=["SIGKILL", "SIGTERM", "SIGINT"])
def test_resume_after_a_signal_matches_uninterrupted(tmp_path: Path, straight: tuple[Path, str], sig: signal.Signals) -> None:
    straight, cache = straight
    killed = tmp_path / "killed"
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.Popen([sys.executable, "-m", "src.train", *ARGS, cache, f"hydra.run.dir={killed}"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last, step, deadline = killed / "checkpoints" / "last.ckpt", 0, time.time() + 600
    while step < 3 and time.time() < deadline and proc.poll() is None:  # wait for the first mid-epoch checkpoint
        time.sleep(0.2)
        try:
            step = torch.load(last, weights_only=True, map_location="cpu")["global_step"] if last.exists() else 0
        except Exception:  # being written
            pass
    proc.send_signal(sig)
    code = proc.wait()
    assert 3 <= step < 20, f"no mid-run checkpoint to resume from (step {step})"
    if sig != signal.SIGKILL:  # saved at the next batch's end, marked interrupted, and a failure for the scheduler
        assert code == 128 + sig, code
        res = json.loads((killed / "results.json").read_text())
        assert res["status"] == "interrupted" and signal.Signals(sig).name in res["error"], res
        assert torch.load(last, weights_only=True, map_location="cpu")["global_step"] >= step

    resumed = run_cli("src.train", *ARGS, cache, f"hydra.run.dir={killed}", "ckpt_path=last", timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "rebuilt the compressed structure" in (killed / "train.log").read_text()  # no clustering on resume
    a, b = _final(straight), _final(killed)
    for key in ("test/acc", "test/loss", "val/acc", "val/loss"):
        assert abs(a[key] - b[key]) < 1e-5, (key, a[key], b[key])


@pytest.mark.slow
def test_a_run_ended_by_max_steps_trains_on_from_its_next_batch(tmp_path: Path) -> None:
    """max_steps=3, then ckpt_path=last with max_steps=5, equals a straight max_steps=5 run (1e-5) at a
    constant learning rate (the schedule's length is max_steps). Stopping ran the epoch's end, so the
    checkpoint counted the epoch as done: the resumed run started the next epoch, and at
    max_epochs=1 trained nothing."""
    args = ["model=tiny_llama", "task=rt_review", "task.max_new_tokens=4", "task.max_eval_samples=4", "ffn_mode=none", "test=false",
            "approx_metrics.enabled=false", "optim.warmup_ratio=0", "optim.schedule=polynomial", "optim.power=0",
            f"paths.cache_dir={tmp_path / 'cache'}"]
    for run, extra in (("resumed", ["trainer.max_steps=3"]), ("resumed", ["trainer.max_steps=5", "ckpt_path=last"]),
                       ("straight", ["trainer.max_steps=5"])):
        done = run_cli("src.train", *args, *extra, f"hydra.run.dir={tmp_path / run}", timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    a, b = _final(tmp_path / "straight"), _final(tmp_path / "resumed")
    assert torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["global_step"] == 5
    for key in ("train/loss", "val/loss"):
        assert abs(a[key] - b[key]) < 1e-5, (key, a[key], b[key])
