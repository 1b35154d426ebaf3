"""Reliability: non-finite loss, W&B without network, safe loading, atomic writes, signals, a shared cache, a full disk."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from src.callbacks.guards import TrainingDiverged
from src.train import train
from src.utils.io import atomic_path
from tests.conftest import FAST, ROOT, run_cli

CODE = [p for d in ("src", "bench") for p in (ROOT / d).rglob("*.py")]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(compose_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    from src.modules.classifier import ClassificationModule

    good_loss = ClassificationModule._loss

    def diverging(self, logits, labels):  # the loss turns NaN after the first epoch (4 steps)
        loss = good_loss(self, logits, labels)
        return loss * float("nan") if self.training and self.global_step >= 5 else loss

    monkeypatch.setattr(ClassificationModule, "_loss", diverging)
    cfg = compose_cfg(["model=tiny_bert", "ffn_mode=none", "trainer.max_steps=-1", "trainer.max_epochs=2"])
    with pytest.raises(TrainingDiverged, match=r"training loss is nan at global step 6"):
        train(cfg)
    ckpt = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4 and all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


def test_wandb_unreachable_falls_back_offline(compose_cfg, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.invalid")  # a name that never resolves
    cfg = compose_cfg(["model=tiny_bert", "ffn_mode=ntk_cluster", "logger=wandb", "logger.wandb.online=true", "approx_metrics.probe_size=4"])
    start = time.time()
    metrics = train(cfg)
    assert time.time() - start < 120 and "test/acc" in metrics
    assert "W&B servers are unreachable: logging offline" in caplog.text
    out = Path(cfg.paths.output_dir)
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert "fusion/ntk_sign_rel_err" in (out / "metrics.csv").read_text()  # CSV regardless of W&B
    # W&B's own terminal viewer reads the offline run: metrics and the resolved config are there
    summary = subprocess.run(["wandb", "leet", "inspect", "--summary", str(runs[0])], capture_output=True, text=True, timeout=120).stdout
    assert "finished" in summary and "fusion/ntk_sign_rel_err" in summary and "test/acc" in summary
    assert b"ntk_cluster" in next(runs[0].glob("*.wandb")).read_bytes() and b"approx_metrics" in next(runs[0].glob("*.wandb")).read_bytes()


def test_no_pickle_and_safe_torch_load() -> None:
    for path in CODE:
        text = path.read_text()
        assert not re.search(r"^\s*(import pickle|from pickle|import dill|import joblib)", text, re.M), path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path}: {call}"
        assert "trust_remote_code=True" not in text, path


def test_atomic_write_leaves_no_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "x.safetensors"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("killed mid-write")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    torch.manual_seed(0)


@pytest.mark.slow  # a CLI run or a full train/resume/export cycle: 15-60 s
@pytest.mark.parametrize(("sig", "hook"), [("SIGTERM", "on_train_batch_start"), ("SIGINT", "on_train_batch_start"),
                                           ("SIGTERM", "on_validation_batch_start")], ids=["SIGTERM-train", "SIGINT-train", "SIGTERM-val"])
def test_a_signal_saves_last_ckpt_marks_interrupted_and_exits_nonzero(tmp_path: Path, sig: str, hook: str) -> None:
    """Mid-step and mid-validation (where Lightning's own handler used to exit 0 with nothing saved)."""
    run = tmp_path / "run"
    res = run_cli("src.train", "model=tiny_bert", "approx_metrics.enabled=false", "trainer.max_steps=100000", "trainer.max_epochs=1000",
                  "task.max_train_samples=64", "task.batch_size=4", f"hydra.run.dir={run}", f"paths.cache_dir={tmp_path / 'c'}",
                  "+callbacks.signal_at._target_=tests.signals.SignalAt", f"+callbacks.signal_at.hook={hook}",
                  f"+callbacks.signal_at.sig={sig}", "+callbacks.signal_at.after_step=3", timeout=180)
    assert res.returncode == 128 + signal.Signals[sig], res.stderr[-2000:]
    out = json.loads((run / "results.json").read_text())
    assert out["status"] == "interrupted" and "resume with ckpt_path=last" in out["error"] and sig in out["error"]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["global_step"] >= 3 and "fusion" in ckpt and "Traceback" not in res.stderr


@pytest.mark.slow  # a CLI run or a full train/resume/export cycle: 15-60 s
def test_sigterm_during_test_is_interrupted_not_success(tmp_path: Path) -> None:
    run = tmp_path / "run"
    res = run_cli("src.train", *FAST, "model=tiny_bert", "approx_metrics.enabled=false", f"hydra.run.dir={run}", f"paths.cache_dir={tmp_path / 'c'}",
                  "+callbacks.signal_at._target_=tests.signals.SignalAt", "+callbacks.signal_at.hook=on_test_batch_start",
                  "+callbacks.signal_at.after_step=0", timeout=180)
    assert res.returncode == 128 + signal.SIGTERM, res.stderr[-2000:]
    out = json.loads((run / "results.json").read_text())
    assert out["status"] == "interrupted" and "outside a training step" in out["error"] and "Traceback" not in res.stderr


_CACHE_WRITER = """
import sys, time, torch
from src.methods.ntk_cluster import compress
from src.pipeline.settings import CompressionSettings
from src.models.build import build_model
from src.pipeline.fuse import compress_model
torch.manual_seed(0)
cfg = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 256, "vocab_size": 64}
model = build_model({"name": "t", "config": cfg}, "classification", num_labels=2)
while time.time() < float(sys.argv[2]):  # start together
    time.sleep(0.01)
r = compress_model(model, CompressionSettings.of(compress, [0, 1], 64, cache_dir=sys.argv[1]))
print(sum(s["cache_hit"] for s in r.layer_stats.values()))
"""


def test_two_processes_share_one_cache_entry_per_layer(tmp_path: Path) -> None:
    """Two runs compressing the same layers at once: one valid entry per layer, no stray temporary files."""
    root, start = tmp_path / "cache", time.time() + 3
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _CACHE_WRITER, str(root), str(start)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-1000:] for o in outs]
    files = sorted((root / "ntk_cluster").iterdir())
    assert len(files) == 2 and all(f.suffix == ".safetensors" for f in files), files  # one per layer, nothing half-written
    from src.pipeline.cache import FusionCache

    cache = FusionCache(root / "ntk_cluster")
    assert all(cache.get(f.stem) is not None for f in files)  # both readable, checksums valid


