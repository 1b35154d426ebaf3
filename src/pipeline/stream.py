"""Compression of a model folder one transformer block at a time: the model never whole in memory.

The model is a skeleton on the meta device (``src.models.shards``). The embeddings are materialised to
record the calibration batches' hidden states entering block 0 and every block's other inputs (masks,
position embeddings: recording modules stand in for the blocks, so no block runs); then each block in turn
is read from the folder's shards onto the compute device, its MLP compressed by the same
:class:`~src.pipeline.fuse.Compressor` as the in-memory path (its calibration from the hidden states,
``Calibrator.start``/``advance``), the hidden states moved on through it, its tensors written to the output's
shard for that block, and it is dropped. Peak memory is one block in the compute dtype, the calibration's
hidden states and one layer's calibration statistics (:func:`memory_model`), not the model.

The output is written into ``.<out>.partial`` beside ``out`` and renamed at the end: a run killed mid-way
leaves no half-written ``out``. After each block the partial folder holds its shard, the hidden states
leaving it and ``progress.json``; a rerun with the same settings resumes after the last finished block and
ends with the same files (other settings: it starts over, and says so).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import AutoConfig, PreTrainedModel

from src.methods.refit import CHUNK
from src.models import mlp_io
from src.models.shards import ShardReader, materialize, release, skeleton
from src.pipeline.calibration import Calibrator
from src.pipeline.fuse import Compressor, FusionReport
from src.pipeline.settings import CompressionSettings
from src.utils.errors import ConfigError
from src.utils.io import write_json

log = logging.getLogger(__name__)

PROGRESS = "progress.json"
HIDDEN = "hidden.safetensors"
INDEX = "model.safetensors.index.json"
REST = "model-rest.safetensors"


class _Stop(Exception):
    """Raised by the last block's stand-in: nothing after the blocks is needed to calibrate."""


class _Recorder(nn.Module):
    """Stands in for block ``index`` while the calibration batches pass the embeddings: records the block's
    inputs and hands the hidden states on unchanged (no block runs)."""

    def __init__(self, index: int, last: int, inputs: list[tuple[tuple, dict]], hidden: list[Tensor], as_tuple: bool) -> None:
        super().__init__()
        self.index, self.last, self.inputs, self.hidden, self.as_tuple = index, last, inputs, hidden, as_tuple

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.index == 0:
            self.hidden.append(hidden_states)
        self.inputs.append((args, kwargs))
        if self.index == self.last:
            raise _Stop
        return (hidden_states,) if self.as_tuple else hidden_states


@dataclass
class Blocks:
    """The skeleton's blocks: each one's module path (its tensors' name prefix without the dot)."""

    paths: list[str]

    @classmethod
    def of(cls, model: nn.Module) -> Blocks:
        names = {id(m): n for n, m in model.named_modules()}
        blocks = [mlp_io.block_module(model, j) for j in range(mlp_io.num_layers(model))]
        if any(b is None for b in blocks):
            raise ConfigError(f"stream=true: {type(model).__name__} is not one chain of blocks (an encoder-decoder model's decoder also "
                              "reads the encoder), which streaming needs; run with stream=false on a machine that holds the model.")
        return cls([names[id(b)] for b in blocks])

    def owner(self, name: str) -> int | None:
        """The block a tensor name belongs to, or None (embeddings, final norm, head)."""
        for j, path in enumerate(self.paths):
            if name.startswith(path + "."):
                return j
        return None


def check_streamable(model: nn.Module, reader: ShardReader, blocks: Blocks) -> None:
    """Refuse, in one sentence, a folder whose tensor names are not the module tree's (checkpoints that
    transformers converts on load, such as MoE experts stored one by one): streaming reads them by name."""
    prefix = {id(m): n for n, m in model.named_modules()}[id(model.base_model)]
    prefix = prefix + "." if prefix else ""
    # the stack's parameters, which streaming materialises (the head is copied as stored: tied or not)
    missing = sorted(prefix + n for n, _ in model.base_model.named_parameters() if prefix + n not in reader)
    if missing:
        raise ConfigError(f"stream=true: {reader.folder} stores its weights under other names than {type(model).__name__}'s modules "
                          f"({missing[0]} is not in it; transformers converts such checkpoints on load), so its blocks cannot be read "
                          "one at a time; run with stream=false on a machine that holds the model.")


