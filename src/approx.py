"""Compare every compression method's approximation over seeds, without training: ``python -m src.approx``.

For each method in ``methods`` (default: every option of the ``ffn_mode`` config group) it composes
the training config with ``ffn_mode=<method>`` plus the command line's overrides, so that layers,
mid_dim and options are shared, and builds the fusion callback a training run would build. For
each seed in ``seeds`` (default: the run's ``seed``), which sets the task head's initialisation,
the probe sample and the methods' randomness, it compresses a copy of the original model with
every method and measures it on the same probe set; ``none`` goes through the same measurement
with the uncompressed model (its errors are 0). Writes into the run folder:

- ``approx.json``: every (method, seed) measurement, each metric's mean, std and 95 % t interval
  over seeds per method (and per layer), and the paired difference of each method from
  ``reference`` (``ntk_cluster``), seed by seed, and each method's variant options (``variants``, as
  ``src.train`` records them in ``results.json``);
- ``approx.md``: those tables (n = 1 prints no interval);
- ``approx.png``: the headline errors per method, with 95 % interval error bars.

Everything runs on ``device`` (``auto``: a CUDA GPU where one is visible, else the CPU).
``approx.json`` is rewritten after every measurement, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import numpy as np
import torch
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from src.builders import build_data_and_module, build_module, fusion_callback
from src.metrics.approximation import approximation_metrics, measure_reference
from src.pipeline.fuse import count_params
from src.preflight import compression_settings, preflight
from src.utils.config import ffn_modes, refusing, run_app
from src.utils.errors import ConfigError
from src.utils.hardware import to_device
from src.utils.io import write_json, write_text
from src.utils.summary import Estimate, estimate, figure, fmt_difference, fmt_estimate, markdown_table, paired

log = logging.getLogger(__name__)

# (metric key without "fusion/", column header): the summary table, headline first
COLUMNS = [
    ("hidden_rel_err", "final hidden err"), ("output_rel_err", "MLP output err (mean)"), ("ntk_sign_rel_err", "NTK sign err"),
    ("ntk_std_rel_err", "NTK std err"), ("ntk_probe_sign_rel_err", "probe-layer NTK sign err"), ("logits_rel_err", "logits err (random head)"),
    ("params_after", "params"), ("compress_seconds", "compress s"),
]
LAYER_COLUMNS = [("width", "width"), ("output_rel_err", "MLP output err (probe)"), ("calib_err", "MLP output err (calibration)"),
                 ("ntk_sign_rel_err", "NTK sign err"), ("ntk_std_rel_err", "NTK std err")]
PAIRED = ["hidden_rel_err", "output_rel_err", "ntk_sign_rel_err", "ntk_probe_sign_rel_err"]
CHART = [("hidden_rel_err", "final hidden states"), ("output_rel_err", "MLP output"), ("ntk_sign_rel_err", "NTK sign (Adam)"),
         ("ntk_std_rel_err", "NTK std (SGD)")]


def method_configs(cfg: DictConfig) -> dict[str, DictConfig]:
    """The full run config of each method, composed with the command line's overrides."""
    user = [o for o in HydraConfig.get().overrides.task if not o.startswith(("methods=", "ffn_mode=", "seeds="))]
    known = ffn_modes()
    # the uncompressed model first, then the reference, then the rest
    methods = sorted(known, key=lambda m: (m != "none", m != cfg.reference)) if cfg.methods is None else list(cfg.methods)
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ConfigError(f"methods={methods} has unknown method(s) {unknown}; allowed: {known}.")
    if set(methods) <= {"none"}:
        raise ConfigError(f"methods={methods} compresses nothing: add a method to compare with, e.g. methods=[none,ntk_cluster].")
    out = {}
    for m in methods:
        # none has no compression options: it is measured at the other methods' layers
        over = [o for o in user if not (m == "none" and o.lstrip("+~").startswith("ffn_mode."))]
        mc = compose("approx", overrides=[*over, f"ffn_mode={m}"])
        mc.paths = cfg.paths  # the hydra: resolvers only resolve in the running app's config
        out[m] = mc
    return out


def _with_seed(mc: DictConfig, seed: int) -> DictConfig:
    """A copy of a method's config for one seed (``ffn_mode.seed`` and the probe seed follow ``seed``)."""
    out = copy.deepcopy(mc)
    with open_dict(out):
        out.seed = seed
    return out


def _seeds(cfg: DictConfig) -> list[int]:
    seeds = [cfg.seed] if cfg.get("seeds") is None else list(cfg.seeds)
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds={seeds} must be a list of distinct non-negative integers, e.g. seeds=[0,1,2].")
    return seeds


def _flat(metrics: dict[str, float]) -> dict[str, float]:
    return {k.removeprefix("fusion/"): float(v) for k, v in metrics.items()}


