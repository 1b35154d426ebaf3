"""Inference speed: compressed models against the originals, in PyTorch, ONNX Runtime and llama.cpp.

A sequence classifier (sentences per second) and a causal LM forward (tokens per second: the
logits of every position, without a KV cache, as the ONNX export has them). The compressed model is
what ``python -m src.train`` compresses by default (the model's default method on its default
layers and width, through the fusion callback), its count scales folded as ``src.export`` folds
them; both models are written as ``src.export`` writes them (Hugging Face folders, ONNX through
``src.export.exported.export_onnx``). Each runtime (PyTorch eager under ``torch.inference_mode``,
ONNX Runtime's CPUExecutionProvider) times both models in its own fresh processes
(``bench.timing``: several, the order of the models reversed in every other one, the original and
compressed calls paired); each speed-up is the median over the processes with a 95 % interval. The
bound is the forward's FLOP ratio, counted as the fine-tuning benchmark counts FLOPs.

A causal LM also runs in llama.cpp (llama-cpp-python, an optional dependency: its rows are skipped,
and the record says so, where it is not installed), both models written by
``src.export.to_gguf.write_gguf`` at each of ``LLAMA_CPP_DTYPES``, each type in its own processes:
prompt processing (pp, one prompt in one batch) and generation (tg, greedy single-token decodes with
the KV cache), batch 1.
"""

from __future__ import annotations

import copy
import importlib.util
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from bench.common import (
    BenchResult,
    Options,
    Sizes,
    autocast,
    compose_config,
    compress,
    count_flops,
    precision_note,
    real_batches,
    target,
)
from bench.timing import INTERVAL, Stage, mapped, paired_ratio, rate_summary, ratio_summary, run_stages, timing_record
from src.export.exported import export_onnx, prepare_for_export
from src.export.to_gguf import gguf_unsupported, write_gguf
from src.models.build import build_model, load_tokenizer
from src.pipeline.fuse import FusionReport

WARMUP = 1  # untimed calls per side and case: first-run allocations of ONNX Runtime and oneDNN
SPEEDUP_TARGET = 1.0  # the aim: a compressed model that really is faster
MODELS = ("original", "compressed")  # the sides, in even processes' order (bench.timing.side_order)
RUNTIMES = ("pytorch", "onnxruntime")
UNITS = {"classification": "sentences/s", "generation": "tokens/s"}
Shape = tuple[int, int]  # (batch, length)
# GGUF weight types timed in llama.cpp: f32, the numerics of the PyTorch and ONNX Runtime rows; q8_0, its usual 8-bit deployment
LLAMA_CPP_DTYPES = ("f32", "q8_0")
TG_TOKENS = 64  # greedy single-token decodes per timed generation call (llama-bench's tg64)
NO_LLAMA_CPP = "llama-cpp-python is not installed: pyproject extra deploy, make install-deploy"


