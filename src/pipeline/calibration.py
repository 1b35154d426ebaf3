"""Calibration activations of the chosen MLPs (docs/methods.md section 6), collected through ``mlp_io`` hooks.

For a layer, X [T, h] are its MLP's inputs at the T non-padding tokens of the calibration batches
and Y the layer's current (still original) MLP's outputs on X. ``collect`` reads them from the
model as it is when called, so calling it for layer l after layers before l were compressed gives
the sequential inputs (as SparseGPT, Wanda and FLAP do); called on the original model for all
layers at once it gives the original inputs.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import Cache

from src.methods.types import MLPCalibration
from src.models import mlp_io
from src.models.inputs import MODEL_INPUTS


class _Stop(Exception):
    """Raised by the last hook: nothing after the deepest requested layer needs computing."""


@dataclass
class _Replay:
    """Where the last sequential ``collect`` left each batch: the hidden states entering block
    ``layer`` [B, T, h], and every block's other inputs (masks, position embeddings; no cache)."""

    model_id: int
    layer: int
    hidden: list[Tensor]  # per batch
    rest: list[list[tuple[tuple, dict]]]  # per batch, per block: (positional args after the hidden states, kwargs)


def _no_cache(v: object) -> object:
    return None if isinstance(v, Cache) else v  # a replayed block must not append to a pass's KV cache


