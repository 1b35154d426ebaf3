"""What the CPU can show of the GPU path: other precisions with clipping, where setup puts the model and
its inputs, tensors a step creates without a device, and the hardware refusals (src.utils.hardware)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.overrides import TorchFunctionMode

from src.builders import build_callbacks, build_data_and_module
from src.callbacks import fusion
from src.callbacks.fusion import FusionCallback
from src.modules.optim import implementation
from src.pipeline.fuse import FusionReport
from src.preflight import preflight
from src.train import train
from src.utils import hardware
from src.utils.errors import ConfigError
from tests.conftest import ROOT, assert_refused_before_loading


@pytest.mark.parametrize("precision,model,task,method", [
    ("bf16-mixed", "tiny_llama", "rt_review", "ntk_cluster"), ("bf16-mixed", "tiny_bert", "rt_polarity", "wanda_sp"),
    ("bf16-true", "tiny_bert", "rt_polarity", "wanda_sp"),
    pytest.param("bf16-true", "tiny_llama", "rt_review", "ntk_cluster", marks=pytest.mark.slow),
])
def test_trains_with_clipping_at_precision(compose_cfg, precision: str, model: str, task: str, method: str) -> None:
    """The GPU default bf16-mixed stopped at the first step (fused AdamW + clipping); bf16-true is offered for LLMs."""
    cfg = compose_cfg([f"model={model}", f"task={task}", f"ffn_mode={method}", f"trainer.precision={precision}",
                       "trainer.gradient_clip_val=1.0", "trainer.max_steps=2"])
    metrics = train(cfg)
    res = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
    assert res["status"] == "completed" and "fusion/ntk_sign_rel_err" in metrics
    assert all(torch.isfinite(torch.tensor(v)) for k, v in metrics.items() if k.startswith(("test/", "val/")) and "ppl" not in k)


def test_bf16_mixed_clips_the_fused_optimizers_gradients(compose_cfg) -> None:
    """Under bf16-mixed the module clips itself (Lightning's plugin refuses a fused optimizer): the norm ends at the limit."""
    cfg = compose_cfg(["model=tiny_bert", "ffn_mode=none"])
    _, module = build_data_and_module(cfg, preflight(cfg))
    module._trainer = SimpleNamespace(strategy=object(), precision="bf16-mixed", precision_plugin=MixedPrecision("bf16-mixed", "cpu"))
    opt = torch.optim.AdamW(module.parameters(), **implementation("bf16-mixed"))
    assert opt.defaults["fused"]
    for p in module.parameters():
        p.grad = torch.full_like(p, 3.0)
    module.configure_gradient_clipping(opt, 0.5, "norm")
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in module.parameters()]))
    assert norm == pytest.approx(0.5, rel=1e-3)  # clip_grad_norm_ divides by norm + 1e-6


@pytest.mark.parametrize("precision,impl", [("32-true", "fused"), ("bf16-mixed", "fused"), ("bf16-true", "fused"), ("16-mixed", "foreach")])
def test_optimizer_implementation_by_precision(precision: str, impl: str) -> None:
    """fp16's GradScaler unscales before clipping, which a fused step (unscaling inside) does not allow."""
    assert implementation(precision) == {impl: True}


