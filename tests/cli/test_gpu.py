"""The gpu tier (``make test-gpu``): every entry point end to end on a CUDA GPU, as a user runs it.

Skipped where no GPU is visible (tests/conftest.py). Each case is a command line in its own process,
so that Lightning's device handling, DDP's and FSDP's process groups and the CUDA caching allocator
are those of a real run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli

pytestmark = pytest.mark.gpu
TINY = ["trainer.max_steps=6", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2", "task.max_train_samples=96",
        "task.max_eval_samples=32", "task.batch_size=16", "task.max_seq_length=64"]


def _train(run_dir: Path, *overrides: str, timeout: int = 600) -> dict:
    proc = run_cli("src.train", *overrides, f"hydra.run.dir={run_dir}", timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "trainer: gpu on" in proc.stderr + proc.stdout  # the log says which device it chose
    res = json.loads((run_dir / "results.json").read_text())
    assert res["status"] == "completed"
    return res["metrics"]


def test_main_job_defaults_on_gpu(tmp_path: Path) -> None:
    """The README's main job with every default (MiniLM, ntk_cluster, the approximation metrics), on trainer=gpu."""
    m = _train(tmp_path / "run", "trainer=gpu")
    assert m["test/acc"] > 0.7 and m["fusion/ntk_sign_rel_err"] > 0


def test_default_trainer_takes_the_gpu(tmp_path: Path) -> None:
    """trainer=auto (the default) trains on the GPU where one is visible, at bf16-mixed where it is supported."""
    proc = run_cli("src.train", "model=tiny_bert", *TINY, f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    expected = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    assert f"precision {expected}" in proc.stderr + proc.stdout


@pytest.mark.parametrize("overrides", [
    ["model=tiny_llama", "task=rt_review", "ffn_mode=wanda_sp", "ffn_mode.refit=lstsq"],
    ["model=tiny_llama", "task=rt_review", "ffn_mode=ntk_keep"],
    ["model=tiny_mixtral", "task=rt_review", "ffn_mode=ntk_cluster"],
    ["model=tiny_qwen2_moe", "task=rt_review", "ffn_mode=wanda_sp", "ffn_mode.refit=lstsq"],
    ["model=tiny_bert", "ffn_mode=ntk_cluster", "distill=hidden_mse", "distill.max_steps=4"],
    ["model=tiny_bert", "ffn_mode=ntk_cluster", "ffn_mode.budget=0.25"],
    ["model=tiny_t5", "ffn_mode=ntk_cluster"],
    ["model=tiny_llama", "task=rt_review", "trainer.precision=16-mixed"],
    ["model=tiny_llama", "task=rt_review", "trainer.precision=bf16-true"],
    ["model=tiny_llama", "task=rt_review", "trainer.precision=32-true"],
], ids=lambda o: " ".join(o))
def test_every_kind_on_gpu(tmp_path: Path, overrides: list[str]) -> None:
    m = _train(tmp_path / "run", "trainer=gpu", *overrides, *TINY)
    assert all(v == v for v in m.values())  # no NaN


def test_ddp_on_every_gpu(tmp_path: Path) -> None:
    """trainer=ddp: rank 0 compresses on its GPU and broadcasts (NCCL) to the others."""
    m = _train(tmp_path / "run", "trainer=ddp", "model=tiny_bert", "ffn_mode=wanda_sp", "ffn_mode.refit=lstsq", *TINY)
    assert "fusion/params_after" in m


def test_fsdp_compresses_then_shards_resumes_and_exports(tmp_path: Path) -> None:
    """trainer=fsdp: compression before sharding; the full checkpoint resumes and exports."""
    run = tmp_path / "run"
    _train(run, "trainer=fsdp", "model=tiny_llama", "task=rt_review", *TINY)
    _train(run, "trainer=fsdp", "model=tiny_llama", "task=rt_review", *TINY, "trainer.max_steps=8", "ckpt_path=last")
    proc = run_cli("src.export", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"out={tmp_path / 'export'}", "format=hf")
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_gpu_checkpoint_exports(tmp_path: Path) -> None:
    """A checkpoint written on the GPU exports (ONNX self-check included) on the same machine."""
    run = tmp_path / "run"
    _train(run, "trainer=gpu", "model=tiny_llama", "task=rt_review", "ffn_mode.layers=[1,3]", *TINY)
    proc = run_cli("src.export", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"out={tmp_path / 'export'}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((tmp_path / "export" / "export.json").read_text())["onnx_rel_err"] < 1e-3


def test_approx_on_gpu(tmp_path: Path) -> None:
    proc = run_cli("src.approx", "device=cuda", "model=tiny_bert", "methods=[none,ntk_cluster,wanda_sp]", "approx_metrics.probe_size=8",
                   f"hydra.run.dir={tmp_path / 'a'}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((tmp_path / "a" / "approx.json").read_text())["complete"]


def test_bench_quick_on_gpu(tmp_path: Path) -> None:
    proc = run_cli("bench.run", "--quick", "--device", "cuda", "--out", str(tmp_path), timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "finetune.json").exists()
