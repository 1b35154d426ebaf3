"""Where a run computes: the accelerator and precision it resolves to, and where the model sits at setup.

Two decisions live here and nowhere else:

- ``resolve_trainer`` (the preflight): ``trainer.accelerator=auto`` and ``trainer.precision=auto``
  become what this machine has (a CUDA GPU: ``gpu`` with ``bf16-mixed`` where the GPU supports
  bfloat16, else ``16-mixed``; otherwise ``cpu`` with ``32-true``), and a GPU setting this machine
  cannot honour is refused in one sentence before anything loads.
- ``place_for_setup`` (the callbacks' ``setup``): Lightning calls a callback's ``setup`` before its
  strategy moves the model to the device, so the callbacks that compute at setup (compression,
  calibration, the approximation metrics, the distillation teacher's copy) first move the model to
  the device it will train on; every input they build then follows the model (``model_device``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from omegaconf import DictConfig, open_dict
from torch import nn

from src.utils.errors import ConfigError
from src.utils.memory import release_memory

log = logging.getLogger(__name__)

PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true")
GPU_ACCELERATORS = ("gpu", "cuda")
# strategies that shard the model across devices (after setup): the whole model may not fit one of them
SHARDED = ("fsdp",)


def _gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _bf16_gpu() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def _strategy_name(trainer_cfg: DictConfig) -> str:
    strategy = trainer_cfg.get("strategy", "auto")
    return str(strategy.get("_target_", "")).rsplit(".", 1)[-1].lower() if isinstance(strategy, DictConfig) else str(strategy)


def sharded(trainer_cfg: DictConfig) -> bool:
    """Whether the trainer's strategy shards the model (FSDP)."""
    return any(s in _strategy_name(trainer_cfg) for s in SHARDED)


def resolve_trainer(cfg: DictConfig) -> None:
    """Fill ``trainer.accelerator``/``trainer.precision`` left at ``auto`` and refuse what the hardware lacks."""
    t = cfg.trainer
    gpus, strategy = _gpus(), _strategy_name(t)
    with open_dict(cfg):
        if t.accelerator == "auto":
            t.accelerator = "gpu" if gpus else "cpu"
        if t.precision == "auto":
            t.precision = ("bf16-mixed" if _bf16_gpu() else "16-mixed") if t.accelerator in GPU_ACCELERATORS else "32-true"
    if t.accelerator not in ("cpu", *GPU_ACCELERATORS):
        raise ConfigError(f"trainer.accelerator={t.accelerator!r} must be auto, cpu or gpu.")
    if str(t.precision) not in PRECISIONS:
        raise ConfigError(f"trainer.precision={t.precision!r} must be auto or one of {', '.join(PRECISIONS)}.")
    on_gpu = t.accelerator in GPU_ACCELERATORS
    if on_gpu and not gpus:
        raise ConfigError(f"trainer.accelerator={t.accelerator} (trainer=gpu, ddp and fsdp) needs a CUDA GPU, and none is visible here: "
                          "use trainer=cpu, or the default trainer=auto, which takes what the machine has.")
    if sharded(t) and not on_gpu:
        raise ConfigError(f"trainer.strategy={strategy} shards the model across GPUs, and Lightning's FSDP runs on CUDA only: "
                          "use it on a GPU machine, or trainer=ddp_sim to try the multi-process path on the CPU.")
    devices = t.get("devices", 1)
    if on_gpu and isinstance(devices, int) and devices > gpus:
        raise ConfigError(f"trainer.devices={devices} asks for more GPUs than the {gpus} visible here: lower it, or -1 for all of them.")
    if on_gpu and "bf16" in t.precision and not _bf16_gpu():
        raise ConfigError(f"trainer.precision={t.precision} needs bfloat16, which {torch.cuda.get_device_name(0)} lacks: use 16-mixed or 32-true.")
    if not on_gpu and t.precision == "16-mixed":
        raise ConfigError("trainer.precision=16-mixed is float16 autocast, which Lightning runs on CUDA only: on the CPU use bf16-mixed or 32-true.")
    where = f"{min(devices, gpus) if isinstance(devices, int) and devices > 0 else gpus} x {torch.cuda.get_device_name(0)}" if on_gpu else "the CPU"
    log.info("trainer: %s on %s, precision %s, strategy %s", t.accelerator, where, t.precision, strategy)


def setup_device(trainer: Any) -> torch.device:
    """Where the model sits while the callbacks compress, calibrate and measure at ``setup``: the device
    it will train on, except under a sharding strategy, where the whole model may not fit one device
    (it stays on the CPU; each layer is still compressed on the device, ``compress_model``)."""
    name = type(trainer.strategy).__name__.lower()
    return torch.device("cpu") if any(s in name for s in SHARDED) else trainer.strategy.root_device


def compute_device(trainer: Any) -> torch.device:
    """Where one layer's compression runs (the accelerator, under every strategy)."""
    return trainer.strategy.root_device


def place_for_setup(trainer: Any, module: nn.Module) -> torch.device:
    """Move ``module`` to ``setup_device`` (a no-op once there) and return that device."""
    device = setup_device(trainer)
    if model_device(module) != device:
        module.to(device)
    return device


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's parameters (every input a setup-time computation builds goes there)."""
    return next(model.parameters()).device


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A batch's tensors on ``device`` (anything else as is)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


@contextmanager
def refuse_oom(phase: str, settings: str) -> Iterator[None]:
    """A device out of memory in ``phase`` becomes one sentence naming the ``settings`` to lower."""
    try:
        yield
    except torch.OutOfMemoryError:
        release_memory()
        raise ConfigError(f"{phase} ran out of GPU memory: lower {settings}.") from None