def test_setup_moves_the_model_to_its_training_device_before_compressing(compose_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning calls a callback's setup before moving the model: compression, calibration and the metrics
    must meet the model on the device it trains on. ``meta`` stands in for a GPU (mixing it with the CPU raises)."""
    cfg = compose_cfg(["model=tiny_bert", "ffn_mode=wanda_sp", "ffn_mode.refit=lstsq"])
    checked = preflight(cfg)
    datamodule, module = build_data_and_module(cfg, checked)
    datamodule.setup("fit")
    callback = next(c for c in build_callbacks(cfg, checked.compression) if isinstance(c, FusionCallback))
    seen: dict[str, set[torch.device]] = {"model": set(), "inputs": set(), "compute": set()}

    def fake_compress(model, settings, *, calibrator, device, **kwargs):  # records where the pieces meet
        seen["model"].add(hardware.model_device(model))
        seen["inputs"].update(v.device for b in calibrator.batches for v in b.values() if torch.is_tensor(v))
        seen["compute"].add(torch.device(device))
        return FusionReport({"method": "wanda_sp", "layers": [], "layer_specs": {}}, 1, 1, 0.0)

    def fake_metrics(original, model, layers, batch, *args):
        seen["model"].update({hardware.model_device(original), hardware.model_device(model)})
        seen["inputs"].update(v.device for v in batch.values() if torch.is_tensor(v))
        metrics = dict.fromkeys(["fusion/hidden_rel_err", "fusion/ntk_sign_rel_err", "fusion/ntk_std_rel_err", "fusion/output_rel_err"], 0.0)
        return metrics, []

    monkeypatch.setattr(fusion, "Calibrator", lambda batches, sequential: SimpleNamespace(batches=batches))
    monkeypatch.setattr(fusion, "compress_model", fake_compress)
    monkeypatch.setattr(fusion, "approximation_metrics", fake_metrics)
    meta = torch.device("meta")
    trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=meta), datamodule=datamodule, is_global_zero=True,
                              world_size=1, global_rank=0)
    callback._compressed_tensors = lambda model: []  # the digest reads values, which meta tensors lack
    callback.setup(trainer, module, "fit")
    assert seen == {"model": {meta}, "inputs": {meta}, "compute": {meta}}


class _FactoryWithoutDevice(TorchFunctionMode):
    """Records the project's calls of tensor factories that name no device: on a GPU they create CPU tensors."""

    FACTORIES = {torch.arange, torch.zeros, torch.ones, torch.full, torch.empty, torch.tensor, torch.eye, torch.rand,
                 torch.randn, torch.randint, torch.randperm, torch.linspace, torch.as_tensor}

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.FACTORIES and "device" not in kwargs:
            for frame in inspect.stack(context=0)[1:]:
                if frame.filename.startswith(str(ROOT / "src")):
                    self.calls.append(f"{Path(frame.filename).relative_to(ROOT)}:{frame.lineno} {func.__name__}")
                    break
        return func(*args, **kwargs)


@pytest.mark.parametrize("model,task", [("tiny_bert", "rt_polarity"), ("tiny_llama", "rt_review"), ("tiny_t5", "rt_polarity"),
                                        ("tiny_mixtral", "rt_review")])
def test_steps_create_no_tensor_off_the_models_device(compose_cfg, model: str, task: str) -> None:
    """Every tensor a training step creates, and the same step's evaluation path (no gradients, eval mode),
    follows its inputs' device (no bare factory call in src/)."""
    cfg = compose_cfg([f"model={model}", f"task={task}", "ffn_mode=none"])
    datamodule, module = build_data_and_module(cfg, preflight(cfg))
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    with _FactoryWithoutDevice() as mode:
        module.training_step(batch, 0).backward()
        with torch.no_grad():
            module.eval()
            module.training_step(batch, 0)
    assert mode.calls == []


@pytest.mark.parametrize("overrides,message", [
    (["trainer=gpu"], "needs a CUDA GPU, and none is visible here"),
    (["trainer=ddp"], "needs a CUDA GPU, and none is visible here"),
    (["trainer=fsdp"], "needs a CUDA GPU, and none is visible here"),
    (["trainer=ddp_sim", "trainer.strategy=fsdp"], "Lightning's FSDP runs on CUDA only"),
    (["trainer=cpu", "trainer.precision=16-mixed"], "trainer.precision=16-mixed is float16 autocast"),
    (["trainer.precision=fp8"], "trainer.precision='fp8' must be auto or one of"),
    (["trainer.accelerator=tpu"], "trainer.accelerator='tpu' must be auto, cpu or gpu"),
])
def test_hardware_refused_before_loading(compose_cfg, monkeypatch: pytest.MonkeyPatch, overrides: list[str], message: str) -> None:
    monkeypatch.setattr(hardware, "_gpus", lambda: 0)
    assert_refused_before_loading(compose_cfg, monkeypatch, overrides, message)


def _one_gpu(monkeypatch: pytest.MonkeyPatch, bf16: bool) -> None:
    monkeypatch.setattr(hardware, "_gpus", lambda: 1)
    monkeypatch.setattr(hardware, "_bf16_gpu", lambda: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Test GPU")


def test_more_gpus_than_visible_refused(compose_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    _one_gpu(monkeypatch, bf16=True)
    assert_refused_before_loading(compose_cfg, monkeypatch, ["trainer=gpu", "trainer.devices=4"], "trainer.devices=4 asks for more GPUs than the 1 visible")


def test_bf16_on_a_gpu_without_it_refused(compose_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    _one_gpu(monkeypatch, bf16=False)
    assert_refused_before_loading(compose_cfg, monkeypatch, ["trainer=gpu", "trainer.precision=bf16-mixed"], "needs bfloat16, which Test GPU lacks")


@pytest.mark.parametrize("gpus,bf16,expected", [(0, False, ("cpu", "32-true")), (1, True, ("gpu", "bf16-mixed")), (1, False, ("gpu", "16-mixed"))])
def test_auto_takes_what_the_machine_has(compose_cfg, monkeypatch: pytest.MonkeyPatch, gpus: int, bf16: bool, expected: tuple) -> None:
    _one_gpu(monkeypatch, bf16)
    monkeypatch.setattr(hardware, "_gpus", lambda: gpus)
    cfg = compose_cfg([])
    assert (cfg.trainer.accelerator, cfg.trainer.precision) == ("auto", "auto")
    hardware.resolve_trainer(cfg)
    assert (cfg.trainer.accelerator, cfg.trainer.precision) == expected
    if gpus:  # trainer=cpu keeps the CPU figures reproducible on a GPU machine
        cpu = compose_cfg(["trainer=cpu"])
        hardware.resolve_trainer(cpu)
        assert (cpu.trainer.accelerator, cpu.trainer.precision) == ("cpu", "32-true")


def test_gpu_out_of_memory_in_the_metrics_is_one_sentence(compose_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    """An OOM in the metrics names the settings to lower; results.json says failed, nothing else is written."""
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    monkeypatch.setattr(fusion, "approximation_metrics", oom)
    cfg = compose_cfg(["model=tiny_bert"])
    with pytest.raises(ConfigError, match=r"^the approximation metrics ran out of GPU memory: lower approx_metrics.max_memory_gb"):
        train(cfg)
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()


def test_bf16_true_checkpoint_exports(compose_cfg, tmp_path: Path) -> None:
    """A checkpoint whose weights are bfloat16 (trainer.precision=bf16-true) exports; the export computes the checkpoint's function."""
    from transformers import AutoModelForCausalLM

    from src.export.__main__ import export
    from src.export.exported import load_exported
    from src.modules.causal_lm import CausalLMModule
    from src.pipeline.fuse import apply_spec

    cfg = compose_cfg(["model=tiny_llama", "task=rt_review", "ffn_mode.layers=[1,3]", "approx_metrics.enabled=false",
                       "trainer.precision=bf16-true", "trainer.max_steps=2", "test=false"])
    train(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    c = torch.load(ckpt, weights_only=True)
    assert next(iter(c["state_dict"].values())).dtype == torch.bfloat16
    out = export(str(ckpt), str(tmp_path / "export"), fmt="hf")
    ref = CausalLMModule(c["hyper_parameters"]["model"], c["hyper_parameters"]["task"], c["hyper_parameters"]["optim"])
    apply_spec(ref.model, c["fusion"])
    ref.load_state_dict(c["state_dict"])
    ids = torch.randint(1, 1000, (2, 7))
    loaded = load_exported(out, AutoModelForCausalLM).float().eval()
    torch.testing.assert_close(loaded(input_ids=ids).logits, ref.model.float().eval()(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_distillation_under_fsdp_refused(compose_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    _one_gpu(monkeypatch, bf16=True)
    assert hardware.sharded(compose_cfg(["trainer=fsdp"]).trainer) and not hardware.sharded(compose_cfg(["trainer=ddp"]).trainer)
    assert_refused_before_loading(compose_cfg, monkeypatch, ["trainer=fsdp", "model=tiny_bert", "distill=hidden_mse"],
                                  "FSDP cannot wrap around the already sharded student")


def test_weight_decay_groups_survive_fsdp_flattening() -> None:
    """Under FSDP every parameter is a 1-D shard when the optimizer is built: the dimensions recorded before decide."""
    from src.modules.optim import FSDP_PREFIX, param_groups

    flat = [(f"model.{FSDP_PREFIX}layers.0.weight", nn_param(6)), (f"model.{FSDP_PREFIX}layers.0.bias", nn_param(3)),
            (f"model.{FSDP_PREFIX}ln_f.weight", nn_param(3))]
    ndim = {"model.layers.0.weight": 2, "model.layers.0.bias": 1, "model.ln_f.weight": 1}
    decay, no_decay = param_groups(flat, 0.1, ndim)
    assert [len(decay["params"]), len(no_decay["params"])] == [1, 2] and decay["params"][0] is flat[0][1]


def nn_param(n: int) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.zeros(n))


def test_metric_states_stay_float32_under_bf16_true(compose_cfg) -> None:
    """bf16-true converts the whole module, torchmetrics' states too (a mean of 2.3456 read 2.3438)."""
    cfg = compose_cfg(["model=tiny_llama", "task=rt_review", "ffn_mode=none"])
    _, module = build_data_and_module(cfg, preflight(cfg))
    module.to(torch.bfloat16)
    module.on_validation_start()
    metric = module.nll["val"]
    metric.update(torch.full((3,), 2.3456))
    assert metric.compute().dtype == torch.float32 and metric.compute().item() == pytest.approx(2.3456, rel=1e-6)


@pytest.mark.parametrize("model,task", [("tiny_llama", "rt_review"), ("tiny_bert", "rt_polarity")])
def test_compile_wraps_the_body_every_step_runs(compose_cfg, model: str, task: str) -> None:
    """model.compile=true compiles the transformer body: the causal LM's step calls base_model, not the whole model."""
    cfg = compose_cfg([f"model={model}", f"task={task}", "ffn_mode=none", "model.compile=true"])
    _, module = build_data_and_module(cfg, preflight(cfg))
    module.configure_model()
    assert module.model.base_model._compiled_call_impl is not None
    assert set(module.state_dict()) == set(build_data_and_module(compose_cfg([f"model={model}", f"task={task}", "ffn_mode=none"]),
                                                                 preflight(cfg))[1].state_dict())
