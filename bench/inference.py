"""Inference speed: compressed models against the originals, in PyTorch and in ONNX Runtime.

A sequence classifier (sentences per second) and a causal LM forward (tokens per second: the
logits of every position, without a KV cache, as the ONNX export has them). The compressed model is
what ``python -m src.train`` compresses by default (the model's default method on its default
layers and width, through the fusion callback), its count scales folded as ``src.export`` folds
them; both models go to ONNX through ``src.models.exported.export_onnx``. The four sides of a case
(PyTorch eager under ``torch.inference_mode`` and ONNX Runtime's CPUExecutionProvider, each with
the original and the compressed model) alternate call by call. The bound is the forward's FLOP
ratio, counted as the fine-tuning benchmark counts FLOPs.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
import torch
import transformers
from omegaconf import DictConfig
from torch import Tensor, nn

from bench.common import (
    BenchResult,
    Options,
    Sizes,
    alternate,
    autocast,
    compose_config,
    compress,
    count_flops,
    paired_ratio,
    precision_note,
    real_batches,
    target,
)
from src.models.build import build_model
from src.models.exported import export_onnx, prepare_for_export
from src.models.fuse import FusionReport

WARMUP = 1  # untimed calls per side and case: first-run allocations of ONNX Runtime and oneDNN
SPEEDUP_TARGET = 1.0  # the aim: a compressed model that really is faster
MODELS = ("original", "compressed")
RUNTIMES = ("pytorch", "onnxruntime")
UNITS = {"classification": "sentences/s", "generation": "tokens/s"}
Shape = tuple[int, int]  # (batch, length)


def run(sizes: Sizes, opts: Options) -> BenchResult:
    """Every model of ``sizes.inference``: build, compress, export, then time each of its cases."""
    device, rows, compression, onnx_err = opts.device, [], {}, {}
    for name, head, shapes in sizes.inference:
        cfg = compose_config(sizes, opts, None, model=name, default_fusion=True)  # the model's own default method
        with tempfile.TemporaryDirectory() as tmp:
            models, sessions, inputs, report, err = _prepare(cfg, head, shapes, device, Path(tmp))
            for batch_size, length in shapes:
                rows += _case(cfg, head, models, sessions, inputs[batch_size, length], max(b for b, _ in shapes), sizes, opts)
        compression[cfg.model.name] = {"method": cfg.ffn_mode.name, "layers": report.spec["layers"], "mid_dim": report.spec["mid_dim"],
                                       "params_before": report.params_before, "params_after": report.params_after}
        onnx_err[cfg.model.name] = err
    threads = torch.get_num_threads()
    return BenchResult(
        name="inference",
        title="Inference speed: compressed vs original " + " and ".join(f"{m} ({UNITS[h]})" for m, h, _ in sizes.inference),
        columns=[("model", "model"), ("runtime", "runtime"), ("batch", "batch"), ("seq_len", "length"), ("unit", "unit"),
                 ("original", "original /s"), ("compressed", "compressed /s"), ("speedup", "speed-up"), ("bound", "FLOP bound"),
                 ("of_bound", "of bound")],
        rows=rows,
        targets=[target(f"speed-up compressed/original, {r['model']} {r['runtime']} batch {r['batch']}", r["speedup"], ">=", SPEEDUP_TARGET)
                 for r in rows],
        notes=_notes(compression, onnx_err, sizes, threads, opts),
        settings={"reps": sizes.inference_reps, "warmup": WARMUP, "cases": sizes.inference, "compression": compression,
                  "precision": opts.precision,
                  "onnx_rel_err": onnx_err, "onnxruntime_intra_op_threads": threads, "providers": ["CPUExecutionProvider"],
                  "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__, "onnx": onnx.__version__,
                               "transformers": transformers.__version__}},
    )


def _prepare(cfg: DictConfig, head: str, shapes: tuple[Shape, ...], device: torch.device, tmp: Path) -> tuple[
        dict[str, nn.Module], dict[str, ort.InferenceSession], dict[Shape, dict[str, Tensor]], FusionReport, float]:
    """Both models (the compressed one folded), their ONNX Runtime sessions and one real batch per case."""
    torch.manual_seed(cfg.seed)  # a config-built (random) model: the same weights on every run
    # on the CPU, where the ONNX export runs; moved to the device after
    original = build_model(cfg.model, head, **({"num_labels": cfg.task.num_labels} if head == "classification" else {})).eval()
    compressed = copy.deepcopy(original)
    report = compress(compressed, cfg, device)
    prepare_for_export(compressed)  # count scales folded into the down projections, as src.export deploys them
    batches = {}
    for batch_size, length in shapes:
        cfg.task.batch_size, cfg.task.max_seq_length = batch_size, length
        batches[batch_size, length] = real_batches(cfg, 1, torch.device("cpu"))[0]
    largest = batches[max(shapes)]
    samples = {k: v[:2] for k, v in largest.items() if k != "labels"}  # export_onnx checks itself on these
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # as many threads as PyTorch's pool: comparable sides
    options.log_severity_level = 3  # errors only: the tables stay readable
    models, sessions, err = {}, {}, 0.0
    for kind, model in (("original", original), ("compressed", compressed)):
        path = tmp / f"{kind}.onnx"
        names, rel = export_onnx(model.cpu(), path, samples)
        err = max(err, rel)
        sessions[kind] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        models[kind] = model.to(device)
    inputs = {shape: {n: b[n] for n in names} for shape, b in batches.items()}
    return models, sessions, inputs, report, err


def _case(cfg: DictConfig, head: str, models: dict[str, nn.Module], sessions: dict[str, ort.InferenceSession],
          batch: dict[str, Tensor], rows_per_call: int, sizes: Sizes, opts: Options) -> list[dict[str, Any]]:
    """One (batch, length): FLOPs of each model's forward, then the four sides timed, alternating (PyTorch under
    the precision's autocast; ONNX Runtime runs the fp32 graph)."""
    device = opts.device
    batch_size, length = batch["input_ids"].shape
    forwards = rows_per_call // batch_size  # per timed call: every call of a model processes the same rows
    on_device = {n: t.to(device) for n, t in batch.items()}
    feeds = {n: t.numpy() for n, t in batch.items()}
    extra = {"use_cache": False} if head == "generation" else {}  # the ONNX graph's forward: no KV cache

    def torch_side(model: nn.Module) -> Callable[[int], None]:
        def call(i: int) -> None:
            for _ in range(forwards):
                model(**on_device, **extra)
        return call

    def ort_side(session: ort.InferenceSession) -> Callable[[int], None]:
        def call(i: int) -> None:
            for _ in range(forwards):
                session.run(["logits"], feeds)
        return call

    fns = {f"pytorch/{k}": torch_side(models[k]) for k in MODELS} | {f"onnxruntime/{k}": ort_side(sessions[k]) for k in MODELS}
    with torch.inference_mode(), autocast(device, opts.precision):
        flops = {k: count_flops(lambda k=k: models[k](**on_device, **extra)) for k in MODELS}
        times = alternate(fns, sizes.inference_reps, device, warmup=WARMUP)
    items = forwards * batch_size * (length if head == "generation" else 1)
    bound = flops["original"] / flops["compressed"]
    rows = []
    for runtime in RUNTIMES:
        t = {k: times[f"{runtime}/{k}"] for k in MODELS}
        speedup = paired_ratio(t["original"], t["compressed"])
        rows.append({
            "model": cfg.model.name, "runtime": runtime, "batch": batch_size, "seq_len": length, "unit": UNITS[head],
            "original": items / statistics.median(t["original"]), "compressed": items / statistics.median(t["compressed"]),
            "speedup": speedup, "bound": bound, "of_bound": speedup / bound, "forwards_per_call": forwards,
            "gflops_original": flops["original"] / 1e9, "gflops_compressed": flops["compressed"] / 1e9, "times": t,
        })
    return rows


