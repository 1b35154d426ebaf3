"""Why llama.cpp read slower beside the other runtimes: ``python -m bench.beside [--quick] [--processes K] [--threads N]``.

Before ``bench.timing``, one process ran every runtime of the inference benchmark in turn, and its llama.cpp
f32 speed-ups read about 0.08 lower than a standalone timing of the same files (issue 36). This runs the
inference benchmark's SmolLM2 llama.cpp f32 comparison (the same files, prompt, calls and pairing) in fresh
processes that first ran the same models in nothing, PyTorch, ONNX Runtime or both, and keep them loaded
(``bench.runtimes.llama_cpp_beside``), process j of every variant before process j + 1. Each variant's pp
and tg speed-ups with their intervals, the original's rates, and what the process looked like when llama.cpp
started (the CPUs it may run on, its threads, its resident memory) go to ``bench/results/llama_cpp_beside.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from bench.common import FULL, QUICK, Options, compose_config, machine
from bench.inference import MODELS, TG_TOKENS, _prepare
from bench.run import RESULTS, _quiet, _threads, machine_line
from bench.timing import INTERVAL, Stage, paired_ratio, rate_summary, ratio_summary, run_stages, timing_record
from src.utils.io import write_json

VARIANTS = {"alone": [], "pytorch": ["pytorch"], "onnxruntime": ["onnxruntime"], "both": ["pytorch", "onnxruntime"]}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.beside", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the quick mode's tiny causal LM (a smoke run of the code)")
    ap.add_argument("--processes", type=int, help=f"fresh processes per variant, n (default {FULL.processes}; {QUICK.processes} with --quick)")
    ap.add_argument("--threads", type=int, help="threads of every runtime (default: all cores; 1 with --quick)")
    ap.add_argument("--out", type=Path, default=RESULTS / "llama_cpp_beside.json")
    args = ap.parse_args(argv)
    base = QUICK if args.quick else FULL
    sizes = replace(base, inference=tuple(c for c in base.inference if c[1] == "generation"))
    threads = args.threads or (1 if args.quick else torch.get_num_threads())
    opts = Options(torch.device("cpu"), "32-true", threads=threads, processes=args.processes or base.processes)
    args.processes, args.threads = opts.processes, threads
    name, head, shapes = sizes.inference[0]
    start = time.perf_counter()
    with _quiet(), _threads(args.threads), tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config(sizes, opts, None, model=name, default_fusion=True)
        stages, flops, _, _, gguf = _prepare(cfg, head, shapes, opts, sizes, Path(tmp), has_llama_cpp=True)
        if gguf is None or "files" not in gguf:
            sys.stderr.write(f"bench.beside: no llama.cpp files: {(gguf or {}).get('skipped', 'not a causal LM')}\n")
            return 2
        by_name = {s.name: s for s in stages}
        torch_args, ort_args = by_name[f"{name} pytorch"].args, by_name[f"{name} onnxruntime"].args
        llama = by_name[f"{name} llama.cpp f32"].args
        one = next(c for c in torch_args["cases"] if c["key"].startswith("1x"))  # batch 1: the neighbours' forwards
        common = {"folders": torch_args["folders"], "onnx_files": ort_args["files"], "inputs": one["inputs"], "threads": args.threads, **llama}
        variants = [Stage(v, "bench.runtimes:llama_cpp_beside", MODELS, {"beside": beside, **common}) for v, beside in VARIANTS.items()]
        results = run_stages(variants, args.processes, args.threads)
    rows = [_row(v, found, gguf["prompt_tokens"], flops) for v, found in results.items()]
    record = {"command": "python -m bench.beside " + " ".join(sys.argv[1:] if argv is None else argv), "machine": machine(opts.device, args.threads),
              "wall_s": time.perf_counter() - start, "rows": rows, "timing": timing_record(args.processes, args.threads), "interval": INTERVAL,
              "llama_cpp_params": llama["params"], "prompt_tokens": gguf["prompt_tokens"], "tg_tokens": TG_TOKENS}
    write_json(args.out, record)
    sys.stdout.write(_table(record))
    return 0


def _row(variant: str, found: list[dict[str, Any]], prompt_tokens: int, flops: dict[Any, dict[str, int]]) -> dict[str, Any]:
    """One variant over its processes: pp and tg speed-ups (per process the median paired ratio), the original's rates, the
    processes' state when llama.cpp started."""
    row: dict[str, Any] = {"variant": variant, "beside": found[0]["beside"], "states": [r["state"] for r in found],
                           "orders": [r["order"] for r in found]}
    for stage, tokens in (("pp", prompt_tokens), ("tg", TG_TOKENS)):
        times = [r["times"][stage] for r in found]
        row[stage] = ratio_summary([paired_ratio(t["original"], t["compressed"]) for t in times])
        row[f"{stage}_bound"] = flops[stage]["original"] / flops[stage]["compressed"]
        row[f"{stage}_original"] = rate_summary([tokens / statistics.median(t["original"]) for t in times])
        row[f"{stage}_times"] = times
    return row


def _table(record: dict[str, Any]) -> str:
    def ratio(s: dict[str, Any]) -> str:
        lo, hi = s["interval"] or (s["median"], s["median"])
        return f"{s['median']:.3f} [{lo:.3f}, {hi:.3f}] (n={s['n']})"

    def rate(s: dict[str, Any]) -> str:
        return f"{s['median']:.0f} ({s['min']:.0f} to {s['max']:.0f})"

    lines = [f"`{record['command']}`, {record['wall_s']:.0f} s; {machine_line(record['machine'])}.", "",
             "| llama.cpp f32 beside | pp speed-up | tg speed-up | original pp tokens/s | original tg tokens/s | CPUs allowed | threads | RSS MB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        cpus = sorted({len(s["affinity"]) for s in r["states"]})
        threads = statistics.median(s["threads"] for s in r["states"])
        rss = statistics.median(s["rss_mb"] for s in r["states"])
        lines.append(f"| {r['variant']} | {ratio(r['pp'])} | {ratio(r['tg'])} | {rate(r['pp_original'])} | {rate(r['tg_original'])} | "
                     f"{cpus} | {threads:.0f} | {rss:.0f} |")
    bounds = record["rows"][0]
    lines += ["", f"FLOP bounds: pp {bounds['pp_bound']:.3f}, tg {bounds['tg_bound']:.3f}. {record['interval']}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