def summarize(runs: list[dict[str, Any]], reference: str) -> tuple[dict[str, dict[str, Estimate]], dict[str, dict[str, Estimate]]]:
    """Per method, each metric's estimate over seeds; and each method's paired difference from ``reference``."""
    by_method: dict[str, dict[int, dict[str, float]]] = {}
    for r in runs:
        by_method.setdefault(r["method"], {})[r["seed"]] = r["metrics"]
    summary = {m: {k: estimate([s[k] for s in seeds.values() if k in s]) for k in sorted({k for s in seeds.values() for k in s})}
               for m, seeds in by_method.items()}
    ref = by_method.get(reference, {})
    diffs = {m: {k: paired({s: v[k] for s, v in seeds.items() if k in v}, {s: v[k] for s, v in ref.items() if k in v})
                 for k in summary[m] if k in summary.get(reference, {})}
             for m, seeds in by_method.items() if m not in (reference, "none") and ref}
    return summary, diffs


def to_markdown(meta: dict[str, Any], summary: dict[str, dict[str, Estimate]], diffs: dict[str, dict[str, Estimate]], reference: str) -> str:
    n = len(meta["seeds"])
    stat = "mean over seeds ± std [95 % t interval]" if n > 1 else "one seed (n = 1): no interval"
    width = f"budget {meta['budget']} of the MLP parameters" if meta["budget"] is not None else f"mid_dim {meta['mid_dim']}"
    calib = f", calibration {meta['calib_size']} training inputs ({'sequential' if meta['calib_sequential'] else 'original inputs'})"
    text = [f"# {meta['model']} on {meta['task']}: layers {meta['layers']}, {width}, refit {meta['refit']}{calib}", "",
            f"n = {n} seed(s) {meta['seeds']} (each sets the task head's initialisation, the probe sample of {meta['probe_size']} "
            f"validation inputs and the methods' randomness); cells: {stat}. Final hidden err: relative error of the last "
            "layer's output at every non-padding probe token (the headline); MLP output err: each compressed MLP on the "
            "original's hidden states of the probe set (validation) and, where the method read calibration data, of the "
            "calibration tokens (training split); NTK errors: relative Frobenius error of the sign (Adam) and standard kernels over the "
            "compressed layers' MLP parameters; probe-layer: θ = the first uncompressed layer's MLP.", ""]
    rows = [[m, str(est.get("hidden_rel_err", estimate([])).n)] + [fmt_estimate(est.get(k, estimate([]))) for k, _ in COLUMNS]
            for m, est in summary.items()]
    text.append(markdown_table(["method", "n", *(h for _, h in COLUMNS)], rows))
    layer_rows = [[m, str(layer)] + [fmt_estimate(est.get(f"{k}/layer_{layer}", estimate([]))) for k, _ in LAYER_COLUMNS]
                  for m, est in summary.items() if m != "none" for layer in meta["layers"]]
    text += ["## Per layer", "", markdown_table(["method", "layer", *(h for _, h in LAYER_COLUMNS)], layer_rows)]
    if diffs:
        text += [f"## Paired differences from {reference}", "",
                 f"Per seed, method minus {reference} (same head, probe set and seed), mean [95 % t interval]; **bold** where "
                 "the interval excludes 0, i.e. where the data separate the two methods. Negative = lower error than "
                 f"{reference}.", ""]
        drows = [[m] + [fmt_difference(d.get(k, estimate([]))) for k in PAIRED] for m, d in diffs.items()]
        text.append(markdown_table(["method", *(h for k, h in COLUMNS if k in PAIRED)], drows))
    return "\n".join(text)


def chart(summary: dict[str, dict[str, Estimate]], path: Path, title: str) -> None:
    """Grouped bars (log scale) of the headline errors per method, with 95 % interval error bars."""
    methods = [m for m in summary if m != "none"]
    x = np.arange(len(methods))
    width = 0.8 / len(CHART)
    with figure(path, (9, 4)) as (_, ax):
        for j, (k, label) in enumerate(CHART):
            est = [summary[m].get(k, estimate([])) for m in methods]
            mean = np.array([max(e.mean, 1e-8) for e in est])
            err = np.array([[0 if e.n < 2 else min(e.mean - e.low, e.mean - 1e-8) for e in est], [0 if e.n < 2 else e.high - e.mean for e in est]])
            ax.bar(x + (j - (len(CHART) - 1) / 2) * width, mean, width, yerr=err, capsize=2, label=label)
        ax.set_xticks(x, methods)
        ax.set_yscale("log")
        low = min((summary[m][k].mean for m in methods for k, _ in CHART if summary[m].get(k) and summary[m][k].mean > 0), default=1e-3)
        ax.set_ylim(bottom=low / 3)  # an interval reaching below 0 would otherwise stretch the log axis to 1e-8
        ax.set_ylabel("relative error")
        ax.set_title(title)
        ax.legend(fontsize=8)


