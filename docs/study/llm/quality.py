"""The size-quality curve of SmolLM2 (docs/study/llm/quality.md): every calibrated method, with each correction,
at three sizes and two layouts, scored without training on rt_review (in domain) and Hamlet (out of domain).

    python docs/study/llm/quality.py                          # every setting not yet in the results file
    python docs/study/llm/quality.py --only 'flap/*' '*/s1'   # settings whose name matches these patterns
    python docs/study/llm/quality.py --list                   # the plan

One process loads SmolLM2 once; each setting compresses a fresh copy exactly as ``python -m src.train``
would at setup (the fusion callback with the setting's ``ffn_mode`` overrides, its approximation metrics
off, no fusion cache so that the time is the method's), then measures:

- ``val_ppl``: perplexity of the target tokens of the first 16 rt_review validation sources (all their
  references), as ``val/ppl`` of a training run with ``task.max_eval_samples=16``;
- ``hamlet_ppl``: lm-evaluation-harness word perplexity of Hamlet's first two scenes in 128-token windows
  (``eval/hamlet_128/word_perplexity``);
- ``compress_s`` and ``compress_peak_mb``: the compression's wall time and its peak resident memory above
  what the process held before it (sampled every 10 ms);
- the parameters after compression and each layer's width.

Each result is appended to the JSONL file as soon as it is measured (a setting already there is skipped),
with the overrides that made it. ``--flap-official <results of flap_official.py>`` is only read by the table.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import fnmatch
import gc
import json
import logging
import math
import threading
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

import src.utils.config  # noqa: F401  (registers the config resolvers)
from src.builders import build_data_and_module, compression_settings
from src.callbacks.fusion import FusionCallback
from src.evaluation import lm_eval
from src.models.source import model_identity
from src.pipeline.fuse import count_params
from src.preflight import preflight

CONF = str(Path(__file__).resolve().parents[3] / "conf")
HERE = Path(__file__).resolve().parent
BASE = ["model=smollm2", "task=rt_review", "trainer=cpu", "task.max_eval_samples=16", "approx_metrics.enabled=false", "seed=0"]
# every compressed setting, where its own overrides leave them: fixed seeds, and the calibration and ridge of the
# study's protocol whatever the model's defaults are (SmolLM2's were chosen from this study)
FIXED = ["ffn_mode.cache=false", "ffn_mode.seed=0", "ffn_mode.calib.seed=0", "ffn_mode.calib.source=task", "ffn_mode.refit_ridge=0.001",
         "ffn_mode.refit_toward=zero"]
# neurons removed from SmolLM2's 30 x 1536 MLP neurons: 7,680 (the defaults' size), twice and three times that;
# uniform: layers 10-29 (the top two thirds, the defaults' layout) at one width; budget: all 30 layers, FLAP's allocation
SIZES = {"s1": (1152, 5 / 6), "s2": (768, 2 / 3), "s3": (384, 1 / 2)}
METHODS = ("wanda_sp", "flap", "ntk_keep", "act_fusion")
REFITS = ("none", "bias", "lstsq")


def layout(size: str, kind: str) -> list[str]:
    width, budget = SIZES[size]
    if kind == "uniform":
        return [f"ffn_mode.layers=[{','.join(map(str, range(10, 30)))}]", f"ffn_mode.mid_dim={width}"]
    return [f"ffn_mode.layers=[{','.join(map(str, range(30)))}]", f"ffn_mode.budget={budget!r}", "ffn_mode.allocation=flap"]


def plan() -> dict[str, list[str]]:
    """Setting name -> its overrides, in the order they run. At the defaults' size and layout every method with
    every correction, then the calibration variants; at the other sizes and in the budget layout the
    corrections that can be a method's best there (the least-squares refit was no method's best at the
    defaults' size: it raises Hamlet's perplexity by a quarter or more; it stays for wanda_sp, the defaults'
    method before this study); the budget layout last, the first to be cut where time runs out."""
    def setting(method: str, refit: str, kind: str, size: str, *extra: str) -> list[str]:
        return [f"ffn_mode={method}", f"ffn_mode.refit={refit}", *layout(size, kind), *extra]

    out = {"none": ["ffn_mode=none"]}
    for method in METHODS:
        for refit in REFITS:
            out[f"{method}/{refit}/uniform/s1"] = setting(method, refit, "uniform", "s1")
    # held-out ridge; general text beside the task's (calib.source=mixed)
    out["wanda_sp/lstsq-auto/uniform/s1"] = setting("wanda_sp", "lstsq", "uniform", "s1", "ffn_mode.refit_ridge=auto")
    for method, refit in (("wanda_sp", "bias"), ("wanda_sp", "lstsq"), ("flap", "bias"), ("act_fusion", "bias")):
        out[f"{method}/{refit}-mixed/uniform/s1"] = setting(method, refit, "uniform", "s1", "ffn_mode.calib.source=mixed")
    # the held-out ridge on the mixed text, and shrunk toward the pruned weights instead of toward zero
    auto = ("ffn_mode.refit_ridge=auto", "ffn_mode.calib.source=mixed")
    out["wanda_sp/lstsq-auto-mixed/uniform/s1"] = setting("wanda_sp", "lstsq", "uniform", "s1", *auto)
    out["wanda_sp/lstsq-auto-toward-mixed/uniform/s1"] = setting("wanda_sp", "lstsq", "uniform", "s1", *auto, "ffn_mode.refit_toward=compressed")
    # the other sizes: bias compensation (every method's best correction at s1 but wanda_sp's) first, then the rest
    for refits, grid in ((("bias",), [("uniform", "s2"), ("uniform", "s3"), ("budget", "s2")]),
                         (("none", "lstsq"), [("uniform", "s2"), ("uniform", "s3")]), (("bias",), [("budget", "s1"), ("budget", "s3")])):
        for kind, size in grid:
            for method in METHODS:
                for refit in refits:
                    if refit == "lstsq" and method != "wanda_sp" or refit == "none" and method == "ntk_keep":
                        continue  # never a method's best at s1 (lstsq kept for the previous defaults' wanda_sp)
                    out[f"{method}/{refit}/{kind}/{size}"] = setting(method, refit, kind, size)
        if refits == ("bias",) and ("budget", "s2") in grid:  # the best refit at s1: the defaults at every size, and on act_fusion
            for method, size in (("wanda_sp", "s2"), ("wanda_sp", "s3"), ("act_fusion", "s1"), ("act_fusion", "s2"), ("act_fusion", "s3")):
                out[f"{method}/lstsq-auto-toward-mixed/uniform/{size}"] = setting(method, "lstsq", "uniform", size, *auto,
                                                                                   "ffn_mode.refit_toward=compressed")
    return out


def config(overrides: list[str]):
    """The study's config: ``BASE`` and, where it compresses, ``FIXED`` (each where ``overrides`` do not set its key), the overrides."""
    keys = {o.split("=")[0] for o in overrides}
    base = [o for o in BASE if o.split("=")[0] not in keys]
    fixed = [] if "ffn_mode=none" in overrides else [o for o in FIXED if o.split("=")[0] not in keys]
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        cfg = compose("train", overrides=[*base, *overrides, *fixed], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)  # resolves ${hydra:runtime.cwd} in paths
    GlobalHydra.instance().clear()
    with open_dict(cfg):
        cfg.paths.output_dir = "/tmp/quality-study"
        del cfg.hydra
    return cfg


