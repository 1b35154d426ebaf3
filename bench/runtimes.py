"""The inference benchmark's timed stages: one runtime per child process (``bench.timing``, ``bench.worker``).

Each stage loads the original and the compressed model from the files ``bench.inference`` wrote, in the
order it is given, and times them call by call (``paired_calls``). Each imports its runtime inside the
function, so that a process loads that runtime only: an ONNX Runtime or llama.cpp process holds no
PyTorch thread pool, and no process holds two runtimes' pools.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack, closing
from typing import Any

import numpy as np

from bench.worker import paired_calls

# llama.cpp's own counters of each stage (llama_perf_context): prompt batches, single-token decodes
PERF = {"pp": ("t_p_eval_ms", "n_p_eval"), "tg": ("t_eval_ms", "n_eval")}


def load_inputs(path: str) -> dict[str, np.ndarray]:
    """A case's model inputs (an ``.npz`` of arrays named as the ONNX graph's inputs)."""
    with np.load(path) as arrays:
        return {name: arrays[name] for name in arrays.files}


def pytorch(order: list[str], process: int, folders: dict[str, str], head: str, cases: list[dict[str, Any]], reps: int,
            warmup: int, device: str, precision: str) -> dict[str, Any]:
    """Both Hugging Face folders (``src.export.exported.load_exported``) timed case by case, eager under
    ``torch.inference_mode`` and the precision's autocast; ``forwards`` forwards per call."""
    import torch

    from bench.common import autocast, sync
    from src.export.exported import load_exported
    from src.models.build import HEADS

    dev = torch.device(device)
    models = {k: load_exported(folders[k], HEADS[head]).to(dev).eval() for k in order}
    extra = {"use_cache": False} if head == "generation" else {}  # the ONNX graph's forward: no KV cache
    times = {}
    with torch.inference_mode(), autocast(dev, precision):
        for case in cases:
            batch = {name: torch.from_numpy(array).to(dev) for name, array in load_inputs(case["inputs"]).items()}

            def call(model: torch.nn.Module, forwards: int = case["forwards"], batch: dict = batch) -> Callable[[int], None]:
                def run(i: int) -> None:
                    for _ in range(forwards):
                        model(**batch, **extra)
                return run

            times[case["key"]] = paired_calls({k: call(models[k]) for k in order}, order, reps, warmup, sync=lambda: sync(dev))
    return {"times": times, "threads": torch.get_num_threads()}


def onnxruntime(order: list[str], process: int, files: dict[str, str], cases: list[dict[str, Any]], reps: int, warmup: int,
                threads: int) -> dict[str, Any]:
    """Both ONNX graphs timed case by case in ONNX Runtime's CPUExecutionProvider on ``threads`` intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only
    sessions = {k: ort.InferenceSession(files[k], options, providers=["CPUExecutionProvider"]) for k in order}
    times = {}
    for case in cases:
        feeds = load_inputs(case["inputs"])

        def call(session: ort.InferenceSession, forwards: int = case["forwards"], feeds: dict = feeds) -> Callable[[int], None]:
            def run(i: int) -> None:
                for _ in range(forwards):
                    session.run(["logits"], feeds)
            return run

        times[case["key"]] = paired_calls({k: call(sessions[k]) for k in order}, order, reps, warmup)
    return {"times": times, "threads": threads}


def llama_cpp(order: list[str], process: int, files: dict[str, str], prompt: list[int], first: int, tg_tokens: int,
              params: dict[str, Any], reps: int, warmup: int) -> dict[str, Any]:
    """Both GGUF files in llama.cpp (llama-cpp-python): pp, one ``llm.eval`` of ``prompt`` from an empty KV cache, and tg,
    ``tg_tokens`` greedy single-token decodes from ``first``; the four sides in one round per call. Returns the times and
    llama.cpp's own counters of every timed call (``llama_perf``), each keyed by stage, then model."""
    import llama_cpp

    def side(llm: Any, stage: str, perf: list[dict[str, float]]) -> Callable[[int], None]:
        def call(i: int) -> None:
            llm.reset()  # an empty KV cache: every call processes the same tokens
            llama_cpp.llama_perf_context_reset(llm.ctx)
            if stage == "pp":
                llm.eval(prompt)
                llama_cpp.llama_synchronize(llm.ctx)  # the prompt's logits computed (llama.cpp counts its time here)
            else:
                token = first
                for _ in range(tg_tokens):
                    llm.eval([token])
                    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
                    token = int(logits.argmax())
            data = llama_cpp.llama_perf_context(llm.ctx)
            perf.append({name: getattr(data, name) for name in PERF[stage]})
        return call

    sides = [(stage, k) for stage in PERF for k in order]
    perf: dict[tuple[str, str], list[dict[str, float]]] = {s: [] for s in sides}
    with ExitStack() as stack:  # closed here: left to the garbage collector, they print an exception at interpreter exit
        llms = {k: stack.enter_context(closing(llama_cpp.Llama(files[k], **params))) for k in order}
        calls = {f"{stage}/{k}": side(llms[k], stage, perf[stage, k]) for stage, k in sides}
        times = paired_calls(calls, [f"{stage}/{k}" for stage, k in sides], reps, warmup)
    return {"times": {stage: {k: times[f"{stage}/{k}"] for k in order} for stage in PERF},
            "llama_perf": {stage: {k: perf[stage, k][warmup:] for k in order} for stage in PERF},
            "version": llama_cpp.__version__}


def llama_cpp_beside(order: list[str], process: int, beside: list[str], folders: dict[str, str], onnx_files: dict[str, str],
                     inputs: str, threads: int, **llama: Any) -> dict[str, Any]:
    """``llama_cpp`` in a process that first ran the same models in the runtimes ``beside`` (``pytorch``, ``onnxruntime``)
    and keeps them loaded, as one process running every stage would (``bench.beside``). Also returns what the process
    looks like when llama.cpp starts: the CPUs it may run on (``sched_getaffinity``), its threads and resident memory."""
    import os

    kept: list[Any] = []
    feeds = load_inputs(inputs)
    if "pytorch" in beside:
        import torch

        from src.export.exported import load_exported
        from src.models.build import HEADS

        torch.set_num_threads(threads)
        with torch.inference_mode():
            for k in order:
                model = load_exported(folders[k], HEADS["generation"]).eval()
                for _ in range(3):
                    model(**{n: torch.from_numpy(a) for n, a in feeds.items()}, use_cache=False)
                kept.append(model)
    if "onnxruntime" in beside:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        for k in order:
            session = ort.InferenceSession(onnx_files[k], options, providers=["CPUExecutionProvider"])
            for _ in range(3):
                session.run(["logits"], feeds)
            kept.append(session)
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
    state = {"affinity": sorted(os.sched_getaffinity(0)), "threads": int(status["Threads"]), "rss_mb": int(status["VmRSS"].split()[0]) / 1024}
    return {**llama_cpp(order, process, **llama), "beside": beside, "state": state}