def _notes(compression: dict[str, dict[str, Any]], onnx_err: dict[str, float], sizes: Sizes, threads: int,
           opts: Options) -> list[str]:
    models = "; ".join(f"{m}: {c['method']} on layers {c['layers']} at width {c['mid_dim']}, {c['params_before'] / 1e6:.1f} M -> "
                       f"{c['params_after'] / 1e6:.1f} M parameters, ONNX Runtime vs PyTorch rel. err {onnx_err[m]:.1e}"
                       for m, c in compression.items())
    return [
        f"compressed = the project's defaults (what python -m src.train compresses), count scales folded: {models}.",
        "inputs: real Rotten Tomatoes training sentences padded to the length; tokens/s counts every position, padding "
        "included (a forward's cost does not depend on the mask). Causal LMs: logits of every position, no KV cache, on both sides.",
        f"PyTorch {torch.__version__} eager under torch.inference_mode on {opts.device}; ONNX Runtime {ort.__version__} (fp32 graph), "
        f"CPUExecutionProvider, default graph optimizations, intra-op threads = torch.get_num_threads() = {threads}; "
        "the models exported by src.models.exported.export_onnx.",
        f"PyTorch side: {precision_note(opts.precision)}",
        f"each timed call runs as many forwards as make up the largest batch of its model (forwards_per_call); {WARMUP} warm-up "
        f"call, then {sizes.inference_reps} timed calls per side, the four sides of a case interleaved in a rotating order. "
        "Throughput from the median call; speed-up = median of the paired ratios original time / compressed time.",
        "FLOP bound = FLOPs of the original forward / the compressed one's (FlopCounterMode: matrix products only); "
        "'of bound' = speed-up / bound.",
    ]