def memory_model(model: nn.Module, calib_tokens: int, padded_tokens: int, compute_dtype: torch.dtype = torch.float32,
                 width: int | None = None, refit: bool = False) -> dict[str, int]:
    """Predicted peak bytes of a streamed compression of ``model`` (a skeleton will do: only shapes are read), by
    part. ``calib_tokens``: the calibration batches' non-padding tokens T; ``padded_tokens``: their padded B x T;
    ``width``: the compressed width k; ``refit``: the least-squares refit runs.

    - ``block``: the largest block in the compute dtype, and ``mlp_copy``: its MLP read out in float32 for the
      method (the compressed MLP is smaller and replaces it);
    - ``hidden_states``: the batches' hidden states [B, T, h] entering a block and leaving it;
    - ``layer_calibration``: one layer's X and Y [T, h] in float32, and ``mlp_activations``: the MLP's
      activations on them [T, width] twice (the method's scores; the gate's and the up projection's);
    - ``refit``: the activations it multiplies [T, k] in float32 and a copy of the held-out fifth of them and of
      Y; in float64, two token chunks of both ([CHUNK, k + h]), the Gram matrix and the one factored in place
      [k, k], the right-hand sides [k, h] (the sums', and the one solved in place into the solution);
    - the embeddings while the inputs are recorded (in the compute dtype, beside the stored copy being cast,
      and block 0, run once), freed before the first block: the larger phase counts.
    """
    config, size = model.config, torch.finfo(compute_dtype).bits // 8
    h, d = config.hidden_size, mlp_io.config_width(config)
    k = width or d
    blocks = [mlp_io.block_module(model, j) for j in range(mlp_io.num_layers(model))]
    block = max(sum(t.numel() for t in b.parameters()) for b in blocks) * size
    parts = {"block": block, "mlp_copy": mlp_io.mlp_param_count(config) * 4, "hidden_states": 2 * padded_tokens * h * size,
             "layer_calibration": 2 * calib_tokens * h * 4, "mlp_activations": 2 * calib_tokens * d * 4,
             "refit": (calib_tokens * k + calib_tokens * (k + h) // 5) * 4 + (2 * CHUNK * (k + h) + 2 * k * k + 2 * k * h) * 8 if refit else 0}
    embeddings = model.get_input_embeddings().weight.numel() * (size + 2)  # + the stored bf16 copy while it is cast
    parts["total"] = max(sum(parts.values()), embeddings + parts["hidden_states"] + block)
    return parts


def _fingerprint(settings: CompressionSettings, folder: Path, extra: dict[str, Any]) -> str:
    """What a partial folder was started with: a rerun resumes only with the same."""
    st = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.glob("*.safetensors"))]
    spec = {"settings": settings.spec({}, {}, False), "ridge": settings.refit_ridge, "toward": settings.refit_toward,
            "calib": repr(settings.calib), "source": st, **extra}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def compress_streamed(
    folder: str | Path,
    auto_cls: type,
    settings: CompressionSettings,
    out: str | Path,
    *,
    batches: list[dict[str, Tensor]] | None,
    identity: str | None = None,
    device: torch.device | str = "cpu",
    compute_dtype: torch.dtype = torch.float32,
    out_dtype: torch.dtype | None = None,
    finish: Callable[[Path, PreTrainedModel, FusionReport], None] | None = None,
) -> FusionReport:
    """Compress the Hugging Face model in ``folder`` (safetensors) with ``settings``, block by block, into the
    Hugging Face folder ``out`` (weights in ``out_dtype``, by default the folder's; the recorded per-layer
    structure in config.json as ``src.export`` writes it). ``batches``: the calibration batches where the
    settings use calibration. ``finish(tmp, model, report)`` adds files (tokenizer, card) before the rename."""
    folder, out, dev = Path(folder), Path(out), torch.device(device)
    s = settings
    reader = ShardReader(folder)
    model = skeleton(auto_cls, AutoConfig.from_pretrained(folder))
    blocks = Blocks.of(model)
    check_streamable(model, reader, blocks)
    stored = {d for n in reader.names() if (d := reader.dtype(n)).is_floating_point}  # from the headers: no tensor read
    reader.close()
    out_dtype = out_dtype or (stored.pop() if len(stored) == 1 else torch.float32)
    calibrated = s.needs_calibration
    if calibrated and not batches:
        raise ValueError("a calibrated compression needs calibration batches")
    sequential = s.calib.sequential if calibrated else True
    last_calibrated = max(s.layers) if calibrated else -1
    tmp = out.parent / f".{out.name}.partial"
    fingerprint = _fingerprint(s, folder, {"identity": identity, "out_dtype": str(out_dtype), "compute_dtype": str(compute_dtype),
                                           "n_batches": len(batches or [])})
    progress = _resume_state(tmp, fingerprint)
    run = Compressor(s, identity=identity, device=dev)
    params_before = sum(t.numel() for t in model.parameters())
    tokens = sum(int(b["attention_mask"].sum()) for b in batches) if calibrated else 0
    padded = sum(b["input_ids"].numel() for b in batches) if calibrated else 0
    parts = memory_model(model, tokens, padded, compute_dtype, s.mid_dim, calibrated and s.refit == "lstsq")
    runtime = psutil.Process().memory_info().rss
    log.info("streaming %d blocks from %s; calibration %d tokens (%d padded); memory model: peak %.2f GiB = this process now %.2f + %s",
             len(blocks.paths), folder, tokens, padded, (parts["total"] + runtime) / 2**30, runtime / 2**30,
             ", ".join(f"{k} {v / 2**30:.2f}" for k, v in parts.items() if k != "total"))
    calibrator = Calibrator(batches, sequential=sequential) if calibrated else None
    run.check(model, calibrator)
    if calibrated:
        _record_inputs(model, blocks, reader, calibrator, dev, compute_dtype)
    widths = {layer: s.mid_dim for layer in s.layers}
    if s.budget is not None:  # a first pass over the original blocks (once: a resumed run has the widths)
        if "widths" not in progress:
            entering = calibrator.hidden  # block 0's, for the second pass (advance makes new states, these stay)
            progress["widths"] = _budget_pass(model, blocks, reader, calibrator, run, dev, compute_dtype)
            calibrator.resume(model, entering, 0)
            write_json(tmp / PROGRESS, progress)
        widths = {int(layer): k for layer, k in progress["widths"].items()}
    if calibrated and progress["done"]:
        calibrator.resume(model, [t.to(dev) for t in _load_hidden(tmp)], len(progress["done"]))
    n = len(blocks.paths)
    params_after, seconds = 0, {}
    for j, path in enumerate(blocks.paths):
        block = model.get_submodule(path)
        prefix = path + "."
        if str(j) in progress["done"]:  # written by an earlier run: its structure back into the skeleton, its numbers into the record
            entry = progress["done"][str(j)]
            params_after += entry["params"]
            if "folded" in entry:
                mlp_io.build_from_spec(model, j, mlp_io.spec_from_dict(entry["folded"]))
                release(block)
                _restore(run, j, entry)
            continue
        t0 = time.perf_counter()
        materialize(block, prefix, reader, dev, compute_dtype)
        calib = None
        if j in s.layers and calibrated:
            calib = calibrator.collect(model, [j])[j]
            if not sequential:  # the original model's inputs for every layer: the states pass the block before it changes
                calibrator.advance(model)
        if j in s.layers:
            run.block(model, j, widths[j], calib)
        del calib
        if calibrated and j < last_calibrated and calibrator.next_block == j:
            calibrator.advance(model)
        mlp_io.fold_scales(block)
        state = {prefix + k: v.to(out_dtype).contiguous() for k, v in block.state_dict().items()}
        shard = f"model-block-{j:05d}.safetensors"
        save_file(state, str(tmp / shard))
        if calibrated and j < last_calibrated:
            save_file({f"hidden.{b}": t.contiguous().cpu() for b, t in enumerate(calibrator.hidden)}, str(tmp / HIDDEN))
        entry = {"params": sum(t.numel() for t in block.parameters()), "seconds": time.perf_counter() - t0,
                 "tensors": {name: [shard, t.numel() * t.element_size()] for name, t in state.items()}}
        if j in s.layers:
            entry.update(width=run.widths[j], spec=run.layer_specs[j].as_dict(), folded=mlp_io.layer_spec(model, j).as_dict(), stats=run.stats[j],
                         parts={p: v for (i, p), v in run.part_stats.items() if i == j})
        progress["done"][str(j)] = entry
        write_json(tmp / PROGRESS, progress)
        params_after += entry["params"]
        release(block)
        reader.close()
        seconds.setdefault(j in s.layers, []).append(entry["seconds"])
        left = [i for i in range(j + 1, n)]
        # each kind of block at its own pace (an 8B compressed block takes 17 times a copied one); a kind not seen yet: the other's
        pace = {kind: sum(v) / len(v) for kind, v in seconds.items()}
        eta = sum(pace.get(i in s.layers, next(iter(pace.values()))) for i in left)
        log.info("block %d/%d (%s) in %.1fs; about %.0fs left", j + 1, n, "compressed" if j in s.layers else "copied", entry["seconds"], eta)
    rest = {name: reader.get(name).to(out_dtype).contiguous() for name in reader.names() if blocks.owner(name) is None}
    params = dict(model.named_parameters())
    params_after += sum(t.numel() for name, t in rest.items() if name in params)
    save_file(rest, str(tmp / REST))
    weight_map = {name: entry for e in progress["done"].values() for name, entry in e["tensors"].items()}
    weight_map |= {name: [REST, t.numel() * t.element_size()] for name, t in rest.items()}
    del rest
    _write_config(model, tmp, out_dtype, weight_map)
    report = run.report(None, params_before, params_after)
    if finish is not None:
        finish(tmp, model, report)
    for name in (PROGRESS, HIDDEN):
        (tmp / name).unlink(missing_ok=True)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return report


