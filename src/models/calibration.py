"""Calibration activations of the chosen MLPs (METHOD.md section 6), collected through ``mlp_io`` hooks.

For a layer, X [T, h] are its MLP's inputs at the T non-padding tokens of the calibration batches
and Y the layer's current (still original) MLP's outputs on X. ``collect`` reads them from the
model as it is when called, so calling it for layer l after layers before l were compressed gives
the sequential inputs (as SparseGPT, Wanda and FLAP do); called on the original model for all
layers at once it gives the original inputs.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor, nn

from src.compress.types import MLPCalibration
from src.data.base import MODEL_INPUTS
from src.models import mlp_io


class _Stop(Exception):
    """Raised by the last hook: nothing after the deepest requested layer needs computing."""


class Calibrator:
    """Calibration batches (already on the model's device) and how to read each layer's X and Y from them."""

    def __init__(self, batches: list[dict[str, Tensor]], sequential: bool = True) -> None:
        self.batches = [{k: v for k, v in b.items() if k in MODEL_INPUTS} for b in batches]
        self.sequential = sequential
        h = hashlib.sha256()
        for b in self.batches:
            for k in sorted(b):
                h.update(k.encode() + b[k].detach().cpu().numpy().tobytes())
        self.sample_id = h.hexdigest()[:16]  # names the calibration sample (with the weights read, in the cache key)

    @torch.no_grad()
    def collect(self, model: nn.Module, layers: list[int]) -> dict[int, MLPCalibration]:
        """X and Y of each layer in ``layers`` from one pass over the batches through ``model`` as it is now."""
        captured: dict[int, list[Tensor]] = {i: [] for i in layers}
        last = max(layers)

        def hook(i: int, mask: Tensor):
            def fn(module: nn.Module, args: tuple) -> None:
                captured[i].append(args[0][mask.bool()].detach())  # [B, T, h] -> [N, h], padding dropped
                if i == last:
                    raise _Stop

            return fn

        was_training = model.training
        model.eval()
        try:
            for batch in self.batches:
                mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
                handles = [mlp_io.mlp_input_module(model, i).register_forward_pre_hook(hook(i, mask)) for i in layers]
                try:
                    model(**batch)
                except _Stop:
                    pass
                finally:
                    for handle in handles:
                        handle.remove()
        finally:
            model.train(was_training)
        out = {}
        for i in layers:
            x = torch.cat(captured[i])  # [T, h]
            out[i] = MLPCalibration(x=x, y=mlp_io.mlp_forward(model, i, x))
        return out
