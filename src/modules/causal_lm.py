"""Causal-LM fine-tuning for data-to-text generation: perplexity, then generation and its corpus metrics.

Batches come from ``src.data.generation.GenerationDataModule``: training batches are (source,
target) sequences with labels -100 outside the target; evaluation batches are unique sources,
holding every (source, reference) sequence for perplexity and the left-padded prompts to generate from.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, EarlyStopping
from torch.utils.checkpoint import checkpoint
from torchmetrics import MeanMetric
from torchmetrics.functional.text import chrf_score, rouge_score, sacre_bleu_score, translation_edit_rate
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from src.modules.base import FineTuneModule
from src.utils.io import write_text

log = logging.getLogger(__name__)


def corpus_metrics(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """BLEU (SacreBLEU), ROUGE-L F (best over references), TER and chrF, each with every reference; 0..1 scales."""
    rouge = rouge_score(predictions, references, rouge_keys="rougeL", accumulate="best")
    return {
        "bleu": float(sacre_bleu_score(predictions, references)),
        "rouge_l": float(rouge["rougeL_fmeasure"]),
        "ter": float(translation_edit_rate(predictions, references)),
        "chrf": float(chrf_score(predictions, references)),
    }


@torch.no_grad()
def generate_texts(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                   eos_token_id: int, pad_token_id: int, max_new_tokens: int, num_beams: int = 1) -> list[str]:
    """Decode continuations of left-padded prompts [B, S] (an encoder-decoder model: its outputs for the
    encoder inputs [B, S]): greedy for ``num_beams`` 1, else beam search.

    A fresh GenerationConfig, so that no sampling default of the model's own generation config applies.
    """
    encoder_decoder = model.config.is_encoder_decoder  # prompts are the encoder's input, not the start of the output
    start = {"decoder_start_token_id": model.config.decoder_start_token_id} if encoder_decoder else {}
    config = GenerationConfig(max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
                              eos_token_id=eos_token_id, pad_token_id=pad_token_id, **start)
    out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config)  # [B, S + new]; enc-dec [B, 1 + new]
    texts = tokenizer.batch_decode(out if encoder_decoder else out[:, prompt_ids.shape[1]:], skip_special_tokens=True)
    return [" ".join(text.split()) for text in texts]


def gather_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every rank's rows (DDP), deduplicated by ``idx`` (the sampler pads with repeats) and in order."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts: list[list[dict[str, Any]]] = [[] for _ in range(dist.get_world_size())]
        dist.all_gather_object(parts, rows)
        rows = [r for part in parts for r in part]
    return sorted({r["idx"]: r for r in rows}.values(), key=lambda r: r["idx"])


class Distiller(Protocol):
    """What ``training_step`` asks of a distillation loss: the step's loss on a batch (``distill=logits``:
    ``LogitDistiller`` of ``src.callbacks.logit_distill``, which sits above this module and hands it over)."""

    def training_loss(self, module: CausalLMModule, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...


class CausalLMModule(FineTuneModule):
    """AutoModelForCausalLM fine-tuning with the loss on the target tokens; generation at test time."""

    head = "generation"
    head_chunk = 128  # target positions per checkpointed chunk of the output layer (see token_nll)

    def __init__(self, model: Any, task: Any, optim: Any, finetune: Any = None, output_dir: str | None = None) -> None:
        super().__init__(model, task, optim, finetune)
        t = self.hparams.task
        self.output_dir = output_dir
        self.eval_prefixes: list[str] = list(t["eval_splits"])
        # token-averaged NLL over a whole split (synced across ranks): exp of it is the perplexity
        self.nll = torch.nn.ModuleDict({p: MeanMetric() for p in [*t["eval_splits"], *t["test_splits"]]})
        self._generations: dict[str, list[dict[str, Any]]] = {}
        # distill=logits: set for the fit by its callback; a plain attribute, so that the teacher it holds is no
        # submodule (in no state_dict or checkpoint, neither moved nor wrapped by the strategy)
        self.distiller: Distiller | None = None

    @property
    def probe_fns(self) -> dict[str, Callable]:
        from src.metrics import ntk

        return {"target_loglik": ntk.target_loglik}

    def configure_callbacks(self) -> list[Callback]:
        """Early stopping on the monitored metric (validation perplexity) when ``task.early_stopping``."""
        t = self.hparams.task
        if not t.get("early_stopping"):
            return []
        return [EarlyStopping(monitor=t["monitor"], mode=t["monitor_mode"], patience=t["patience"])]

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [B, T, V]

    def target_rows(self, model: PreTrainedModel, batch: dict[str, torch.Tensor],
                    output_hidden_states: bool = False) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """``model``'s final hidden states at the N target positions [N, h], the tokens they predict [N]
        (position t predicts labels[t + 1], HF's causal-LM shift) and its transformer body's output.

        ``model`` is this module's model or one of its architecture (the distillation teacher). No KV
        cache: nothing reads it, and during validation it would hold every layer's keys and values.
        """
        out = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                               output_hidden_states=output_hidden_states)
        target = batch["labels"][:, 1:]  # [B, T-1]
        keep = target != -100
        return out.last_hidden_state[:, :-1][keep], target[keep], out

    def by_head_chunks(self, fn: Callable[..., torch.Tensor], *rows: torch.Tensor) -> torch.Tensor:
        """``fn`` (which runs the output layer) over the target positions' ``rows`` (each [N, ...]), its
        outputs [n, ...] concatenated to [N, ...].

        The output layer runs on the N target positions only, not on all B·T: with a large
        vocabulary it is most of the cost (and memory) of a small model. With
        ``model.gradient_checkpointing`` a training step runs it in chunks of ``head_chunk``
        positions, each recomputed in the backward, so that one chunk's logits [head_chunk, V] and
        their gradients are held instead of all N's (about four [N, V] float tensors at once; with
        SmolLM2's vocabulary of 49152, 200 KB each per target position). Without gradients
        (validation, test) it always runs chunk by chunk: an evaluation batch of 32 sequences would
        otherwise hold ~400 MB of logits and log-probabilities.
        """
        if torch.is_grad_enabled() and not (self.hparams.model.get("gradient_checkpointing") and self.training):
            return fn(*rows)
        chunks = list(zip(*(r.split(self.head_chunk) for r in rows)))
        if not torch.is_grad_enabled():  # evaluation: nothing to keep, one chunk's logits at a time
            return torch.cat([fn(*c) for c in chunks])
        return torch.cat([checkpoint(fn, *c, use_reentrant=False) for c in chunks])

    def token_nll(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """NLL of every target token, [N] (``target_rows``), the output layer run by ``by_head_chunks``."""
        x, y, _ = self.target_rows(self.model, batch)  # [N, h], [N]
        head = self.model.get_output_embeddings()
        return self.by_head_chunks(lambda x, y: F.cross_entropy(head(x).float(), y, reduction="none"), x, y)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.distiller.training_loss(self, batch) if self.distiller is not None else self.token_nll(batch).mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def _eval_step(self, batch: dict[str, Any], prefix: str) -> None:
        # every reference of every source: chunks of eval_batch_size sequences, each cut to its longest
        size = self.hparams.task["eval_batch_size"]
        for start in range(0, batch["input_ids"].shape[0], size):
            rows = slice(start, start + size)
            width = int(batch["attention_mask"][rows].sum(1).max())
            chunk = {k: batch[k][rows, :width] for k in ("input_ids", "attention_mask", "labels")}
            self.nll[prefix].update(self.token_nll(chunk))

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, self.eval_prefixes[dataloader_idx])

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        prefix = self.trainer.datamodule.test_prefixes[dataloader_idx]
        self._eval_step(batch, prefix)
        self._collect_generations(batch, prefix)

    def _collect_generations(self, batch: dict[str, Any], prefix: str) -> None:
        """Generate from the batch's prompts and keep (source, prediction, references) rows for the epoch's end."""
        predictions = self.generate(batch["prompt_ids"], batch["prompt_mask"])
        self._generations.setdefault(prefix, []).extend(
            {"idx": int(i), "source": s, "prediction": p, "references": r}
            for i, s, p, r in zip(batch["idx"], batch["sources"], predictions, batch["references"])
        )

    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> list[str]:
        """Continuations of left-padded prompts [B, S] with the task's decoding settings."""
        t, dm = self.hparams.task, self.trainer.datamodule
        return generate_texts(self.model, dm.tokenizer, prompt_ids, prompt_mask, eos_token_id=dm.eos_token_id,
                              pad_token_id=dm.pad_token_id, max_new_tokens=t["max_new_tokens"], num_beams=t["num_beams"])

    def _log_perplexity(self, prefixes: list[str]) -> None:
        for p in prefixes:
            if not self.nll[p].update_count:
                continue
            loss = self.nll[p].compute()
            self.log_dict({f"{p}/loss": loss, f"{p}/ppl": torch.exp(loss)}, add_dataloader_idx=False)
            self.nll[p].reset()

    def on_validation_epoch_end(self) -> None:
        self._log_perplexity(self.eval_prefixes)

    def on_test_epoch_end(self) -> None:
        prefixes = self.trainer.datamodule.test_prefixes
        self._log_perplexity(prefixes)
        self._log_generations(prefixes, write=True)

    def score(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        """The task's metrics of a split's generations (every rank's rows): the corpus metrics."""
        return corpus_metrics([r["prediction"] for r in rows], [r["references"] for r in rows])

    def _log_generations(self, prefixes: list[str], write: bool) -> None:
        """Score each split's collected generations and, with ``write``, save them as ``generations/<prefix>.jsonl``."""
        for prefix in prefixes:  # every rank in the same order, also one that saw no batch (the gather is collective)
            rows = gather_rows(self._generations.get(prefix, []))
            if not rows:
                continue
            self.log_dict({f"{prefix}/{k}": v for k, v in self.score(rows).items()}, add_dataloader_idx=False)
            if write and self.trainer.is_global_zero and self.output_dir:
                path = Path(self.output_dir) / "generations" / f"{prefix}.jsonl"
                fields = ("source", "prediction", "references")
                write_text(path, "".join(json.dumps({k: r[k] for k in fields}, ensure_ascii=False) + "\n" for r in rows))
                log.info("%s: wrote %d generations to %s; e.g. %r -> %r", prefix, len(rows), path, rows[0]["source"], rows[0]["prediction"])
        for prefix in prefixes:
            self._generations.pop(prefix, None)
