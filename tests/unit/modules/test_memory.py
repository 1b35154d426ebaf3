"""Memory savings that must not change results: activation checkpointing (the same training step, off
where the NTK metrics run), the metrics' shared original copy, checkpoints streamed to their file,
and a compressed, distilled, checkpointed run that resumes."""

from __future__ import annotations

import math
import tracemalloc
from pathlib import Path

import pytest
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

from src.builders import build_datamodule, fusion_callback
from src.metrics import ntk
from src.models import mlp_io
from src.modules.causal_lm import CausalLMModule
from src.pipeline.fuse import compress_model, count_params
from src.pipeline.settings import CompressionSettings
from src.preflight import preflight
from src.train import train
from src.utils.checkpoint_io import StreamingCheckpointIO
from tests.conftest import compress_fn

GEN = ["task=rt_review", "model=tiny_llama", "task.max_new_tokens=4", "task.max_eval_samples=4"]


def _module_and_data(compose_cfg, checkpointing: bool) -> tuple[CausalLMModule, object]:
    cfg = compose_cfg([*GEN, f"model.gradient_checkpointing={str(checkpointing).lower()}"])
    checked = preflight(cfg)
    torch.manual_seed(0)  # the same random weights either way
    return CausalLMModule(cfg.model, checked.task, cfg.optim), build_datamodule(cfg, checked)


def _count_checkpoints(model: nn.Module) -> list[int]:
    """Wrap every block's checkpoint function; the returned list grows by one per checkpointed call."""
    calls: list[int] = []
    for m in model.modules():
        if getattr(m, "gradient_checkpointing", False):
            fn = m._gradient_checkpointing_func
            m._gradient_checkpointing_func = lambda *a, fn=fn, **k: calls.append(1) or fn(*a, **k)
    return calls


@pytest.mark.parametrize("compressed", [False, True], ids=["dense", "svd"])
def test_checkpointing_gives_the_same_step(compose_cfg, compressed: bool) -> None:
    """One training step's loss and gradients with checkpointing on equal those with it off (1e-5),
    the output layer in several checkpointed chunks; a compressed MLP (low-rank modules put into the
    blocks after the model was built) is checkpointed too."""
    results = {}
    for on in (False, True):
        module, dm = _module_and_data(compose_cfg, on)
        module.head_chunk = 16  # the batch's 168 target positions in 11 chunks
        if compressed:
            compress_model(module.model, CompressionSettings.of(compress_fn("svd"), [2, 3], 16))
        assert module.model.is_activation_checkpointing is on  # transformers 5's name of is_gradient_checkpointing
        calls = _count_checkpoints(module.model)
        dm.setup("fit")
        loss = module.token_nll(next(iter(dm.train_dataloader()))).mean()  # the training step's loss
        loss.backward()
        assert len(calls) == (mlp_io.num_layers(module.model) if on else 0)  # every block checkpointed
        results[on] = loss.detach(), {n: p.grad for n, p in module.model.named_parameters()}
    (loss_off, grads_off), (loss_on, grads_on) = results[False], results[True]
    assert torch.allclose(loss_on, loss_off, rtol=0, atol=1e-5)
    assert grads_on.keys() == grads_off.keys()
    for n, g in grads_off.items():
        assert torch.allclose(grads_on[n], g, rtol=0, atol=1e-5), n


def test_checkpointing_is_off_where_the_ntk_metrics_run(compose_cfg) -> None:
    """The NTK's vmap runs the plain forward (eval mode): no checkpoint call, the same kernels; the
    reentrant variant's input-embedding hook, which torch.func refuses, is not installed."""
    kernels = {}
    for on in (False, True):
        module, dm = _module_and_data(compose_cfg, on)
        model = module.model
        assert not getattr(model, "_require_grads_hooks", None)
        calls = _count_checkpoints(model)
        groups = {f"layer_{i}": mlp_io.mlp_param_names(model, i) for i in (0, 3)}
        batch = dm.probe_batch(6, 0)
        kernels[on] = ntk.per_sample_kernels(model, groups, batch, ntk.target_loglik, chunk_size=4)
        assert not calls and model.training  # eval mode only inside, restored after
    for g, (k_std, k_sign) in kernels[False].items():
        assert ntk.rel_err(kernels[True][g][0], k_std) < 1e-6 and ntk.rel_err(kernels[True][g][1], k_sign) < 1e-6


def test_original_copy_shares_all_but_the_compressed_mlps(compose_cfg) -> None:
    """The metrics' reference model owns copies of the compressed layers' MLPs only; compressing the
    model leaves it the original."""
    cfg = compose_cfg(["model=tiny_llama", "ffn_mode=svd", "ffn_mode.layers=[2,3]", "ffn_mode.mid_dim=16"])
    settings = preflight(cfg).compression
    callback = fusion_callback(cfg, settings)
    module, _ = _module_and_data(compose_cfg, False)
    model = module.model
    original = callback._original_copy(model)
    own = {n for i in (2, 3) for n in mlp_io.mlp_param_names(model, i)}
    for n, p in model.named_parameters():
        assert (original.get_parameter(n) is p) is (n not in own), n
    before = {n: p.clone() for n, p in original.named_parameters()}
    report = compress_model(model, settings)
    assert count_params(original) == report.params_before > report.params_after == count_params(model)
    assert all(torch.equal(p, before[n]) for n, p in original.named_parameters())


@pytest.mark.slow  # a CLI run or a full train/resume/export cycle: 15-60 s
def test_compressed_run_with_checkpointing_distills_trains_and_resumes(compose_cfg) -> None:
    """SmolLM2's recipe in miniature with checkpointing on: wanda_sp + refit, the metrics, distillation,
    fine-tuning, test, and a resume from last.ckpt."""
    over = [*GEN, "model.gradient_checkpointing=true", "ffn_mode=wanda_sp", "ffn_mode.refit=lstsq", "approx_metrics.probe_size=8",
            "distill=hidden_mse", "distill.max_steps=2"]
    metrics = train(compose_cfg(over))
    assert math.isfinite(metrics["test/ppl"]) and 0 <= metrics["fusion/ntk_sign_rel_err"] < 10 and metrics["distill/steps"] == 2
    cfg = compose_cfg([*over, "trainer.max_steps=5", "trainer.max_epochs=2", "ckpt_path=last"])
    assert math.isfinite(train(cfg)["test/ppl"])
    ckpt = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["global_step"] > 3 and ckpt["fusion"]["method"] == "wanda_sp"  # trained on from the first run's step 3


def test_checkpoints_stream_to_their_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No serialized copy of the checkpoint in memory (Lightning's own save builds one in an
    io.BytesIO, which tracemalloc sees), the same contents, and a failed write keeps the previous file."""
    ckpt = {"state_dict": {"w": torch.randn(2_000_000)}, "epoch": 1}  # 8 MB of tensor storage
    path = tmp_path / "last.ckpt"

    def peak_python_bytes(io: TorchCheckpointIO) -> int:
        tracemalloc.start()
        try:
            io.save_checkpoint(ckpt, path)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    assert peak_python_bytes(TorchCheckpointIO()) > 8e6 > 1e6 > peak_python_bytes(StreamingCheckpointIO())
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], ckpt["state_dict"]["w"])

    def full_disk(obj: object, f: Path) -> None:
        Path(f).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        StreamingCheckpointIO().save_checkpoint({"epoch": 2}, path)
    assert torch.load(path, weights_only=True)["epoch"] == 1 and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
