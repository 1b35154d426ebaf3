"""Inference speed: compressed models against the originals, in PyTorch, ONNX Runtime and llama.cpp.

A sequence classifier (sentences per second) and a causal LM forward (tokens per second: the
logits of every position, without a KV cache, as the ONNX export has them). The compressed model is
what ``python -m src.train`` compresses by default (the model's default method on its default
layers and width, through the fusion callback), its count scales folded as ``src.export`` folds
them; both models go to ONNX through ``src.export.exported.export_onnx``. The four sides of a case
(PyTorch eager under ``torch.inference_mode`` and ONNX Runtime's CPUExecutionProvider, each with
the original and the compressed model) alternate call by call. The bound is the forward's FLOP
ratio, counted as the fine-tuning benchmark counts FLOPs.

A causal LM also runs in llama.cpp (llama-cpp-python, an optional dependency: its rows are skipped
where it is not installed), both models written by ``src.export.to_gguf.write_gguf`` at each of
``LLAMA_CPP_DTYPES``: prompt processing (pp, one prompt in one batch) and generation (tg, greedy
single-token decodes with the KV cache), batch 1, original and compressed alternating call by call.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
from collections.abc import Callable
from contextlib import ExitStack, closing
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
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
from src.export.exported import export_onnx, prepare_for_export
from src.export.to_gguf import gguf_unsupported, write_gguf
from src.models.build import build_model, load_tokenizer
from src.pipeline.fuse import FusionReport

WARMUP = 1  # untimed calls per side and case: first-run allocations of ONNX Runtime and oneDNN
SPEEDUP_TARGET = 1.0  # the aim: a compressed model that really is faster
MODELS = ("original", "compressed")
RUNTIMES = ("pytorch", "onnxruntime")
UNITS = {"classification": "sentences/s", "generation": "tokens/s"}
Shape = tuple[int, int]  # (batch, length)
# GGUF weight types timed in llama.cpp: f32, the numerics of the PyTorch and ONNX Runtime rows; q8_0, its usual 8-bit deployment
LLAMA_CPP_DTYPES = ("f32", "q8_0")
TG_TOKENS = 64  # greedy single-token decodes per timed generation call (llama-bench's tg64)
# llama.cpp's own counters of each stage (llama_perf_context): prompt batches, single-token decodes
PERF = {"pp": ("t_p_eval_ms", "n_p_eval"), "tg": ("t_eval_ms", "n_eval")}


def run(sizes: Sizes, opts: Options) -> BenchResult:
    """Every model of ``sizes.inference``: build, compress, export, then time each of its cases (a causal LM's
    also in llama.cpp)."""
    device, rows, compression, onnx_err, llama = opts.device, [], {}, {}, {}
    llama_cpp = _import_llama_cpp()
    for name, head, shapes in sizes.inference:
        cfg = compose_config(sizes, opts, None, model=name, default_fusion=True)  # the model's own default method
        with tempfile.TemporaryDirectory() as tmp:
            models, sessions, inputs, report, err = _prepare(cfg, head, shapes, device, Path(tmp))
            for batch_size, length in shapes:
                rows += _case(cfg, head, models, sessions, inputs[batch_size, length], max(b for b, _ in shapes), sizes, opts)
            if head == "generation" and llama_cpp is not None:  # llama.cpp runs causal LMs
                longest = inputs[max(shapes, key=lambda s: s[1])]
                llama_rows, llama[cfg.model.name] = _llama_cpp(llama_cpp, cfg, models, longest, Path(tmp), sizes, opts)
                rows += llama_rows
        compression[cfg.model.name] = {"method": cfg.ffn_mode.name, "layers": report.spec["layers"], "mid_dim": report.spec["mid_dim"],
                                       "params_before": report.params_before, "params_after": report.params_after}
        onnx_err[cfg.model.name] = err
    threads = torch.get_num_threads()
    llama_version = llama_cpp.__version__ if llama_cpp else None
    return BenchResult(
        name="inference",
        title="Inference speed: compressed vs original " + " and ".join(f"{m} ({UNITS[h]})" for m, h, _ in sizes.inference),
        columns=[("model", "model"), ("runtime", "runtime"), ("batch", "batch"), ("seq_len", "length"), ("unit", "unit"),
                 ("original", "original /s"), ("compressed", "compressed /s"), ("speedup", "speed-up"), ("bound", "FLOP bound"),
                 ("of_bound", "of bound")],
        rows=rows,
        targets=[target(f"speed-up compressed/original, {r['model']} {r['runtime']} batch {r['batch']}", r["speedup"], ">=", SPEEDUP_TARGET)
                 for r in rows],
        notes=_notes(compression, onnx_err, sizes, threads, opts) + [_llama_note(llama, llama_version, threads)],
        settings={"reps": sizes.inference_reps, "warmup": WARMUP, "cases": sizes.inference, "compression": compression,
                  "precision": opts.precision,
                  "onnx_rel_err": onnx_err, "onnxruntime_intra_op_threads": threads, "providers": ["CPUExecutionProvider"],
                  "llama_cpp": llama, "llama_cpp_dtypes": LLAMA_CPP_DTYPES, "tg_tokens": TG_TOKENS,
                  "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__, "onnx": onnx.__version__,
                               "transformers": transformers.__version__, "llama_cpp": llama_version}},
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
    return [_row(cfg.model.name, runtime, batch_size, length, UNITS[head], items, {k: times[f"{runtime}/{k}"] for k in MODELS}, flops,
                 forwards_per_call=forwards)
            for runtime in RUNTIMES]


def _row(model: str, runtime: str, batch: int, length: int, unit: str, items: int, times: dict[str, list[float]],
         flops: dict[str, int], **extra: Any) -> dict[str, Any]:
    """A table row: throughput of each model from its median call (``items`` per call), the speed-up from the paired
    ratios, the FLOP bound and how much of it the speed-up reaches."""
    speedup = paired_ratio(times["original"], times["compressed"])
    bound = flops["original"] / flops["compressed"]
    return {"model": model, "runtime": runtime, "batch": batch, "seq_len": length, "unit": unit,
            "original": items / statistics.median(times["original"]), "compressed": items / statistics.median(times["compressed"]),
            "speedup": speedup, "bound": bound, "of_bound": speedup / bound, **extra,
            "gflops_original": flops["original"] / 1e9, "gflops_compressed": flops["compressed"] / 1e9, "times": times}


def _import_llama_cpp() -> ModuleType | None:
    """llama-cpp-python, or None where it is not installed (an optional dependency: pyproject's extra ``deploy``)."""
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp


def _llama_cpp(llama_cpp: ModuleType, cfg: DictConfig, models: dict[str, nn.Module], batch: dict[str, Tensor], tmp: Path,
               sizes: Sizes, opts: Options) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Both models in llama.cpp at each GGUF weight type: pp and tg rows, batch 1, and what the files are (or why none).

    The prompt is ``batch``'s first sentence as the case has it (padded to its length); generation starts from the
    sentence's first token. tokens/s counts the wall time of a call (a state reset included), as the other rows do;
    llama.cpp's own counters of each call go into the row (``llama_perf``)."""
    tokenizer = load_tokenizer(cfg.model)
    reason = next(filter(None, (gguf_unsupported(models[k], tokenizer) for k in MODELS)), None)
    if reason:
        return [], {"skipped": reason}
    tokenizer.save_pretrained(tmp / "tokenizer")  # write_gguf reads merges, special ids and the chat template from it
    prompt = batch["input_ids"][0].tolist()
    first = int(batch["input_ids"][0][batch["attention_mask"][0].bool()][0])
    ids = batch["input_ids"][:1].to(opts.device)
    with torch.inference_mode():  # llama.cpp computes the prompt's last logits only; a new token is a 1-token forward
        flops = {stage: {k: count_flops(lambda k=k, call=call: models[k](**call, use_cache=False)) for k in MODELS}
                 for stage, call in (("pp", {"input_ids": ids, "logits_to_keep": 1}), ("tg", {"input_ids": ids[:, :1]}))}
    threads = torch.get_num_threads()
    params = {"n_ctx": len(prompt) + TG_TOKENS, "n_threads": threads, "n_threads_batch": threads, "n_batch": len(prompt),
              "logits_all": False, "verbose": False}  # n_batch: the prompt in one batch

    def side(llm: Any, stage: str, perf: list[dict[str, float]]) -> Callable[[int], None]:
        def call(i: int) -> None:
            llm.reset()  # an empty KV cache: every call processes the same tokens
            llama_cpp.llama_perf_context_reset(llm.ctx)
            if stage == "pp":
                llm.eval(prompt)
                llama_cpp.llama_synchronize(llm.ctx)  # the prompt's logits computed (llama.cpp counts its time here)
            else:
                token = first
                for _ in range(TG_TOKENS):
                    llm.eval([token])
                    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
                    token = int(logits.argmax())
            data = llama_cpp.llama_perf_context(llm.ctx)
            perf.append({name: getattr(data, name) for name in PERF[stage]})
        return call

    rows, files = [], {}
    for dtype in LLAMA_CPP_DTYPES:
        paths = {k: tmp / f"{k}.{dtype}.gguf" for k in MODELS}
        files[dtype] = {k: write_gguf(models[k], tokenizer, tmp / "tokenizer", paths[k], dtype) for k in MODELS}
        perf: dict[str, list[dict[str, float]]] = {f"{stage}/{k}": [] for stage in PERF for k in MODELS}
        with ExitStack() as stack:  # closed here: left to the garbage collector, they print an exception at interpreter exit
            llms = {k: stack.enter_context(closing(llama_cpp.Llama(str(paths[k]), **params))) for k in MODELS}
            fns = {f"{stage}/{k}": side(llms[k], stage, perf[f"{stage}/{k}"]) for stage in PERF for k in MODELS}
            times = alternate(fns, sizes.inference_reps, opts.device, warmup=WARMUP)
        for stage, tokens in (("pp", len(prompt)), ("tg", TG_TOKENS)):
            rows.append(_row(cfg.model.name, f"llama.cpp {dtype} {stage}", 1, tokens, UNITS["generation"], tokens,
                             {k: times[f"{stage}/{k}"] for k in MODELS}, flops[stage],
                             llama_perf={k: perf[f"{stage}/{k}"][WARMUP:] for k in MODELS}))
    return rows, {"params": params, "prompt_tokens": len(prompt), "files": files}


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
        "the models exported by src.export.exported.export_onnx.",
        f"PyTorch side: {precision_note(opts.precision)}",
        f"each timed call runs as many forwards as make up the largest batch of its model (forwards_per_call); {WARMUP} warm-up "
        f"call, then {sizes.inference_reps} timed calls per side, the four sides of a case interleaved in a rotating order. "
        "Throughput from the median call; speed-up = median of the paired ratios original time / compressed time.",
        "FLOP bound = FLOPs of the original forward / the compressed one's (FlopCounterMode: matrix products only); "
        "'of bound' = speed-up / bound.",
    ]