@torch.no_grad()
def _budget_pass(model: nn.Module, blocks: Blocks, reader: ShardReader, calibrator: Calibrator, run: Compressor, dev: torch.device,
                 dtype: torch.dtype) -> dict[int, int]:
    """The budget's widths (``Compressor.allocate_from``) from each chosen layer's evidence on the original model: its
    blocks read one at a time, up to the last chosen layer, each layer's calibration taken as the states enter it."""
    layers, evidence = set(run.s.layers), {}
    for j, path in enumerate(blocks.paths[: max(layers) + 1]):
        block = model.get_submodule(path)
        materialize(block, path + ".", reader, dev, dtype)
        if j in layers:
            evidence[j] = run.evidence(model, j, calibrator.collect(model, [j])[j])
            log.info("budget pass: block %d/%d's evidence gathered", j + 1, max(layers) + 1)
        if j < max(layers):
            calibrator.advance(model)
        release(block)
        reader.close()
    return run.allocate_from(model, evidence)


def _resume_state(tmp: Path, fingerprint: str) -> dict[str, Any]:
    """The partial folder's progress when it was started with the same settings, else a fresh one (the old
    folder removed)."""
    if (tmp / PROGRESS).is_file():
        progress = json.loads((tmp / PROGRESS).read_text())
        if progress.get("fingerprint") == fingerprint:
            done = progress["done"]
            log.info("resuming %s: %d blocks finished by an earlier run", tmp, len(done))
            progress["resumed"] = len(done)
            return progress
        log.warning("%s was started with other settings or another model: starting over", tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return {"fingerprint": fingerprint, "done": {}, "resumed": 0}


def _restore(run: Compressor, j: int, entry: dict[str, Any]) -> None:
    """A finished block's numbers back into the run's record (its weights are on disk already)."""
    if "spec" not in entry:
        return
    run.widths[j], run.layer_specs[j], run.stats[j] = entry["width"], mlp_io.spec_from_dict(entry["spec"]), entry["stats"]
    for part, v in entry["parts"].items():
        run.part_stats[(j, part)] = v
        run.sparse.add(j)


def _load_hidden(tmp: Path) -> list[Tensor]:
    state = load_file(str(tmp / HIDDEN))
    return [state[f"hidden.{b}"] for b in range(len(state))]


def _outside(model: nn.Module, blocks: Blocks) -> tuple[nn.Module, list[tuple[str, nn.Module]]]:
    """The base model (the stack without the head) and its leaf modules outside the blocks (embeddings, rotary,
    final norm), with their full names."""
    names = {id(m): n for n, m in model.named_modules()}
    base = model.base_model
    leaves = [(names[id(m)], m) for m in base.modules() if not any(True for _ in m.children())]
    return base, [(n, m) for n, m in leaves if blocks.owner(n + ".") is None]


@torch.no_grad()
def _record_inputs(model: nn.Module, blocks: Blocks, reader: ShardReader, calibrator: Calibrator, dev: torch.device, dtype: torch.dtype) -> None:
    """Pass the calibration batches through the embeddings with recording stand-ins for the blocks: the hidden
    states entering block 0 and each block's other inputs, then ``calibrator.start``. The modules outside
    the blocks (embeddings, rotary, final norm; not the head) are materialised for it and dropped after."""
    base, outside = _outside(model, blocks)
    for name, module in outside:
        materialize(module, name + ".", reader, dev, dtype)
        module.to(dev)
    as_tuple = _returns_tuple(model, base, blocks, reader, calibrator, dev, dtype)
    originals = [model.get_submodule(p) for p in blocks.paths]
    hidden: list[Tensor] = []
    rest: list[list[tuple[tuple, dict]]] = []
    last = len(blocks.paths) - 1
    try:
        for batch in calibrator.batches:
            inputs: list[tuple[tuple, dict]] = []
            for j, p in enumerate(blocks.paths):
                model.set_submodule(p, _Recorder(j, last, inputs, hidden, as_tuple))
            try:
                base(**{k: v.to(dev) for k, v in batch.items()}, **_no_cache_kwargs(base))
            except _Stop:
                pass
            rest.append(inputs)
    finally:
        for p, m in zip(blocks.paths, originals):
            model.set_submodule(p, m)
    for _, module in outside:
        release(module)
    calibrator.start(model, hidden, rest)


def _returns_tuple(model: nn.Module, base: nn.Module, blocks: Blocks, reader: ShardReader, calibrator: Calibrator, dev: torch.device,
                   dtype: torch.dtype) -> bool:
    """Whether the family's blocks return a tuple (older modeling code) or the hidden states alone: block 0
    run once on one sequence, so the stand-ins return what the model's loop expects."""
    captured: list[Tensor] = []
    inputs: list[tuple[tuple, dict]] = []
    first = model.get_submodule(blocks.paths[0])
    model.set_submodule(blocks.paths[0], _Recorder(0, 0, inputs, captured, False))
    try:
        base(**{k: v[:1].to(dev) for k, v in calibrator.batches[0].items()}, **_no_cache_kwargs(base))
    except _Stop:
        pass
    finally:
        model.set_submodule(blocks.paths[0], first)
    materialize(first, blocks.paths[0] + ".", reader, dev, dtype)
    args, kw = inputs[0]
    out = first(captured[0], *args, **kw)
    release(first)
    return isinstance(out, tuple)


def _no_cache_kwargs(module: nn.Module) -> dict[str, bool]:
    return {"use_cache": False} if "use_cache" in inspect.signature(module.forward).parameters else {}


def _write_config(model: nn.Module, tmp: Path, out_dtype: torch.dtype, weight_map: dict[str, list]) -> None:
    """config.json as ``src.export`` writes it (the stock widths, else the per-layer structure under
    ``mlp_fusion``) and the index of the shards (``weight_map``: {name: [shard, bytes]})."""
    config = model.config
    widths = mlp_io.stock_widths(model)
    if widths is not None:
        mlp_io.set_config_widths(config, widths)
    else:
        config.mlp_fusion = {"layer_specs": {str(i): mlp_io.layer_spec(model, i).as_dict() for i in range(mlp_io.num_layers(model))}}
    config.dtype = out_dtype
    config.save_pretrained(tmp)
    write_json(tmp / INDEX, {"metadata": {"total_size": sum(n for _, n in weight_map.values())},
                             "weight_map": {name: shard for name, (shard, _) in sorted(weight_map.items())}})
