"""Run the benchmarks: ``python -m bench.run [NAME ...] [--quick] [--device cpu|cuda] [--precision P] [--shape S] ...``.

Each benchmark writes ``<out>/<name>[_<settings>].json`` (atomically; ``result_name``) and prints its
table in Markdown, headed by the machine it ran on: each ratio as ``median [lo, hi] (n=k)`` over k
fresh processes (``bench.timing``), each rate as ``median (min to max)``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
import transformers
from threadpoolctl import threadpool_limits

from bench import finetune, fusion, inference, ntk, overhead, scale
from bench.common import FULL, PRECISIONS, QUICK, BenchResult, Options, Sizes, default_precision, machine
from bench.timing import StageError
from src.utils.io import write_json

BENCHMARKS: dict[str, Callable[[Sizes, Options], BenchResult]] = {
    "fusion": fusion.run,
    "ntk": ntk.run,
    "finetune": finetune.run,
    "overhead": overhead.run,
    "inference": inference.run,
    "scale": scale.run,
}
# full size needs a GPU (an 8B-parameter model): on the CPU only with --quick, and not among the default names there
GPU_ONLY = ("scale",)
RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny models and few repetitions (CI smoke run, about a minute)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--precision", choices=PRECISIONS, help="of the training and inference steps (default: as trainer=auto, "
                   "bf16-mixed on cuda, 32-true on cpu); compression and the NTK metrics are fp32 regardless")
    p.add_argument("--shape", default="default", choices=("default", *FULL.shapes),
                   help="finetune's model: default = MiniLM on real sentences; roberta_base, llama_1b = random models of those "
                        "shapes on random token ids, sized for a GPU (toy sizes with --quick)")
    p.add_argument("--checkpointing", action="store_true", help="finetune: activation checkpointing of every block")
    p.add_argument("--models", nargs="+", help="inference: only these of its models (default: all, e.g. minilm smollm2)")
    p.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks to run, of {', '.join(BENCHMARKS)} (default: all; "
                   f"on the CPU without --quick all but {', '.join(GPU_ONLY)})")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder of the JSON results (default: bench/results)")
    p.add_argument("--threads", type=int, help="CPU threads of torch, ONNX Runtime, llama.cpp, scikit-learn and faiss alike (default: "
                   "all cores; 1 with --quick, where a second thread on tiny ops only adds contention)")
    p.add_argument("--processes", type=int, help=f"fresh processes per comparison, each ratio's n (default: {FULL.processes}; "
                   f"{QUICK.processes} with --quick)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen benchmarks in order; print each table and write its JSON."""
    args = parse_args(argv)
    names, refusal = choose(args)
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    device, sizes = torch.device(args.device), QUICK if args.quick else FULL
    if args.models:
        known = [m for m, _, _ in sizes.inference]
        if set(args.models) - set(known):
            print(f"--models {' '.join(args.models)}: the inference benchmark's models are {', '.join(known)}", file=sys.stderr)
            return 2
        sizes = replace(sizes, inference=tuple(c for c in sizes.inference if c[0] in args.models))
    threads = args.threads or (1 if args.quick else torch.get_num_threads())
    opts = Options(device, args.precision or default_precision(device), args.shape, args.checkpointing, threads,
                   args.processes or sizes.processes)
    with _quiet(), _threads(threads):
        for name in names:
            start = time.perf_counter()
            try:
                result = BENCHMARKS[name](sizes, opts)
            except StageError as err:  # a timed child process failed: its stage and stderr, not this process's traceback
                print(f"bench {name}: {err}", file=sys.stderr)
                return 1
            record = {"mode": sizes.name, "command": _command(argv), "machine": machine(device, threads),
                      "wall_s": time.perf_counter() - start, **asdict(result)}
            write_json(args.out / f"{result_name(name, opts)}.json", record)
            print(format_record(record), flush=True)
    return 0


def choose(args: argparse.Namespace) -> tuple[list[str], str | None]:
    """The benchmarks to run (those named, else all that can run here), and why the command cannot run, if it cannot."""
    on_cpu_full = args.device == "cpu" and not args.quick
    names = args.names or [n for n in BENCHMARKS if not (on_cpu_full and n in GPU_ONLY)]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        return names, f"unknown benchmark {', '.join(unknown)}: choose from {', '.join(BENCHMARKS)}"
    if args.device == "cuda" and not torch.cuda.is_available():
        return names, "--device cuda: no CUDA device is available here"
    if on_cpu_full and any(n in GPU_ONLY for n in names):
        return names, f"{', '.join(n for n in names if n in GPU_ONLY)} at full size needs --device cuda (or --quick on the CPU)"
    if args.processes is not None and args.processes < 1:
        return names, f"--processes {args.processes}: at least one process"
    if "finetune" not in names and (args.shape != "default" or args.checkpointing):
        return names, "--shape and --checkpointing choose finetune's model: name finetune among the benchmarks"
    return names, None


