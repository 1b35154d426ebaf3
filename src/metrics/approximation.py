"""How well a compressed model approximates the original (docs/methods.md §4): NTK and output errors.

Knows models only through ``mlp_io``; takes a probe batch and probe outputs from the caller.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from src.metrics import ntk
from src.models import mlp_io
from src.models.inputs import MODEL_INPUTS
from src.models.outputs import stack_hidden_states

log = logging.getLogger(__name__)


@torch.no_grad()
def _mlp_inputs(
    model: nn.Module, layers: list[int], batch: dict[str, torch.Tensor], chunk_size: int,
) -> tuple[dict[int, torch.Tensor], torch.Tensor, torch.Tensor | None]:
    """Real hidden states entering each layer's MLP ([B, T, h]), the final hidden states [B, T, h] (an
    encoder-decoder model: the decoder's) and a classifier's logits [B, C] (None for a language model).

    Forwards of ``chunk_size`` rows at a time, each dropping a language model's logits [rows, T, V]
    as it goes: the whole probe set's would be SmolLM2's largest tensor (64 x 104 x 49152 floats, 1.3 GB).
    """
    captured: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    hooks = [
        mlp_io.mlp_input_module(model, i).register_forward_pre_hook(lambda m, args, i=i: captured[i].append(args[0].detach()))
        for i in layers
    ]
    inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS}
    final, logits = [], []
    try:
        for start in range(0, len(inputs["input_ids"]), chunk_size):
            rows = {k: v[start : start + chunk_size] for k, v in inputs.items()}
            out = model(**rows, output_hidden_states=True)
            final.append(stack_hidden_states(out, rows)[-1][0][-1])
            if out.logits.ndim == 2:
                logits.append(out.logits)
    finally:
        for h in hooks:
            h.remove()
    return {i: torch.cat(x) for i, x in captured.items()}, torch.cat(final), torch.cat(logits) if logits else None


def _groups(model: nn.Module, layers: list[int], probe_layer: int | None) -> dict[str, list[str]]:
    """θ groups: each compressed layer's MLP parameters and, where there is one, the probe layer's."""
    g = {f"layer_{i}": mlp_io.mlp_param_names(model, i) for i in layers}
    if probe_layer is not None:
        g["probe"] = mlp_io.mlp_param_names(model, probe_layer)
    return g


def _kernels(model: nn.Module, groups: dict[str, list[str]], batch: dict[str, torch.Tensor], fn: ntk.ProbeFn,
             chunk_size: int, max_memory_gb: float) -> dict[str, ntk.Kernels]:
    if not mlp_io.vmappable(model):  # Switch Transformers: a loop over the probe samples
        return ntk.per_sample_kernels_loop(model, groups, batch, fn)
    return ntk.per_sample_kernels(model, groups, batch, fn, chunk_size, int(max_memory_gb * 2**30))


def _probe_layer(model: nn.Module, layers: list[int]) -> int | None:
    """The first uncompressed layer (the research code's probe layer), None when every layer is compressed."""
    return next((i for i in range(mlp_io.num_layers(model)) if i not in layers), None)


@dataclass
class Reference:
    """The original model's side of :func:`approximation_metrics` on one probe batch: the same for
    every compressed model of it, so a comparison of many methods computes it once (its kernels are
    half the cost of a measurement)."""

    input_ids: torch.Tensor  # [B, T]: the probe batch it was measured on
    inputs: dict[int, torch.Tensor]  # layer -> the hidden states entering its MLP [B, T, h]
    hidden: torch.Tensor  # final hidden states [B, T, h]
    logits: torch.Tensor | None  # a classifier's [B, C]; a language model's [B, T, V] is not kept
    kernels: dict[str, dict[str, ntk.Kernels]]  # probe fn name -> θ group -> (K_std, K_sign)


def measure_reference(
    original: nn.Module,
    layers: list[int],
    batch: dict[str, torch.Tensor],
    probe_fns: dict[str, ntk.ProbeFn],
    chunk_size: int = 8,
    max_memory_gb: float = 2.0,
) -> Reference:
    """The original model's hidden states, logits and NTKs on ``batch`` (see :func:`approximation_metrics`)."""
    was_training = original.training
    original.eval()
    try:
        groups = _groups(original, layers, _probe_layer(original, layers))
        kernels = {name: _kernels(original, groups, batch, fn, chunk_size, max_memory_gb) for name, fn in probe_fns.items()}
        inputs, hidden, logits = _mlp_inputs(original, layers, batch, chunk_size)  # after the kernels: not held while they run
    finally:
        original.train(was_training)
    return Reference(batch["input_ids"], inputs, hidden, logits, kernels)


def _output_metrics(
    ref: Reference, original: nn.Module, compressed: nn.Module, layers: list[int], batch: dict[str, torch.Tensor],
    rows: list[dict[str, Any]], chunk_size: int,
) -> dict[str, float]:
    """The output errors (final hidden states, a classifier's logits, each compressed MLP's output on
    the original's MLP inputs) and the router's token counts; fills each layer's row with its ``output_rel_err``."""
    metrics: dict[str, float] = {}
    mask = batch["attention_mask"].bool()
    # an encoder-decoder model's decoder blocks (and its final hidden states) see the decoder's tokens
    decoder_mask = batch["decoder_attention_mask"].bool() if "decoder_attention_mask" in batch else mask
    _, hidden_c, logits_c = _mlp_inputs(compressed, [], batch, chunk_size)
    # The headline output metric: the last layer's output at every non-padding token.
    metrics["fusion/hidden_rel_err"] = ntk.output_rel_err(hidden_c, ref.hidden, decoder_mask)
    if ref.logits is not None:  # a classifier: its head is still untrained (random) at setup, a second metric
        metrics["fusion/logits_rel_err"] = ntk.output_rel_err(logits_c, ref.logits)
    with torch.no_grad():
        for row, i in zip(rows, layers):
            x = ref.inputs[i]  # [B, T, h]: the original's hidden states, fed to both MLPs
            m = decoder_mask if mlp_io.in_decoder(original, i) else mask
            err = ntk.output_rel_err(mlp_io.mlp_forward(compressed, i, x), mlp_io.mlp_forward(original, i, x), m)
            row["output_rel_err"] = metrics[f"fusion/output_rel_err/layer_{i}"] = err
            if mlp_io.is_sparse(original, i):  # where the original router sends the probe tokens: does a poor expert matter?
                for e, n in enumerate(mlp_io.router_counts(original, i, x[m]).tolist()):
                    metrics[f"fusion/router_tokens/layer_{i}/expert_{e}"] = float(n)
    metrics["fusion/output_rel_err"] = sum(r["output_rel_err"] for r in rows) / len(rows)
    return metrics


def approximation_metrics(
    original: nn.Module,
    compressed: nn.Module,
    layers: list[int],
    batch: dict[str, torch.Tensor],
    probe_fns: dict[str, ntk.ProbeFn],
    chunk_size: int = 8,
    max_memory_gb: float = 2.0,
    reference: Reference | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Metrics ``fusion/...`` (first probe fn unqualified, others under ``fusion/<probe>/``) and one row per layer.

    θ groups: each compressed layer's MLP (a Mixture-of-Experts block: its experts and shared expert,
    not the router; the router's token counts per expert are reported too) (names differ between the models when the structure
    changed, so each model gets its own names) and the first uncompressed layer's MLP (the research
    code's probe layer: same parameters in both models). The kernels' memory, the per-sample
    gradients of the groups measured together plus a chunk's working memory, stays under
    ``max_memory_gb`` (``ntk.per_sample_kernels``: more passes and smaller chunks otherwise); the
    output metrics run ``chunk_size`` probe samples at a time.
    ``reference``: the original's side, measured once by :func:`measure_reference` on this batch.
    """
    if reference is not None and not torch.equal(reference.input_ids, batch["input_ids"]):
        raise ValueError("approximation_metrics: the reference was measured on another probe batch")
    ref = reference or measure_reference(original, layers, batch, probe_fns, chunk_size, max_memory_gb)
    probe_layer = _probe_layer(original, layers)
    metrics: dict[str, float] = {}
    rows: list[dict[str, Any]] = [{"layer": i} for i in layers]
    was_training = original.training, compressed.training
    original.eval(), compressed.eval()
    try:
        metrics.update(_output_metrics(ref, original, compressed, layers, batch, rows, chunk_size))
        if reference is None:  # ours alone: its MLP inputs ([B, T, h] per layer) go before the compressed model's kernels
            ref = dataclasses.replace(ref, inputs={})

        groups_c = _groups(compressed, layers, probe_layer)
        for n, (probe_name, fn) in enumerate(probe_fns.items()):
            k_o, k_c = ref.kernels[probe_name], _kernels(compressed, groups_c, batch, fn, chunk_size, max_memory_gb)
            prefix = "fusion" if n == 0 else f"fusion/{probe_name}"
            layer_keys = [f"layer_{i}" for i in layers]
            for kind, j in (("std", 0), ("sign", 1)):
                metrics[f"{prefix}/ntk_{kind}_rel_err"] = ntk.rel_err(ntk.sum_kernels(k_c, layer_keys)[j], ntk.sum_kernels(k_o, layer_keys)[j])
                if probe_layer is not None:
                    metrics[f"{prefix}/ntk_probe_{kind}_rel_err"] = ntk.rel_err(k_c["probe"][j], k_o["probe"][j])
                for row, key in zip(rows, layer_keys):
                    err = ntk.rel_err(k_c[key][j], k_o[key][j])
                    metrics[f"{prefix}/ntk_{kind}_rel_err/{key}"] = err
                    if n == 0:
                        row[f"ntk_{kind}_rel_err"] = err
    finally:
        original.train(was_training[0]), compressed.train(was_training[1])
    if probe_layer is not None:
        metrics["fusion/ntk_probe_layer"] = float(probe_layer)
    return metrics, rows