def _llama_note(llama: dict[str, dict[str, Any]], version: str | None, threads: int) -> str:
    """The table's note on its llama.cpp rows: what ran and how they are measured, or why there are none."""
    if version is None:
        return "llama.cpp: no rows, llama-cpp-python is not installed (pyproject extra deploy: make install-deploy)."
    def file(meta: dict[str, Any]) -> str:
        fallbacks = meta["gguf_f16_fallbacks"]
        return meta["gguf_arch"] + (f" (f16 where q8_0 cannot: {', '.join(fallbacks)})" if fallbacks else "")

    skipped = "; ".join(f"{m}: skipped, {info['skipped']}" for m, info in llama.items() if "skipped" in info)
    files = "; ".join(f"{m} {dtype}: " + ", ".join(f"{k} {file(f[k])}" for k in MODELS)
                      for m, info in llama.items() if "files" in info for dtype, f in info["files"].items())
    return (f"llama.cpp (llama-cpp-python {version}, CPU, n_threads = n_threads_batch = torch.get_num_threads() = {threads}) runs "
            f"each causal LM and its compressed copy, written by src.export.to_gguf.write_gguf at {', '.join(LLAMA_CPP_DTYPES)} "
            f"(f32: the other rows' numerics); architectures: {files or 'none'}{'; ' + skipped if skipped else ''}. "
            "pp: one llm.eval of the longest case's first sentence, padded to its length, in one batch from an empty KV cache, "
            f"logits of its last position only; tg: {TG_TOKENS} greedy single-token decodes (argmax of the last logits, then "
            "llm.eval of that token) from the sentence's first token, as llama-bench's tg; batch 1. tokens/s = tokens / wall "
            "time of the call (state reset included), alternating original and compressed as above; llama.cpp's own "
            "counters per call in the JSON rows (llama_perf: t_p_eval_ms, n_p_eval for pp; t_eval_ms, n_eval for tg). "
            "FLOP bound: pp, the prompt's forward with the last position's logits (logits_to_keep=1, as llama.cpp computes "
            "them); tg, a 1-token forward: the matrix products of the projections and the output layer per new token "
            "(attention over the KV cache not counted).")