def approx_device(name: str) -> torch.device:
    """``device``: auto (a CUDA GPU where one is visible, else the CPU), cpu, or cuda[:i] (refused without a GPU)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu" or (str(name).startswith("cuda") and torch.cuda.is_available()):
        return torch.device(name)
    if str(name).startswith("cuda"):
        raise ConfigError(f"device={name} needs a CUDA GPU, and none is visible here: use device=cpu or device=auto.")
    raise ConfigError(f"device={name!r} must be auto, cpu or cuda.")


def approx(cfg: DictConfig) -> dict[str, Any]:
    """Compress with each method for each seed, measure, write the outputs; returns what ``approx.json`` holds."""
    seeds = _seeds(cfg)
    configs = method_configs(cfg)
    checked = {m: preflight(mc) for m, mc in configs.items()}  # every method's options, before any model loads
    device = approx_device(cfg.device)
    name = next(m for m in configs if m != "none")
    first, shared = configs[name], checked[name].compression  # layers, width, refit, budget and calibration: every method's
    layers, reference = list(shared.layers), cfg.reference
    out = Path(cfg.paths.output_dir)
    meta = {"model": cfg.model.name, "task": cfg.task.name, "layers": layers, "mid_dim": shared.mid_dim, "seeds": seeds,
            "probe_size": cfg.approx_metrics.probe_size, "reference": reference, "refit": shared.refit, "budget": shared.budget,
            "calib_size": shared.calib.size, "calib_sequential": shared.calib.sequential,
            "variants": {m: c.compression.variant() for m, c in checked.items() if c.compression}}
    datamodule, _ = build_data_and_module(first, checked[name])
    runs: list[dict[str, Any]] = []
    for seed in seeds:
        L.seed_everything(seed)  # the task head is random: seed it as a training run does, so the probe matches
        seeded = _with_seed(first, seed)
        module = build_module(seeded, checked[name].task)
        original = module.model.to(device).eval()
        batch = to_device(datamodule.probe_batch(cfg.approx_metrics.probe_size, seeded.approx_metrics.probe_seed), device)
        a = cfg.approx_metrics
        ref = measure_reference(original, layers, batch, module.probe_fns, a.chunk_size, a.max_memory_gb)  # once per seed, shared
        for m, mc in configs.items():
            if m == "none":  # the same measurement of the uncompressed model: exactly 0 errors
                metrics, _ = approximation_metrics(original, copy.deepcopy(original), layers, batch, module.probe_fns,
                                                   a.chunk_size, a.max_memory_gb, ref)
                metrics.update({"fusion/params_after": float(count_params(original)), "fusion/compress_seconds": 0.0})
            else:
                at_seed = _with_seed(mc, seed)  # its settings follow the seed, as a run's at that seed would
                # the object a training run compresses with
                callback = fusion_callback(at_seed, compression_settings(at_seed, checked[m].hf))
                callback.compress_and_measure(copy.deepcopy(original), device, datamodule, module.probe_fns, ref)
                metrics = callback.summary_metrics
            runs.append({"method": m, "seed": seed, "metrics": _flat(metrics)})
            log.info("seed %d, %s: final hidden err %.4f, NTK sign err %.4f", seed, m, metrics["fusion/hidden_rel_err"], metrics["fusion/ntk_sign_rel_err"])
            write_json(out / "approx.json", {**meta, "runs": runs, "complete": False})
    summary, diffs = summarize(runs, reference)
    result = {**meta, "runs": runs, "complete": True,
              "summary": {m: {k: e.as_dict() for k, e in est.items()} for m, est in summary.items()},
              "paired": {m: {k: e.as_dict() for k, e in d.items()} for m, d in diffs.items()},
              # the means, one row per method (quick reading and plotting)
              "rows": [{"method": m, **{k: e.mean for k, e in est.items()}, "params": est["params_after"].mean} for m, est in summary.items()]}
    write_json(out / "approx.json", result)
    text = to_markdown(meta, summary, diffs, reference)
    write_text(out / "approx.md", text)
    chart(summary, out / "approx.png", f"{cfg.model.name}, layers {layers}, mid_dim {meta['mid_dim']}, n = {len(seeds)} seed(s)")
    log.info("approximation of each method (written to %s):\n%s", out, text)
    return result


@hydra.main(version_base="1.3", config_path="../conf", config_name="approx")
def main(cfg: DictConfig) -> None:
    refusing(approx, cfg)


if __name__ == "__main__":
    run_app(main)  # a value of the wrong type (seed=abc): one sentence, exit code 2
