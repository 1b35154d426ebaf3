"""The Lightning callback that compresses the model's MLPs at ``setup``, before optimizers exist.

Rank zero compresses (the cache makes repeats free) and measures the approximation; every other
rank builds the same structure and receives the weights by broadcast, so all ranks start
bit-identical. The structure is stored in each checkpoint (``checkpoint["fusion"]``): resuming or
evaluating a checkpoint rebuilds the shapes from it without compressing again.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import WandbLogger

from src.metrics import ntk
from src.metrics.approximation import Reference, approximation_metrics
from src.models import mlp_io
from src.pipeline.calibration import Calibrator
from src.pipeline.fuse import FusionReport, apply_spec, compress_model
from src.pipeline.settings import CompressionSettings
from src.utils import hardware
from src.utils.memory import release_memory

log = logging.getLogger(__name__)


class FusionCallback(L.Callback):
    """Compress with ``settings``; log parameters, time and approximation metrics (``metrics``: the
    ``approx_metrics`` config); ``identity`` names the model's weights in the cache key; a run resumed or
    evaluated from ``ckpt_path`` rebuilds the structure the checkpoint records instead.

    Built by ``src.builders.fusion_callback``; ``src.approx`` builds the same object and calls
    ``compress_and_measure`` without a Trainer.
    """

    def __init__(self, settings: CompressionSettings, metrics: Mapping[str, Any], identity: str, ckpt_path: str | None = None) -> None:
        self.settings, self.metrics_cfg, self.identity, self.ckpt_path = settings, metrics, identity, ckpt_path
        self.spec: dict[str, Any] | None = None
        self.summary_metrics: dict[str, float] = {}
        self.layer_rows: list[dict[str, Any]] = []

    def compress_and_measure(
        self, model: torch.nn.Module, device: torch.device | str, datamodule: Any, probe_fns: dict[str, ntk.ProbeFn],
        reference: Reference | None = None,
    ) -> FusionReport:
        """Compress ``model`` in place (calibration from ``datamodule``'s training split where the
        settings use it, cache, re-init ablation) and, with the metrics enabled, measure it against a
        copy of the original on the probe set (docs/methods.md); ``reference``: the original's side
        of that measurement when already made (``src.approx`` measures many methods against one).

        Each layer is compressed on ``device``; the calibration and probe batches go where ``model``
        is (``hardware.setup_device`` put it there). A GPU out of memory stops with one sentence
        naming the setting to lower. Fills ``spec``, ``summary_metrics`` and ``layer_rows``.
        """
        m, s = self.metrics_cfg, self.settings
        where = hardware.model_device(model)
        original = self._original_copy(model) if m["enabled"] else None
        calibrator = None
        with hardware.refuse_oom("compression and its calibration", "ffn_mode.calib.batch_size (or ffn_mode.calib.size)"):
            if s.needs_calibration:
                c = s.calib
                batches = [hardware.to_device(b, where) for b in datamodule.calib_batches(c.size, c.seed, c.batch_size, c.source)]
                calibrator = Calibrator(batches, sequential=c.sequential)
            report = compress_model(model, s, identity=self.identity, device=device, calibrator=calibrator)
        del calibrator
        self.spec = report.spec
        for layer in s.re_init_layers:  # ablation: keep the structure, forget the weights
            mlp_io.reinit_mlp(model, layer)
            log.info("re-initialised the MLP weights of layer %d (ffn_mode.re_init_layers)", layer)
        self.summary_metrics = report.metrics()
        if original is not None:
            batch = hardware.to_device(datamodule.probe_batch(m["probe_size"], m["probe_seed"]), where)
            # the budget is what the metrics add to the run: the original's copied MLPs come off it first
            copied = sum(t.numel() * t.element_size() for t in self._compressed_tensors(original))
            with hardware.refuse_oom("the approximation metrics", "approx_metrics.max_memory_gb or approx_metrics.chunk_size "
                                     "(or approx_metrics.enabled=false)"):
                metrics, rows = approximation_metrics(original, model, list(s.layers), batch, probe_fns, m["chunk_size"],
                                                      m["max_memory_gb"] - copied / 2**30, reference)
            for row in rows:
                row.update(report.layer_stats.get(row["layer"], {}))
            self.summary_metrics.update(metrics)
            self.layer_rows = rows
            log.info(
                "compression %s k=%d: params %d -> %d; final hidden states rel err %.4f; NTK sign rel err %.4f, std %.4f; "
                "mean MLP output rel err %.4f", s.method.name, s.mid_dim, report.params_before, report.params_after,
                metrics["fusion/hidden_rel_err"], metrics["fusion/ntk_sign_rel_err"], metrics["fusion/ntk_std_rel_err"],
                metrics["fusion/output_rel_err"],
            )
        return report

    def _original_copy(self, model: torch.nn.Module) -> torch.nn.Module:
        """The uncompressed model to measure against: its own copies of the MLPs of ``layers`` and every
        other parameter and buffer shared with ``model`` (compression changes those MLPs only, as
        ``setup``'s broadcast also relies on), so the copy costs those MLPs, not the whole model
        (SmolLM2, 20 of 30 layers: 212 of 538 MB)."""
        own = {id(t) for t in self._compressed_tensors(model)}
        return copy.deepcopy(model, memo={id(t): t for t in (*model.parameters(), *model.buffers()) if id(t) not in own})

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.spec is not None:  # fit then test: compressed already
            return
        model = pl_module.model
        # Resume / evaluate: Lightning loads the checkpoint after setup, so build its shapes now.
        ckpt_spec = self._spec_from_checkpoint(self.ckpt_path)
        if ckpt_spec is not None:
            apply_spec(model, ckpt_spec)
            self.spec = ckpt_spec
            log.info("rebuilt the compressed structure recorded in %s (no clustering)", self.ckpt_path)
            return
        # every rank on its own device first: the broadcast below (NCCL) sends device tensors
        hardware.place_for_setup(trainer, pl_module)
        distributed = dist.is_available() and dist.is_initialized() and trainer.world_size > 1
        if trainer.is_global_zero:
            self.compress_and_measure(model, hardware.compute_device(trainer), trainer.datamodule, pl_module.probe_fns)
            # the original's MLPs, the calibration activations and the metrics' gradients are garbage
            # now: return them to the OS before fine-tuning allocates its optimizer state
            release_memory()
        if distributed:
            self.spec = trainer.strategy.broadcast(self.spec, src=0)
            if not trainer.is_global_zero:
                apply_spec(model, self.spec)
            device = hardware.compute_device(trainer)  # NCCL sends device tensors; FSDP keeps the model on the CPU until it shards
            for t in self._compressed_tensors(model):
                staged = t.data.to(device)
                dist.broadcast(staged, src=0)  # exact bits from rank zero
                t.data.copy_(staged)
        # bytes of any dtype (numpy has no bfloat16)
        tensors = self._compressed_tensors(model)
        digest = hashlib.sha256(b"".join(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() for t in tensors)).hexdigest()[:16]
        log.info("rank %d: compressed weights sha256 %s", trainer.global_rank, digest)

    def _compressed_tensors(self, model: torch.nn.Module) -> list[torch.Tensor]:
        """Every parameter and buffer (the count scale) of the compressed layers' MLPs (before compression:
        of the MLPs to compress), in a fixed order."""
        return [t for i in self.settings.layers for m in mlp_io.mlp_modules(model, i).values() for t in m.state_dict(keep_vars=True).values()]

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or not self.summary_metrics:
            return
        for logger in trainer.loggers:
            logger.log_metrics(self.summary_metrics, step=0)
            if isinstance(logger, WandbLogger) and self.layer_rows:
                cols = sorted({k for r in self.layer_rows for k in r}, key=lambda c: (c != "layer", c))
                logger.log_table("fusion/layers", columns=cols, data=[[r.get(c) for c in cols] for r in self.layer_rows])

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint["fusion"] = self.spec

    @staticmethod
    def _spec_from_checkpoint(ckpt_path: str | None) -> dict[str, Any] | None:
        if not ckpt_path:
            return None
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
        return ckpt.get("fusion")
