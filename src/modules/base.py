"""What every fine-tuning LightningModule shares: the HF model, AdamW and the warm-up schedule.

Callbacks (compression, metrics, distillation) reach the Hugging Face model as ``pl_module.model``
and the scalar probe outputs of the NTK metric as ``pl_module.probe_fns``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import FSDPStrategy
from omegaconf import DictConfig, OmegaConf
from torchmetrics import Metric

from src.models.build import build_model
from src.modules.lora import add_lora
from src.modules.optim import build_adamw, build_schedule

FINETUNES = ("full", "lora")  # finetune.name (conf/finetune): every weight trains, or LoRA adapters (src.modules.lora)


def to_dict(cfg: DictConfig | dict) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


class FineTuneModule(L.LightningModule):
    """Base class: builds ``self.model`` and the optimizer; subclasses add steps and metrics."""

    head: str  # "classification" | "generation" | "seq2seq" (a key of src.models.build.HEADS)

    def __init__(self, model: DictConfig | dict, task: DictConfig | dict, optim: DictConfig | dict,
                 finetune: DictConfig | dict | None = None, **config_overrides: Any) -> None:
        super().__init__()
        # Plain dicts in the checkpoint, so that a checkpoint names the model and task it belongs to.
        self.save_hyperparameters({"model": to_dict(model), "task": to_dict(task), "optim": to_dict(optim),
                                   "finetune": to_dict(finetune) if finetune is not None else {"name": "full"}})
        self.model = build_model(self.hparams.model, self.head, **config_overrides)
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps module modes as found
        self._param_ndim: dict[str, int] | None = None  # configure_model records it

    def configure_model(self) -> None:
        """After the callbacks' setup compressed the model (Lightning calls this hook after theirs) and before
        the strategy wraps it: add LoRA adapters (``finetune=lora``), record each parameter's dimensions (FSDP flattens them into 1-D shards, and
        weight decay is decided by them), and ``model.compile`` compiles the transformer body in place (the
        state dict keeps its keys): the causal LM's training step calls ``base_model`` itself, not the whole model."""
        self.add_adapters()
        if self._param_ndim is None:
            self._param_ndim = {n: p.ndim for n, p in self.named_parameters()}
        body = self.model.base_model
        if self.hparams.model.get("compile") and body._compiled_call_impl is None:
            body.compile()

    def add_adapters(self) -> None:
        """``finetune=lora``: LoRA adapters on the (compressed) model, once (``src.modules.lora``); its checkpoints
        hold them, so a module that loads one (resume, ``src.export``) adds them first."""
        if self.hparams.finetune["name"] == "lora" and not any("lora_" in n for n, _ in self.model.named_parameters()):
            add_lora(self.model, self.hparams.finetune)

    def _metrics_in_float32(self) -> None:
        # bf16-true converts the whole module, metric states included (a mean of 2.3456 reads 2.3438)
        for m in self.modules():
            if isinstance(m, Metric):
                m.set_dtype(torch.float32)

    def on_fit_start(self) -> None:
        self._metrics_in_float32()

    def on_validation_start(self) -> None:
        self._metrics_in_float32()

    def on_test_start(self) -> None:
        self._metrics_in_float32()

    @property
    def probe_fns(self) -> dict[str, Callable]:
        """Scalar outputs f(logits [1, ...], sample) whose empirical NTK the fusion metrics compare."""
        raise NotImplementedError

    def configure_optimizers(self) -> dict[str, Any]:
        o = self.hparams.optim
        opt = build_adamw(self.named_parameters(), o, self.trainer.precision, self._param_ndim)
        sched = build_schedule(opt, o, int(self.trainer.estimated_stepping_batches))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Clip where Lightning's precision plugins cannot. Under FSDP the norm is over every rank's shards
        (the wrapped root's ``clip_grad_norm_``). Under bf16-mixed Lightning refuses any optimizer that
        could unscale gradients itself (fused AdamW), though only fp16 has a loss scaler: the gradients
        are final, so they are clipped here as its plugin would clip them."""
        strategy, by_norm = self.trainer.strategy, gradient_clip_algorithm != "value"
        if gradient_clip_val and by_norm and isinstance(strategy, FSDPStrategy):
            strategy.model.clip_grad_norm_(gradient_clip_val)
        elif gradient_clip_val and isinstance(self.trainer.precision_plugin, MixedPrecision) and self.trainer.precision == "bf16-mixed":
            params = [p for group in optimizer.param_groups for p in group["params"]]
            clip = torch.nn.utils.clip_grad_norm_ if by_norm else torch.nn.utils.clip_grad_value_
            clip(params, gradient_clip_val)
        else:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
