"""Layer-wise task-specific tuning (docs/methods.md section 3): a Lightning stage between compression and fine-tuning.

For ``distill.epochs`` over the task's training inputs (labels unused), only the compressed layers'
MLP weights train, with Adam, to match the hidden states of the frozen uncompressed model::

    loss = (1/L) sum_l  mean over non-padding tokens ||h_l(x) - h_l^teacher(x)||^2

``DistillCallback`` copies the teacher in ``setup``, which runs before the fusion callback's
``setup`` compresses (``build_callbacks`` puts this callback first), and runs the stage in
``on_fit_start``, after compression and before the first fine-tuning step: a nested
``lightning.Trainer`` fits ``HiddenStateDistillation`` with the outer run's accelerator, devices,
strategy, precision and loggers, and its own progress bar; student and teacher run without dropout,
which would otherwise swamp the compression error the stage learns. Under DDP the nested trainer joins
the process group the outer run already started (no new processes, no new group) and its
sampler splits the data across ranks; the compressed weights stay identical on every rank
because DDP all-reduces their gradients.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from omegaconf import DictConfig
from torch import Tensor, nn
from transformers import PretrainedConfig

from src.models import mlp_io
from src.models.inputs import MODEL_INPUTS
from src.models.outputs import stack_hidden_states
from src.pipeline.settings import CompressionSettings
from src.utils import hardware
from src.utils.errors import ConfigError
from src.utils.memory import release_memory

log = logging.getLogger(__name__)


def check_config(cfg: DictConfig, hf: PretrainedConfig) -> None:
    """Refuse settings distillation cannot use (ConfigError naming them), before any weights load; ``hf``, the
    model's config, is what every ``distill`` option's check receives (this one reads no part of it)."""
    d = cfg.distill
    if cfg.ffn_mode.name == "none":
        raise ConfigError(
            f"distill={d.name} tunes the compressed layers' MLPs, but ffn_mode=none compresses nothing: "
            "choose a compression (e.g. ffn_mode=ntk_cluster) or distill=none."
        )
    if hardware.sharded(cfg.trainer):
        raise ConfigError(f"distill={d.name} runs a nested single-model stage that FSDP cannot wrap around the already "
                          "sharded student: use it with trainer=gpu or trainer=ddp, or distill=none.")
    for key, nullable in (("epochs", False), ("max_steps", True)):
        value = d[key]
        if (value is not None or not nullable) and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"distill.{key}={value!r} must be a positive integer" + (" or null." if nullable else "."))
    if isinstance(d.lr, bool) or not (isinstance(d.lr, (int, float)) and d.lr > 0):
        raise ConfigError(f"distill.lr={d.lr!r} must be a positive number (default: optim.lr).")


def hidden_mse(student: tuple[Tensor, ...], teacher: tuple[Tensor, ...], mask: Tensor) -> Tensor:
    """Mean over layers of the mean over non-padding tokens of the squared L2 distance.

    ``student``/``teacher``: one [B, T, H] tensor per layer; ``mask``: [B, T], 1 for real tokens.
    """
    mask = mask.float()
    per_layer = [(((s.float() - t.float()) ** 2).sum(-1) * mask).sum() / mask.sum() for s, t in zip(student, teacher, strict=True)]
    return torch.stack(per_layer).mean()


class HiddenStateDistillation(L.LightningModule):
    """Trains the student's parameters that require grad to match a frozen teacher's hidden states.

    Both models run in eval mode (no dropout); the caller restores the student's modes afterwards.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, lr: float, log_every_n_steps: int = 10) -> None:
        super().__init__()
        self.student, self.teacher = student, teacher.eval().requires_grad_(False)
        self.lr, self.log_every_n_steps = lr, log_every_n_steps
        self.losses: list[Tensor] = []
        self._log_hyperparams = False  # the outer run's loggers already hold the run's config
        self.train()  # Lightning keeps the modes it finds: set them here

    def cpu(self) -> HiddenStateDistillation:
        # The nested trainer's teardown moves its module to the CPU; the student is the outer run's model,
        # which stays where it trains (a round trip would also drop the outer DDP's gradient hooks).
        return self

    def train(self, mode: bool = True) -> HiddenStateDistillation:
        # Both stay in eval mode: dropout noise in the student would swamp the compression error it
        # should learn (on a tiny BERT, a loss of ~3 from dropout against ~0.003 without).
        super().train(mode)
        self.student.eval()
        self.teacher.eval()
        return self

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS}
        with torch.no_grad():
            target = stack_hidden_states(self.teacher(**inputs, output_hidden_states=True), inputs)
        hidden = stack_hidden_states(self.student(**inputs, output_hidden_states=True), inputs)
        # the mean over every block of every stack (an encoder-decoder model: encoder's and decoder's);
        # [0] of each stack is the embedding output: not a layer
        layers = [len(h) - 1 for h, _ in hidden]
        loss = sum(hidden_mse(h[1:], t[1:], mask) * n for (h, mask), (t, _), n in zip(hidden, target, layers)) / sum(layers)
        self.log("distill/loss", loss, prog_bar=True, batch_size=inputs["input_ids"].shape[0])
        self.losses.append(loss.detach())
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = self.trainer.global_step
        if self.trainer.is_global_zero and (step % self.log_every_n_steps == 0 or step == 1):
            log.info("distill step %d: distill/loss %.5f", step, self.losses[-1].item())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([p for p in self.student.parameters() if p.requires_grad], lr=self.lr)