class PeakRSS:
    """The process's peak resident memory (MB) above its level at entry, sampled every 10 ms. glibc keeps freed
    memory mapped (an earlier setting's buffers would then be reused without raising the RSS): ``malloc_trim``
    hands it back first, so that the level at entry is what the process holds."""

    def __enter__(self) -> PeakRSS:
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return math.nan

    def _watch(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def mb(self) -> float:
        return self.peak - self.base


@torch.no_grad()
def val_ppl(module, datamodule) -> float:
    """Perplexity of the target tokens of the validation loader (every reference of every source)."""
    module.eval()
    total, n = 0.0, 0
    size = module.hparams.task["eval_batch_size"]
    for batch in datamodule.val_dataloader()[0]:
        for start in range(0, batch["input_ids"].shape[0], size):
            rows = slice(start, start + size)
            width = int(batch["attention_mask"][rows].sum(1).max())
            nll = module.token_nll({k: batch[k][rows, :width] for k in ("input_ids", "attention_mask", "labels")})
            total, n = total + nll.double().sum().item(), n + len(nll)
    return math.exp(total / n)


def evaluate(module, datamodule) -> dict[str, float]:
    hamlet = lm_eval(module.model, datamodule.tokenizer, ["hamlet"], [128], {"hamlet": 2})
    return {"val_ppl": val_ppl(module, datamodule), "hamlet_ppl": hamlet["eval/hamlet_128/word_perplexity"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(HERE / "quality" / "results.jsonl"))
    parser.add_argument("--only", nargs="*", default=None, help="glob patterns of setting names, e.g. '*/uniform/s1'")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args()
    settings = {k: v for k, v in plan().items() if not args.only or any(fnmatch.fnmatch(k, p) for p in args.only)}
    if args.list:
        for k, v in settings.items():
            print(k, " ".join(v))  # noqa: T201  (a script's output)
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {json.loads(line)["setting"] for line in out.read_text().splitlines()} if out.exists() else set()
    todo = {k: v for k, v in settings.items() if k not in done}
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.manual_seed(0)
    cfg = config(["ffn_mode=none"])
    _, splits, _ = preflight(cfg)
    datamodule, original = build_data_and_module(cfg, splits)
    datamodule.setup()
    for name, overrides in todo.items():
        try:
            row = measure(name, overrides, original, datamodule)
        except Exception as e:  # one setting's failure is a finding; the others still run
            logging.exception("%s failed", name)
            row = {"setting": name, "overrides": overrides, "error": f"{type(e).__name__}: {e}"}
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")


def measure(name: str, overrides: list[str], original, datamodule) -> dict:
    """Compress a copy of ``original`` with the setting's overrides and evaluate it."""
    cfg = config(overrides)
    preflight(cfg)
    module = copy.deepcopy(original)
    row = {"setting": name, "overrides": overrides, "params_before": count_params(module.model)}
    compression = compression_settings(cfg)
    if compression is not None:
        callback = FusionCallback(compression, {"enabled": False}, model_identity(cfg.model))
        start = time.perf_counter()
        with PeakRSS() as rss:
            report = callback.compress_and_measure(module.model, "cpu", datamodule=datamodule, probe_fns={})
        row.update(compress_s=time.perf_counter() - start, compress_peak_mb=rss.mb,
                   widths={str(k): int(v["width"]) for k, v in report.layer_stats.items()},
                   calib_err={str(k): v.get("calib_err") for k, v in report.layer_stats.items()})
    row["params_after"] = count_params(module.model)
    row.update(evaluate(module, datamodule))
    logging.info("%s: %s", name, {k: row[k] for k in ("val_ppl", "hamlet_ppl", "params_after")})
    return row


if __name__ == "__main__":
    main()