class Calibrator:
    """Calibration batches (already on the model's device) and how to read each layer's X and Y from them.

    A sequential ``collect(model, [l])`` after ``collect(model, [j])``, j < l, on a model whose blocks
    form one chain (``mlp_io.block_module``), replays blocks j..l-1 from the hidden states entering
    block j, recorded by the earlier call, instead of running the model from its embeddings: on
    SmolLM2's layers 10-29, about 60 block forwards in all instead of 400. The replay is exact while
    the blocks before j are unchanged since that call, which is how ``compress_model`` calls it (it
    compresses only the layer it has just collected).
    """

    def __init__(self, batches: list[dict[str, Tensor]], sequential: bool = True) -> None:
        self.batches = [{k: v for k, v in b.items() if k in MODEL_INPUTS} for b in batches]
        self.sequential = sequential
        self._replay: _Replay | None = None

    @torch.no_grad()
    def collect(self, model: nn.Module, layers: list[int]) -> dict[int, MLPCalibration]:
        """X and Y of each layer in ``layers`` from the batches through ``model`` as it is now."""
        r = self._replay
        was_training = model.training
        model.eval()
        try:
            if r is not None and r.model_id == id(model) and len(layers) == 1 and layers[0] >= r.layer:
                captured = self._replayed(model, layers[0])
            else:
                captured = self._full_pass(model, layers)
        finally:
            model.train(was_training)
        out = {}
        for i in layers:
            x = torch.cat([t for t, _ in captured[i]])  # [T, h]
            lengths = torch.cat([n for _, n in captured[i]]).cpu()  # [S]: each sequence's non-padding tokens
            out[i] = MLPCalibration(x=x, y=mlp_io.mlp_forward(model, i, x), lengths=lengths)
        return out

    def start(self, model: nn.Module, hidden: list[Tensor], rest: list[list[tuple[tuple, dict]]], layer: int = 0) -> None:
        """Replay from block ``layer`` on: ``hidden`` per batch, the hidden states entering it [B, T, h]; ``rest``
        per batch and block, the block's other inputs. A model streamed one block at a time records them
        without running its blocks (``src.pipeline.stream``)."""
        self._replay = _Replay(id(model), layer, hidden, [[(tuple(_no_cache(a) for a in args), {k: _no_cache(v) for k, v in kw.items()})
                                                      for args, kw in per_batch] for per_batch in rest])

    @torch.no_grad()
    def advance(self, model: nn.Module) -> int:
        """Run each batch's hidden states through the next block (as the model is now); returns the block
        they enter next. With ``start`` and ``advance`` a caller holding one block at a time moves them on."""
        r = self._replay
        block = mlp_io.block_module(model, r.layer)
        hidden = []
        for h, rest in zip(r.hidden, r.rest):
            args, kw = rest[r.layer]
            out = block(h, *args, **kw)
            hidden.append(out[0] if isinstance(out, tuple) else out)  # [B, T, h]
        r.layer, r.hidden = r.layer + 1, hidden
        return r.layer

    @property
    def next_block(self) -> int:
        """The block ``advance`` runs next (the one the recorded hidden states enter)."""
        return self._replay.layer

    def resume(self, model: nn.Module, hidden: list[Tensor], layer: int) -> None:
        """Replay from block ``layer`` on with these hidden states entering it, the blocks' other inputs as recorded."""
        self.start(model, hidden, self._replay.rest, layer)

    @property
    def hidden(self) -> list[Tensor]:
        """The hidden states entering the block ``advance`` runs next, per batch [B, T, h]."""
        return self._replay.hidden

    def _mlp_hooks(self, model: nn.Module, layers: list[int], batch: dict[str, Tensor], captured: dict[int, list[tuple[Tensor, Tensor]]],
                   stop: int | None) -> list:
        def hook(i: int):
            # an encoder-decoder model's decoder blocks see the decoder's tokens
            ids, mask = ("decoder_input_ids", "decoder_attention_mask") if mlp_io.in_decoder(model, i) else ("input_ids", "attention_mask")
            keep = batch.get(mask, torch.ones_like(batch[ids])).bool()  # [B, T]

            def fn(module: nn.Module, args: tuple) -> None:
                captured[i].append((args[0][keep].detach(), keep.sum(1)))  # [B, T, h] -> [N, h], padding dropped; [B]
                if i == stop:
                    raise _Stop

            return fn

        return [mlp_io.mlp_input_module(model, i).register_forward_pre_hook(hook(i)) for i in layers]

    def _full_pass(self, model: nn.Module, layers: list[int]) -> dict[int, list[tuple[Tensor, Tensor]]]:
        """One forward per batch up to the deepest layer's MLP; with one layer asked for and a chain
        of blocks, on to the last block's inputs, recording every block's inputs for later replays."""
        captured: dict[int, list[tuple[Tensor, Tensor]]] = {i: [] for i in layers}
        chain = len(layers) == 1 and self.sequential
        blocks = [mlp_io.block_module(model, i) for i in range(mlp_io.num_layers(model))] if chain else []
        record = chain and all(b is not None for b in blocks)
        last = len(blocks) - 1
        stop = max(layers) if not record or layers[0] == last else None
        hidden, rest = [], []
        kwargs = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
        for batch in self.batches:
            inputs: list[tuple[tuple, dict]] = []

            def block_hook(j: int):
                def fn(module: nn.Module, args: tuple, kw: dict) -> None:
                    if j == layers[0]:
                        hidden.append(args[0])
                    inputs.append((tuple(_no_cache(a) for a in args[1:]), {k: _no_cache(v) for k, v in kw.items()}))
                    if j == last and layers[0] < last:
                        raise _Stop

                return fn

            handles = self._mlp_hooks(model, layers, batch, captured, stop)
            if record:
                handles += [b.register_forward_pre_hook(block_hook(j), with_kwargs=True) for j, b in enumerate(blocks)]
            try:
                model(**batch, **kwargs)
            except _Stop:
                pass
            finally:
                for handle in handles:
                    handle.remove()
            if record:
                rest.append(inputs)
        if record:
            self._replay = _Replay(id(model), layers[0], hidden, rest)
        return captured

    def _replayed(self, model: nn.Module, layer: int) -> dict[int, list[tuple[Tensor, Tensor]]]:
        """Blocks from the last collected layer's up to ``layer``'s MLP, from the recorded inputs."""
        r = self._replay
        blocks = [mlp_io.block_module(model, j) for j in range(r.layer, layer + 1)]
        captured: dict[int, list[tuple[Tensor, Tensor]]] = {layer: []}
        hidden = []
        for batch, h, rest in zip(self.batches, r.hidden, r.rest):
            for j, block in zip(range(r.layer, layer), blocks):
                args, kw = rest[j]
                out = block(h, *args, **kw)
                h = out[0] if isinstance(out, tuple) else out  # [B, T, h]
            hidden.append(h)
            handles = self._mlp_hooks(model, [layer], batch, captured, layer)
            args, kw = rest[layer]
            try:
                blocks[-1](h, *args, **kw)
            except _Stop:
                pass
            finally:
                for handle in handles:
                    handle.remove()
        r.layer, r.hidden = layer, hidden
        return captured
