"""Logit distillation during recovery (``distill=logits``, docs/methods.md section 7), as Minitron recovers a pruned model.

The frozen uncompressed model teaches every fine-tuning step of a causal LM, on the task's target positions::

    loss = task_weight * CE(student, labels) + kl_weight * T² * KL(softmax(teacher / T) || softmax(student / T))
           + hidden_weight * hidden_mse(student, teacher at hidden_layers)

``LogitDistillCallback`` copies the model in ``setup``, which runs before the fusion callback's ``setup``
compresses it (or, in a resumed run, rebuilds the checkpoint's compressed structure in the freshly loaded
original: ``build_callbacks`` puts this callback first) and before ``configure_model`` adds LoRA adapters,
so the teacher is the uncompressed original in a new run and in a resumed one. It hands the module a
``LogitDistiller`` as a plain attribute (``CausalLMModule.distiller``), not a submodule: the teacher is in
no state_dict (so in no checkpoint), and the strategy neither moves nor wraps it (under DDP every rank
holds its own copy; FSDP, which would have to shard it, is refused). The module's ``training_step`` asks
the distiller for its loss; validation and test score the student alone. The callback drops the teacher
when the fit ends.
"""

from __future__ import annotations

import copy
import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from transformers import PretrainedConfig, PreTrainedModel

from src.callbacks.distill import hidden_mse
from src.models import mlp_io
from src.models.build import task_kind
from src.pipeline.settings import CompressionSettings
from src.utils import hardware
from src.utils.errors import ConfigError
from src.utils.memory import release_memory

if TYPE_CHECKING:
    from src.modules.causal_lm import CausalLMModule

log = logging.getLogger(__name__)