def result_name(name: str, opts: Options) -> str:
    """A benchmark's results file (without .json): its name, then each setting that differs from a CPU
    run's defaults (finetune's shape and checkpointing, the device, the precision), so that no run
    overwrites another's: finetune_roberta_base_cuda, overhead_bf16-mixed, fusion."""
    settings = [
        (opts.shape, name == "finetune" and opts.shape != "default"),
        ("checkpointing", name == "finetune" and opts.checkpointing),
        (opts.device.type, opts.device.type != "cpu"),
        (opts.precision, opts.precision != default_precision(opts.device)),
    ]
    return "_".join([name, *(label for label, differs in settings if differs)])


@contextmanager
def _threads(n: int) -> Iterator[None]:
    """Every library on ``n`` threads (torch's intra-op pool, OpenMP and BLAS pools); restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with threadpool_limits(limits=n):
            yield
    finally:
        torch.set_num_threads(before)


def format_record(record: dict[str, Any]) -> str:
    """A benchmark's record as Markdown: title, command and machine, how its ratios were measured, table, targets, notes."""
    lines = [
        f"### {record['title']}",
        "",
        f"`{record['command']}` ({record['mode']} mode), {record['wall_s']:.0f} s; {machine_line(record['machine'])}.",
        "",
    ]
    if t := record.get("timing"):
        lines += [f"Ratios: median [95 % interval] (n = processes) over {t['processes']} fresh processes per comparison, "
                  f"threads {t['threads']} in each; rates: median (min to max) over the processes.", ""]
    lines += [
        "| " + " | ".join(header for _, header in record["columns"]) + " |",
        "|" + "---|" * len(record["columns"]),
    ]
    lines += ["| " + " | ".join(_fmt(row.get(key)) for key, _ in record["columns"]) + " |" for row in record["rows"]]
    lines.append("")
    for t in record["targets"]:
        lines.append(f"- {'met' if t['met'] else 'MISSED'}: {t['what']} = {_fmt(t['value'])} (target {t['goal']})")
    if record["mode"] == "quick":
        lines.append("- quick mode: tiny sizes; the targets are only meaningful in full mode")
    lines += ["", *[f"> {note}" for note in record["notes"]], ""]
    return "\n".join(lines)


def machine_line(m: dict[str, Any]) -> str:
    """The machine record in one line: CPU, vector extensions, cores and CPUs, threads, GPU, library versions, load."""
    cores = f"{m['cores']} cores, " if m.get("cores") else ""
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"
    versions = ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items() if v)
    return (f"{m['cpu']} ({', '.join(m.get('vector') or ['no vector extensions named'])}), {cores}{m['cpus']} CPUs, "
            f"threads {m.get('threads', m['torch_threads'])} on {m['device']}{gpu}; {versions or 'torch ' + m['torch']}; "
            f"load average {m['load_avg_1m']} at the end")


def _fmt(value: Any) -> str:
    """A table cell: a ratio over processes as ``median [lo, hi] (n=k)``, a rate as ``median (min to max)``, a number to 4
    significant digits (whole from 1,000)."""
    if isinstance(value, dict) and "interval" in value:
        ci = value["interval"]
        return f"{_fmt(value['median'])} [{_fmt(ci[0])}, {_fmt(ci[1])}] (n={value['n']})" if ci else f"{_fmt(value['median'])} (n={value['n']})"
    if isinstance(value, dict) and "min" in value:
        return f"{_fmt(value['median'])} ({_fmt(value['min'])} to {_fmt(value['max'])})"
    if isinstance(value, float):
        small_or_large = value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e5)
        return f"{value:.2e}" if small_or_large else f"{value:.0f}" if abs(value) >= 1e3 else f"{value:.4g}"
    return "" if value is None else str(value)


def _command(argv: Sequence[str] | None) -> str:
    return "python -m bench.run " + " ".join(sys.argv[1:] if argv is None else argv)


@contextmanager
def _quiet() -> Iterator[None]:
    """Keep library chatter (weight-loading reports, Lightning's device banner) out of the tables; restored after."""
    verbosity, bars = transformers.logging.get_verbosity(), transformers.utils.logging.is_progress_bar_enabled()
    loggers = {name: logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", "src")}
    levels = {name: logger.level for name, logger in loggers.items()}
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for logger in loggers.values():
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()
        for name, logger in loggers.items():
            logger.setLevel(levels[name])


if __name__ == "__main__":
    sys.exit(main())