class DistillCallback(L.Callback):
    """Copies the uncompressed model in ``setup``; distills the compressed layers in ``on_fit_start``."""

    def __init__(self, layers: list[int], lr: float, epochs: int = 1, max_steps: int | None = None,
                 log_every_n_steps: int = 10, trainer_kwargs: dict[str, Any] | None = None, ckpt_path: str | None = None) -> None:
        self.layers, self.lr, self.epochs, self.max_steps = list(layers), lr, epochs, max_steps
        self.ckpt_path = ckpt_path  # a resumed run: its checkpoint's weights are distilled already
        self.log_every_n_steps = log_every_n_steps
        self.trainer_kwargs = trainer_kwargs or {}
        self.teacher: nn.Module | None = None
        self.history: list[float] = []  # this rank's loss per step
        self.summary_metrics: dict[str, float] = {}
        self.done = False

    @classmethod
    def from_config(cls, cfg: DictConfig, compression: CompressionSettings, ckpt_path: str | None = None) -> DistillCallback:
        """From the run's config, its compression settings (the layers to distill) and the checkpoint the run resumes, if any."""
        d, t = cfg.distill, cfg.trainer
        return cls(
            layers=list(compression.layers), lr=float(d.lr), epochs=d.epochs,
            max_steps=d.max_steps, log_every_n_steps=d.log_every_n_steps,
            # the outer run's hardware settings, so the stage runs where fine-tuning runs
            trainer_kwargs={"accelerator": t.accelerator, "devices": t.devices, "strategy": t.get("strategy", "auto"),
                            "num_nodes": t.get("num_nodes", 1), "precision": t.precision,
                            "gradient_clip_val": t.get("gradient_clip_val"), "deterministic": t.get("deterministic", False)},
            ckpt_path=ckpt_path,
        )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self.done or self.teacher is not None:
            return
        if self.ckpt_path:  # trainer.ckpt_path is not set yet at setup
            log.info("distillation skipped: the run resumes from %s", self.ckpt_path)
            return
        # Every rank keeps its own teacher (each computes the loss on its shard), on the device it trains
        # on. The callback order makes this run before the fusion callback compresses.
        hardware.place_for_setup(trainer, pl_module)
        self.teacher = copy.deepcopy(pl_module.model.base_model)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.teacher is None:
            return
        model = pl_module.model
        trainable = {n for i in self.layers for n in mlp_io.mlp_param_names(model, i)}
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        modes = {n: m.training for n, m in model.named_modules()}
        for n, p in model.named_parameters():
            p.requires_grad_(n in trainable)
        stage = HiddenStateDistillation(model.base_model, self.teacher, self.lr, self.log_every_n_steps)
        start = time.perf_counter()
        try:
            with warnings.catch_warnings():  # eval mode is deliberate here (see HiddenStateDistillation)
                warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode")
                self._nested_trainer(trainer).fit(stage, train_dataloaders=trainer.datamodule.train_dataloader())
        finally:
            for n, p in model.named_parameters():
                p.requires_grad_(flags[n])
            for n, m in model.named_modules():
                m.train(modes[n])
            self.teacher = stage.teacher = None  # free the teacher before fine-tuning
            self.done = True
        self.history = [float(x) for x in torch.stack(stage.losses).cpu()] if stage.losses else []
        del stage  # and with it the nested trainer (a reference cycle) holding the stage's Adam states
        release_memory()  # those and the teacher, before fine-tuning allocates its optimizer
        if trainer.is_global_zero:
            self._summarize(time.perf_counter() - start)

    def _nested_trainer(self, trainer: L.Trainer) -> L.Trainer:
        bar = trainer.progress_bar_callback
        return L.Trainer(
            **self.trainer_kwargs, max_epochs=self.epochs, max_steps=self.max_steps or -1,
            logger=trainer.loggers, log_every_n_steps=self.log_every_n_steps,
            callbacks=[TQDMProgressBar(refresh_rate=bar.refresh_rate)] if isinstance(bar, TQDMProgressBar) else [],
            enable_progress_bar=bar is not None, enable_checkpointing=False, enable_model_summary=False,
            num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=trainer.default_root_dir,
        )

    def _summarize(self, seconds: float) -> None:
        """``distill/...`` numbers for ``results.json``: loss at the start and end (mean of the first/last tenth)."""
        h = self.history
        if not h:
            return
        w = max(1, len(h) // 10)
        start, end = sum(h[:w]) / w, sum(h[-w:]) / w
        self.summary_metrics = {"distill/loss_start": start, "distill/loss_end": end, "distill/steps": float(len(h)), "distill/seconds": seconds}
        log.info("distillation: %d steps in %.1fs, distill/loss %.5f -> %.5f", len(h), seconds, start, end)