def run(sizes: Sizes, opts: Options) -> BenchResult:
    """Every model of ``sizes.inference``: build, compress and write its files, then time each runtime in its own
    processes (``opts.processes`` of each, bench.timing): PyTorch, ONNX Runtime and, for a causal LM, llama.cpp."""
    rows, compression, onnx_err, llama = [], {}, {}, {}
    # looked up, not imported: llama.cpp loads in its own processes only
    has_llama_cpp = importlib.util.find_spec("llama_cpp") is not None
    processes: dict[str, list[dict[str, Any]]] = {}
    llama_version = None  # llama_cpp.__version__ as the timed processes imported it
    for name, head, shapes in sizes.inference:
        cfg = compose_config(sizes, opts, None, model=name, default_fusion=True)  # the model's own default method
        model = cfg.model.name
        with tempfile.TemporaryDirectory() as tmp:
            stages, flops, report, onnx_err[model], gguf = _prepare(cfg, head, shapes, opts, sizes, Path(tmp), has_llama_cpp)
            results = run_stages(stages, opts.processes, opts.threads)
        if gguf is not None:
            llama[model] = gguf
        processes |= {stage: [{k: r[k] for k in ("process", "order", "wall_s")} for r in found] for stage, found in results.items()}
        for batch_size, length in shapes:
            forwards = max(b for b, _ in shapes) // batch_size  # per timed call: every call of a model processes the same rows
            items = forwards * batch_size * (length if head == "generation" else 1)
            rows += [_row(model, runtime, batch_size, length, UNITS[head], items, results[f"{model} {runtime}"], f"{batch_size}x{length}",
                          flops[batch_size, length], forwards_per_call=forwards) for runtime in RUNTIMES]
        for dtype in LLAMA_CPP_DTYPES if gguf and "files" in gguf else ():
            found = results[f"{model} llama.cpp {dtype}"]
            llama_version = found[0]["version"]
            for stage, tokens in (("pp", llama[model]["prompt_tokens"]), ("tg", TG_TOKENS)):
                rows.append(_row(model, f"llama.cpp {dtype} {stage}", 1, tokens, UNITS["generation"], tokens, found, stage, flops[stage],
                                 llama_perf=[r["llama_perf"][stage] for r in found]))
        compression[model] = {"method": cfg.ffn_mode.name, "layers": report.spec["layers"], "mid_dim": report.spec["mid_dim"],
                              "params_before": report.params_before, "params_after": report.params_after}
    return BenchResult(
        name="inference",
        title="Inference speed: compressed vs original " + " and ".join(f"{m} ({UNITS[h]})" for m, h, _ in sizes.inference),
        columns=[("model", "model"), ("runtime", "runtime"), ("batch", "batch"), ("seq_len", "length"), ("unit", "unit"),
                 ("original", "original /s"), ("compressed", "compressed /s"), ("speedup", "speed-up"), ("bound", "FLOP bound"),
                 ("of_bound", "of bound")],
        rows=rows,
        targets=[target(f"speed-up compressed/original (median over processes), {r['model']} {r['runtime']} batch {r['batch']}",
                        r["speedup"]["median"], ">=", SPEEDUP_TARGET) for r in rows],
        notes=[*_notes(compression, onnx_err, sizes, opts), _llama_note(llama, llama_version, opts.threads)],
        settings={"reps": sizes.inference_reps, "warmup": WARMUP, "processes": processes, "cases": sizes.inference,
                  "compression": compression, "precision": opts.precision, "onnx_rel_err": onnx_err,
                  "onnxruntime_intra_op_threads": opts.threads, "providers": ["CPUExecutionProvider"], "llama_cpp": llama,
                  "llama_cpp_dtypes": LLAMA_CPP_DTYPES, "tg_tokens": TG_TOKENS},
        timing=timing_record(opts.processes, opts.threads),
    )


