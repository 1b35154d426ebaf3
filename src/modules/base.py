"""What every fine-tuning LightningModule shares: the HF model, AdamW and the warm-up schedule.

Callbacks (compression, metrics, distillation) reach the Hugging Face model as ``pl_module.model``
and the scalar probe outputs of the NTK metric as ``pl_module.probe_fns``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import get_linear_schedule_with_warmup, get_polynomial_decay_schedule_with_warmup

from src.models.build import build_model


def to_dict(cfg: DictConfig | dict) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


class FineTuneModule(L.LightningModule):
    """Base class: builds ``self.model`` and the optimizer; subclasses add steps and metrics."""

    head: str  # "classification" | "generation" | "seq2seq" (a key of src.models.build.HEADS)

    def __init__(self, model: DictConfig | dict, task: DictConfig | dict, optim: DictConfig | dict, **config_overrides: Any) -> None:
        super().__init__()
        # Plain dicts in the checkpoint, so that a checkpoint names the model and task it belongs to.
        self.save_hyperparameters({"model": to_dict(model), "task": to_dict(task), "optim": to_dict(optim)})
        self.model = build_model(self.hparams.model, self.head, **config_overrides)
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps module modes as found

    @property
    def probe_fns(self) -> dict[str, Callable]:
        """Scalar outputs f(logits [1, ...], sample) whose empirical NTK the fusion metrics compare."""
        raise NotImplementedError

    def configure_optimizers(self) -> dict[str, Any]:
        o = self.hparams.optim
        # No weight decay on biases and norms, as in the paper's (and every BERT) recipe.
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"],
            # one kernel per parameter: the default multi-tensor (foreach) step allocates temporaries
            # as large as all the parameters together (SmolLM2: ~0.5 GB at every step)
            fused=True,
        )
        total = int(self.trainer.estimated_stepping_batches)
        warmup = int(o["warmup_ratio"] * total)
        if o["schedule"] == "polynomial":
            sched = get_polynomial_decay_schedule_with_warmup(opt, warmup, total, power=o["power"])
        else:
            sched = get_linear_schedule_with_warmup(opt, warmup, total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
