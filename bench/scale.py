"""Scale: what the project's setup costs at GPU sizes, a 1B Llama and Llama 3 8B's shape.

For each model (random weights built on the device: ``conf/model/bench_llama_1b.yaml`` and
``bench_llama3_8b.yaml``) and each method, the fusion callback does what ``python -m src.train`` does
at setup: it compresses a few layers to the model's default width (``ntk_cluster``: k-means on the
sub-MLPs, data-free; ``wanda_sp``: scores read from calibration inputs, here random token ids) and
measures the default approximation metrics (``approx_metrics`` of conf/train.yaml: output errors and
the NTK kernels of per-sample gradients) against the original. Reported: seconds per compressed
layer, the metrics' seconds and the peak GPU memory. A measurement, not a comparison: no targets.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor

from bench.common import FP32_NOTE, BenchResult, Options, Shape, Sizes, random_tokens, settings, shape_config, timed
from src.builders import fusion_callback
from src.metrics import ntk
from src.models.build import build_model
from src.models.mlp_io import mlp_param_names
from src.pipeline.settings import CompressionSettings
from src.utils.memory import release_memory

METHODS = ("ntk_cluster", "wanda_sp")
PROBE_FNS = {"target_loglik": ntk.target_loglik}  # a causal LM's probe, as CausalLMModule.probe_fns


class RandomTokens:
    """Stands in for the task's DataModule where the fusion callback reads data: random token ids
    (``random_tokens``); the calibration sample and the probe set are different draws, as the
    training and validation splits are."""

    def __init__(self, vocab_size: int, seq_len: int) -> None:
        self.vocab_size, self.seq_len = vocab_size, seq_len

    def calib_batches(self, n: int, seed: int, batch_size: int, source: str = "task") -> list[dict[str, Tensor]]:
        batch = random_tokens(n, self.seq_len, self.vocab_size, seed)
        return [{k: v[i : i + batch_size] for k, v in batch.items()} for i in range(0, n, batch_size)]

    def probe_batch(self, n: int, seed: int) -> dict[str, Tensor]:
        return random_tokens(n, self.seq_len, self.vocab_size, seed + 1)


def run(sizes: Sizes, opts: Options) -> BenchResult:
    """Each model of ``sizes.scale`` with each method, one after the other, the memory released in between."""
    eye = torch.eye(8, device=opts.device)
    torch.mm(eye, eye)  # CUDA's context and BLAS handle, created on first use, out of the timings
    rows = []
    for shape in sizes.scale:
        for method in METHODS:
            cfg = shape_config(sizes, opts, shape, method)
            compression = settings(cfg)
            rows.append(_measure(cfg, compression, shape, opts))
            release_memory()  # the model and what the metrics held, before the next model is built
    a, calib = cfg.approx_metrics, compression.calib  # the last config's: the same for every row
    cuda, lengths = opts.device.type == "cuda", "/".join(map(str, sorted({s.seq_len for s in sizes.scale})))
    return BenchResult(
        name="scale",
        title="Scale: compression and the default approximation metrics of " + " and ".join(dict.fromkeys(r["model"] for r in rows)),
        columns=[("model", "model"), ("method", "method"), ("layers", "layers"), ("width", "MLP width"), ("params_b", "params B"),
                 ("model_gib", "model GiB"), ("build_s", "build s"), ("layer_s", "s/layer"), ("compress_s", "compression s"),
                 ("grads_gib", "grads GiB/layer"), ("metrics_s", "metrics s"), ("peak_gib", "peak GiB"),
                 ("hidden_rel_err", "hidden rel err"), ("ntk_sign_rel_err", "NTK sign rel err")],
        rows=rows,
        targets=[],
        notes=[
            f"models: random weights built on {opts.device} (build s: transformers' initialisation there, build_model(device=...)); "
            "each compresses the layers in the table to the model's default width (model.fusion_defaults.width) with the "
            "fusion callback, as a training run's setup does, the fusion cache off (ffn_mode.cache=false: every run compresses).",
            f"wanda_sp's calibration: {calib.size} sequences of {lengths} random token ids (not text), batches of {calib.batch_size}, "
            f"sequential={calib.sequential}; ntk_cluster reads no data.",
            f"metrics: the defaults (approx_metrics: {a.probe_size} probe sequences of {lengths} random token ids, chunks of {a.chunk_size}, "
            f"max_memory_gb {a.max_memory_gb}; f = mean next-token log-likelihood): the original's copy of the compressed MLPs, "
            "its hidden states and NTK kernels, then the compressed model's; θ groups = each compressed layer's MLP and the first "
            "uncompressed layer's (layer 0). grads GiB/layer = the per-sample gradients of one original layer's MLP over the probe "
            "set (probe size x its parameters x 4 bytes), held at once: over the budget, a group runs alone in one-sample chunks "
            "(a warning says so), so the metrics' time grows with the number of layers compressed.",
            "s/layer: median over the layers of compress_model's per-layer seconds (the method, the cache key's hash of the "
            "weights, the write-back; wanda_sp's include collecting that layer's calibration inputs); compression s: "
            "compress_model in all; metrics s: the rest of compress_and_measure. One run each, no warm-up beyond CUDA's start.",
            ("peak GiB: torch.cuda.max_memory_allocated over compression and metrics, the model's own weights (model GiB) included."
             if cuda else "peak GiB: measured on a GPU only (null on the CPU)."),
            FP32_NOTE,
        ],
        settings={"methods": METHODS, "shapes": [s.model for s in sizes.scale], "precision": "32-true",
                  "approx_metrics": {k: a[k] for k in ("probe_size", "chunk_size", "max_memory_gb")},
                  "calib": {"size": calib.size, "batch_size": calib.batch_size, "sequential": calib.sequential}},
    )


def _measure(cfg: DictConfig, settings: CompressionSettings, shape: Shape, opts: Options) -> dict[str, Any]:
    """Build ``shape``'s model on the device, then compress it with ``settings`` and measure it with ``cfg``'s fusion callback."""
    device, cuda = opts.device, opts.device.type == "cuda"
    layers = list(settings.layers)
    out: dict[str, Any] = {}
    torch.manual_seed(cfg.seed)  # every method compresses the same weights
    build_s = timed(lambda: out.__setitem__("model", build_model(cfg.model, shape.head, device=device)), device)
    model = out.pop("model")
    model_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    layer_params = sum(model.get_parameter(n).numel() for n in mlp_param_names(model, layers[0]))
    callback = fusion_callback(cfg, settings)  # the object a training run compresses and measures with
    data = RandomTokens(cfg.model.config.vocab_size, shape.seq_len)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    total_s = timed(lambda: out.__setitem__("report", callback.compress_and_measure(model, device, data, PROBE_FNS)), device)
    report, metrics = out["report"], callback.summary_metrics
    layer_s = [report.layer_stats[i]["seconds"] for i in layers]
    return {
        "model": cfg.model.name, "method": settings.method.name, "layers": ",".join(map(str, layers)),
        "width": f"{cfg.model.config.intermediate_size} -> {settings.mid_dim}", "params_b": report.params_before / 1e9,
        "model_gib": model_bytes / 2**30, "build_s": build_s, "layer_s": statistics.median(layer_s), "compress_s": report.seconds,
        "grads_gib": cfg.approx_metrics.probe_size * layer_params * 4 / 2**30, "metrics_s": total_s - report.seconds,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
        "hidden_rel_err": metrics["fusion/hidden_rel_err"], "ntk_sign_rel_err": metrics["fusion/ntk_sign_rel_err"],
        "layer_seconds": layer_s, "params_after_b": report.params_after / 1e9, "seq_len": shape.seq_len,
    }