def test_a_full_disk_keeps_the_previous_cache_entry_and_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import src.pipeline.cache
    from src.methods.types import FusedMLP, MLPWeights
    from src.pipeline.cache import FusionCache
    from src.utils.io import atomic_dir

    cache = FusionCache(tmp_path / "cache")
    w = MLPWeights(up=torch.ones(4, 2), down=torch.ones(2, 4))
    cache.put("k", FusedMLP(w))
    before = cache.path("k").read_bytes()

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(src.pipeline.cache, "save_file", full)
    with pytest.raises(OSError, match="No space left"):
        cache.put("k", FusedMLP(MLPWeights(up=torch.zeros(4, 2), down=torch.zeros(2, 4))))
    assert cache.path("k").read_bytes() == before and sorted(p.name for p in cache.root.iterdir()) == ["k.safetensors"]

    folder = tmp_path / "export"
    with atomic_dir(folder) as tmp:
        (tmp / "model.onnx").write_text("v1")
    with pytest.raises(OSError, match="No space left"), atomic_dir(folder, overwrite=True) as tmp:
        (tmp / "model.onnx").write_text("v2 half")
        full()
    assert (folder / "model.onnx").read_text() == "v1" and sorted(p.name for p in tmp_path.iterdir()) == ["cache", "export"]