def check_config(cfg: DictConfig, hf: PretrainedConfig) -> None:
    """Refuse settings logit distillation cannot use (ConfigError in one sentence), before any weights load."""
    d = cfg.distill
    if cfg.ffn_mode.name == "none":
        raise ConfigError("distill=logits distils the uncompressed model into the compressed one, but ffn_mode=none compresses "
                          "nothing: choose a compression (e.g. ffn_mode=ntk_cluster) or distill=none.")
    kind = task_kind(cfg.task.kind, hf)
    if kind == "classification":
        raise ConfigError(f"distill=logits distils a causal LM's next-token distribution, and task={cfg.task.name} trains a classifier, "
                          "whose head is as untrained in the uncompressed model as in the compressed one: use a generation task "
                          "(e.g. task=rt_review), or distill=none.")
    if kind != "generation":
        raise ConfigError(f"distill=logits supports decoder-only causal LMs, and model={cfg.model.name} runs as the {kind} "
                          "kind (an encoder-decoder model): use a decoder-only model, or distill=none.")
    if hardware.sharded(cfg.trainer):
        raise ConfigError("distill=logits keeps a whole unsharded teacher on every rank, which FSDP cannot shard with the student: "
                          "use trainer=gpu or trainer=ddp, or distill=none.")

    def number(key: str, ok: Callable[[float], bool], allowed: str) -> float:
        value = d[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
            raise ConfigError(f"distill.{key}={value!r} must be {allowed}.")
        return float(value)

    number("temperature", lambda t: t > 0, "a positive number, e.g. 1.0 (above 1 softens both distributions)")
    weights = {k: number(k, lambda w: w >= 0, "a number >= 0 (0 leaves its term out)") for k in ("kl_weight", "task_weight", "hidden_weight")}
    n_layers, vocab = mlp_io.mlp_shape(hf)[0], hf.get_text_config().vocab_size
    top_k = d.top_k
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= vocab):
        raise ConfigError(f"distill.top_k={top_k!r} must be null (the whole vocabulary) or a number of logits in 1..{vocab}.")
    layers = list(d.hidden_layers) if OmegaConf.is_list(d.hidden_layers) else d.hidden_layers
    if not isinstance(layers, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise ConfigError(f"distill.hidden_layers={layers!r} must be a list of layer indices, e.g. [14,29] ([] for no hidden-state term).")
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise ConfigError(f"distill.hidden_layers has {bad} out of range: model={cfg.model.name} has layers 0..{n_layers - 1}.")
    if len(set(layers)) != len(layers):
        raise ConfigError(f"distill.hidden_layers={layers} repeats a layer.")
    if weights["kl_weight"] == weights["task_weight"] == 0 and (not layers or weights["hidden_weight"] == 0):
        raise ConfigError("distill.kl_weight=0 and distill.task_weight=0 (and no weighted distill.hidden_layers) leave no loss to train: "
                          "raise distill.kl_weight, e.g. to 1.0.")


def kl_per_position(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)) of each row, [n], from logits [n, V] (or [n, k]) in float32."""
    t = F.log_softmax(teacher / temperature, dim=-1)
    return (t.exp() * (t - F.log_softmax(student / temperature, dim=-1))).sum(-1)


class LogitDistiller:
    """The frozen teacher and the loss of a distilled training step (a plain object: see the module's docstring).

    ``top_k``: the KL runs over the teacher's k largest logits of each position only, both distributions
    renormalised over those k tokens (a softmax of the k teacher logits and of the student's logits of the
    same tokens); null: over the whole vocabulary. ``hidden_layers``: the blocks whose outputs (the last
    block's after the final norm) the hidden-state term compares.
    """

    def __init__(self, teacher: PreTrainedModel, temperature: float, kl_weight: float, task_weight: float,
                 top_k: int | None = None, hidden_layers: Sequence[int] = (), hidden_weight: float = 0.0) -> None:
        self.teacher = teacher.eval().requires_grad_(False)
        self.temperature, self.kl_weight, self.task_weight, self.top_k = temperature, kl_weight, task_weight, top_k
        self.hidden_layers, self.hidden_weight = list(hidden_layers), hidden_weight
        self.teacher_seconds: list[float] = []  # per step: the teacher's share of the step's time

    def terms(self, module: CausalLMModule, batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], float]:
        """The step's loss terms, each a mean over the batch's N target positions (``hidden_mse``: over its real
        tokens): ``task_loss`` (CE), ``distill_kl`` (the KL at temperature T, before the T² factor) and, with
        ``hidden_layers``, ``hidden_mse``; and the seconds of the teacher's forward (its body; with ``top_k`` its
        output layer too, which otherwise runs inside the student's chunks)."""
        hidden = bool(self.hidden_layers)
        start = self._clock(batch["input_ids"])
        with torch.no_grad():
            x_t, _, out_t = module.target_rows(self.teacher, batch, hidden)  # [N, h]
            teacher_rows = [x_t] if self.top_k is None else self._top_k(module, x_t)
        seconds = self._clock(batch["input_ids"]) - start
        x, y, out = module.target_rows(module.model, batch, hidden)  # [N, h], [N]
        head, t_head = module.model.get_output_embeddings(), self.teacher.get_output_embeddings()

        def rows(x: Tensor, y: Tensor, *t: Tensor) -> Tensor:
            logits = head(x).float()  # [n, V]
            if self.top_k is None:
                with torch.no_grad():  # the teacher's logits of the same rows [n, V]
                    teacher = t_head(t[0]).float()
                student = logits
            else:
                teacher, student = t[0], logits.gather(-1, t[1])  # [n, k]: the teacher's top k and the student's same tokens
            return torch.stack([F.cross_entropy(logits, y, reduction="none"), kl_per_position(student, teacher, self.temperature)], -1)

        task, kl = module.by_head_chunks(rows, x, y, *teacher_rows).mean(0)  # [N, 2] -> two scalars
        terms = {"task_loss": task, "distill_kl": kl}
        if hidden:  # hidden_states[0] is the embedding output, [i + 1] block i's [B, T, h]
            student_h, teacher_h = (tuple(o.hidden_states[i + 1] for i in self.hidden_layers) for o in (out, out_t))
            terms["hidden_mse"] = hidden_mse(student_h, teacher_h, batch["attention_mask"])
        return terms, seconds

    def loss(self, terms: dict[str, Tensor]) -> Tensor:
        """task_weight * CE + kl_weight * T² * KL (+ hidden_weight * hidden MSE): T² keeps the KL's gradients at
        the scale of T = 1 (Hinton et al.), so the weights mean the same at every temperature."""
        loss = self.task_weight * terms["task_loss"] + self.kl_weight * self.temperature**2 * terms["distill_kl"]
        return loss + self.hidden_weight * terms["hidden_mse"] if "hidden_mse" in terms else loss

    def training_loss(self, module: CausalLMModule, batch: dict[str, Tensor]) -> Tensor:
        """The step's loss; its terms logged as ``train/<term>`` and the teacher's seconds as ``perf/teacher_s``."""
        terms, seconds = self.terms(module, batch)
        self.teacher_seconds.append(seconds)
        module.log_dict({**{f"train/{k}": v for k, v in terms.items()}, "perf/teacher_s": seconds}, batch_size=batch["input_ids"].shape[0])
        return self.loss(terms)

    def _top_k(self, module: CausalLMModule, x_t: Tensor) -> list[Tensor]:
        """The teacher's k largest logits [N, k] (float32) and their token ids [N, k], one chunk's logits [n, V] at a time."""
        top = [self.teacher.get_output_embeddings()(c).float().topk(self.top_k, dim=-1) for c in x_t.split(module.head_chunk)]
        return [torch.cat([t.values for t in top]), torch.cat([t.indices for t in top])]

    @staticmethod
    def _clock(like: Tensor) -> float:
        # CUDA runs asynchronously: wait for the device, so that the teacher's seconds are its own
        if like.is_cuda:
            torch.cuda.synchronize(like.device)
        return time.perf_counter()


class LogitDistillCallback(L.Callback):
    """Copies the uncompressed model in ``setup`` and hands the module its ``LogitDistiller`` for the fit."""

    def __init__(self, temperature: float, kl_weight: float, task_weight: float, top_k: int | None = None,
                 hidden_layers: Sequence[int] = (), hidden_weight: float = 0.0) -> None:
        self.settings = {"temperature": temperature, "kl_weight": kl_weight, "task_weight": task_weight, "top_k": top_k,
                         "hidden_layers": list(hidden_layers), "hidden_weight": hidden_weight}
        self.distiller: LogitDistiller | None = None
        self.summary_metrics: dict[str, float] = {}  # read into results.json, as every callback's

    @classmethod
    def from_config(cls, cfg: DictConfig, compression: CompressionSettings, ckpt_path: str | None = None) -> LogitDistillCallback:
        """From the run's config; ``compression`` and ``ckpt_path`` (the builders' common signature) change nothing: the
        teacher is the whole uncompressed model, and a resumed run's is copied from the freshly loaded original too."""
        d = cfg.distill
        return cls(temperature=float(d.temperature), kl_weight=float(d.kl_weight), task_weight=float(d.task_weight),
                   top_k=d.top_k, hidden_layers=list(d.hidden_layers), hidden_weight=float(d.hidden_weight))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self.distiller is not None:
            return
        # on the device it trains on (every rank its own); the callback order makes this run before compression
        device = hardware.place_for_setup(trainer, pl_module)
        model = pl_module.model
        try:
            teacher = copy.deepcopy(model)
        except torch.OutOfMemoryError:
            release_memory()
            raise ConfigError(f"distill=logits keeps a frozen copy of the uncompressed model ({_bytes(model) / 2**30:.2f} GB), which does "
                              f"not fit beside the model on {device}: use a device with more memory, or distill=none.") from None
        self.distiller = pl_module.distiller = LogitDistiller(teacher, **self.settings)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.distiller is None:
            return
        student = pl_module.model
        # the training dtype: bf16-true converted the student after setup; under the mixed precisions both keep
        # float32 weights and run under the step's autocast
        teacher = self.distiller.teacher.to(device=hardware.model_device(student), dtype=student.get_input_embeddings().weight.dtype)
        self.summary_metrics = {"perf/teacher_mb": _bytes(teacher) / 2**20}
        if trainer.is_global_zero:
            log.info("distill=logits: the teacher (the uncompressed model, %.1f MB) is frozen beside the student", self.summary_metrics["perf/teacher_mb"])
            for logger in trainer.loggers:
                logger.log_metrics(self.summary_metrics, step=0)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.distiller is not None and self.distiller.teacher_seconds:
            self.summary_metrics["perf/teacher_s"] = statistics.median(self.distiller.teacher_seconds)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self.distiller is not None:  # the test after the fit scores the student alone
            pl_module.distiller = self.distiller = None
            release_memory()


def _bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters (tied ones once) and buffers."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