def _prepare(cfg: DictConfig, head: str, shapes: tuple[Shape, ...], opts: Options, sizes: Sizes, tmp: Path, has_llama_cpp: bool) -> tuple[
        list[Stage], dict[Any, dict[str, int]], FusionReport, float, dict[str, Any] | None]:
    """Both models (the compressed one folded as ``src.export`` folds it) written to ``tmp`` for the timed processes: Hugging
    Face folders, ONNX graphs, one real batch per case and, for a causal LM where llama.cpp is installed, GGUF files.

    Returns the stages that time them, the FLOPs of each case's forward (keyed by (batch, length), and "pp" and "tg" for
    llama.cpp), the compression report, ONNX Runtime's relative error against PyTorch and, for a causal LM, what the
    llama.cpp files are (or why there are none). The models are counted here and dropped before any timing."""
    device, model = opts.device, cfg.model.name
    torch.manual_seed(cfg.seed)  # a config-built (random) model: the same weights on every run
    # on the CPU, where the ONNX export runs; moved to the device for the FLOP count
    original = build_model(cfg.model, head, **({"num_labels": cfg.task.num_labels} if head == "classification" else {})).eval()
    compressed = copy.deepcopy(original)
    report = compress(compressed, cfg, device)
    models = {"original": original, "compressed": compressed}
    batches = {}
    for batch_size, length in shapes:
        cfg.task.batch_size, cfg.task.max_seq_length = batch_size, length
        batches[batch_size, length] = real_batches(cfg, 1, torch.device("cpu"))[0]
    samples = {k: v[:2] for k, v in batches[max(shapes)].items() if k != "labels"}  # export_onnx checks itself on these
    folders, onnx_files, err = {}, {}, 0.0
    for kind, m in models.items():
        widths = prepare_for_export(m)  # count scales folded, the structure in the config, as src.export writes it
        folders[kind], onnx_files[kind] = str(tmp / kind), str(tmp / f"{kind}.onnx")
        m.save_pretrained(folders[kind], save_original_format=widths is not None)
        names, rel = export_onnx(m.cpu(), Path(onnx_files[kind]), samples)
        err = max(err, rel)
        m.to(device)
    cases, flops = [], {}
    extra = {"use_cache": False} if head == "generation" else {}  # the ONNX graph's forward: no KV cache
    for (batch_size, length), batch in batches.items():
        inputs = {n: batch[n] for n in names}
        path = tmp / f"inputs-{batch_size}x{length}.npz"
        np.savez(path, **{n: t.numpy() for n, t in inputs.items()})
        cases.append({"key": f"{batch_size}x{length}", "inputs": str(path), "forwards": max(b for b, _ in shapes) // batch_size})
        on_device = {n: t.to(device) for n, t in inputs.items()}
        with torch.inference_mode(), autocast(device, opts.precision):
            flops[batch_size, length] = {k: count_flops(lambda m=m: m(**on_device, **extra)) for k, m in models.items()}
    timing = {"cases": cases, "reps": sizes.inference_reps, "warmup": WARMUP}
    stages = [Stage(f"{model} pytorch", "bench.runtimes:pytorch", MODELS,
                    {"folders": folders, "head": head, "device": str(device), "precision": opts.precision, **timing}),
              Stage(f"{model} onnxruntime", "bench.runtimes:onnxruntime", MODELS, {"files": onnx_files, "threads": opts.threads, **timing})]
    llama = None
    if head == "generation":  # llama.cpp runs causal LMs
        longest = batches[max(shapes, key=lambda s: s[1])]
        llama = _gguf(cfg, models, longest, tmp, opts, sizes, stages, flops) if has_llama_cpp else {"skipped": NO_LLAMA_CPP}
    return stages, flops, report, err, llama


def _gguf(cfg: DictConfig, models: dict[str, nn.Module], batch: dict[str, Tensor], tmp: Path, opts: Options, sizes: Sizes,
          stages: list[Stage], flops: dict[Any, dict[str, int]]) -> dict[str, Any]:
    """Both models as GGUF files at each of LLAMA_CPP_DTYPES, a llama.cpp stage for each (appended to ``stages``) and the
    FLOPs of pp and tg (into ``flops``); returns what the files are, or why there are none.

    The prompt is ``batch``'s first sentence as the case has it (padded to its length); generation starts from the
    sentence's first token."""
    tokenizer = load_tokenizer(cfg.model)
    reason = next(filter(None, (gguf_unsupported(models[k], tokenizer) for k in MODELS)), None)
    if reason:
        return {"skipped": reason}
    tokenizer.save_pretrained(tmp / "tokenizer")  # write_gguf reads merges, special ids and the chat template from it
    prompt = batch["input_ids"][0].tolist()
    first = int(batch["input_ids"][0][batch["attention_mask"][0].bool()][0])
    ids = batch["input_ids"][:1].to(opts.device)
    with torch.inference_mode():  # llama.cpp computes the prompt's last logits only; a new token is a 1-token forward
        for stage, call in (("pp", {"input_ids": ids, "logits_to_keep": 1}), ("tg", {"input_ids": ids[:, :1]})):
            flops[stage] = {k: count_flops(lambda m=models[k], call=call: m(**call, use_cache=False)) for k in MODELS}
    params = {"n_ctx": len(prompt) + TG_TOKENS, "n_threads": opts.threads, "n_threads_batch": opts.threads, "n_batch": len(prompt),
              "logits_all": False, "verbose": False}  # n_batch: the prompt in one batch
    files = {}
    for dtype in LLAMA_CPP_DTYPES:
        paths = {k: tmp / f"{k}.{dtype}.gguf" for k in MODELS}
        files[dtype] = {k: write_gguf(models[k], tokenizer, tmp / "tokenizer", paths[k], dtype) for k in MODELS}
        stages.append(Stage(f"{cfg.model.name} llama.cpp {dtype}", "bench.runtimes:llama_cpp", MODELS,
                            {"files": {k: str(p) for k, p in paths.items()}, "prompt": prompt, "first": first, "tg_tokens": TG_TOKENS,
                             "params": params, "reps": sizes.inference_reps, "warmup": WARMUP}))
    return {"params": params, "prompt_tokens": len(prompt), "files": files}


def _row(model: str, runtime: str, batch: int, length: int, unit: str, items: int, results: list[dict[str, Any]], key: str,
         flops: dict[str, int], **extra: Any) -> dict[str, Any]:
    """A table row over the processes of one runtime: each model's throughput (``items`` per call over a process's median
    call), the speed-up (per process the median of the paired ratios), the FLOP bound and how much of it the speed-up reaches."""
    times = [r["times"][key] for r in results]
    speedup = ratio_summary([paired_ratio(t["original"], t["compressed"]) for t in times])
    bound = flops["original"] / flops["compressed"]
    rates = {k: rate_summary([items / statistics.median(t[k]) for t in times]) for k in MODELS}
    return {"model": model, "runtime": runtime, "batch": batch, "seq_len": length, "unit": unit, **rates,
            "speedup": speedup, "bound": bound, "of_bound": mapped(speedup, lambda v: v / bound), **extra,
            "gflops_original": flops["original"] / 1e9, "gflops_compressed": flops["compressed"] / 1e9, "times": times}


def _notes(compression: dict[str, dict[str, Any]], onnx_err: dict[str, float], sizes: Sizes, opts: Options) -> list[str]:
    models = "; ".join(f"{m}: {c['method']} on layers {c['layers']} at width {c['mid_dim']}, {c['params_before'] / 1e6:.1f} M -> "
                       f"{c['params_after'] / 1e6:.1f} M parameters, ONNX Runtime vs PyTorch rel. err {onnx_err[m]:.1e}"
                       for m, c in compression.items())
    return [
        f"compressed = the project's defaults (what python -m src.train compresses), count scales folded: {models}.",
        "inputs: real Rotten Tomatoes training sentences padded to the length; tokens/s counts every position, padding "
        "included (a forward's cost does not depend on the mask). Causal LMs: logits of every position, no KV cache, on both sides.",
        f"PyTorch eager under torch.inference_mode on {opts.device}, the models loaded from the Hugging Face folders src.export "
        "writes (src.export.exported.load_exported); ONNX Runtime (fp32 graph), CPUExecutionProvider, default graph optimizations, "
        f"intra-op threads {opts.threads}, the graphs src.export.exported.export_onnx writes. Versions: the machine record.",
        f"PyTorch side: {precision_note(opts.precision)}",
        f"each runtime runs in its own fresh processes, {opts.processes} of each (bench.timing: PyTorch, ONNX Runtime and llama.cpp "
        "never share a process; process j of every runtime before process j + 1). In a process both models load, then each case "
        f"gets {WARMUP} untimed and {sizes.inference_reps} timed calls per model, original and compressed back to back: original "
        "first (loading too) in even processes, compressed first in odd ones. Each timed call runs as many forwards as make up "
        "the largest batch of its model (forwards_per_call).",
        "per process: throughput from the median call, speed-up = median of the paired ratios original time / compressed time; "
        f"a row: the median over the processes, its 95 % interval [lo, hi] and n ({INTERVAL}); throughput: the median "
        "(min to max) over the processes. Every process's values and calls in the JSON rows.",
        "FLOP bound = FLOPs of the original forward / the compressed one's (FlopCounterMode: matrix products only); "
        "'of bound' = speed-up / bound, its interval the speed-up's over the bound.",
    ]


def _llama_note(llama: dict[str, dict[str, Any]], version: str | None, threads: int) -> str:
    """The table's note on its llama.cpp rows: what ran and how they are measured, or why there are none."""
    if not any("files" in info for info in llama.values()):
        why = "; ".join(f"{m}: {info['skipped']}" for m, info in llama.items()) or "no causal LM among the models"
        return f"llama.cpp: no rows; {why}."

    def file(meta: dict[str, Any]) -> str:
        fallbacks = meta["gguf_f16_fallbacks"]
        return meta["gguf_arch"] + (f" (f16 where q8_0 cannot: {', '.join(fallbacks)})" if fallbacks else "")

    skipped = "; ".join(f"{m}: skipped, {info['skipped']}" for m, info in llama.items() if "skipped" in info)
    files = "; ".join(f"{m} {dtype}: " + ", ".join(f"{k} {file(f[k])}" for k in MODELS)
                      for m, info in llama.items() if "files" in info for dtype, f in info["files"].items())
    return (f"llama.cpp (llama-cpp-python {version}, CPU, n_threads = n_threads_batch = {threads}, each GGUF weight type in its "
            "own processes) runs each causal LM and its compressed copy, written by src.export.to_gguf.write_gguf at "
            f"{', '.join(LLAMA_CPP_DTYPES)} (f32: the other rows' numerics); architectures: {files or 'none'}"
            f"{'; ' + skipped if skipped else ''}. "
            "pp: one llm.eval of the longest case's first sentence, padded to its length, in one batch from an empty KV cache, "
            f"logits of its last position only; tg: {TG_TOKENS} greedy single-token decodes (argmax of the last logits, then "
            "llm.eval of that token) from the sentence's first token, as llama-bench's tg; batch 1. tokens/s = tokens / wall "
            "time of the call (state reset included); pp and tg of both models in one round per call, paired as above; "
            "llama.cpp's own counters per call and process in the JSON rows (llama_perf: t_p_eval_ms, n_p_eval for pp; "
            "t_eval_ms, n_eval for tg). FLOP bound: pp, the prompt's forward with the last position's logits (logits_to_keep=1, "
            "as llama.cpp computes them); tg, a 1-token forward: the matrix products of the projections and the output layer per "
            "new token (attention over the KV cache not counted).")
