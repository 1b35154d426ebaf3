"""One table and three plots for a multirun sweep: ``python -m src.report <multirun folder> [reference=svd]``.

Reads every run folder under the given folder (``results.json`` and ``.hydra/config.yaml``, written
by ``src.train``; never W&B, so it works offline) and writes, into that folder:

- ``report.md`` / ``report.csv``: one row per method (``ffn_mode``, plus its variant options, e.g.
  ``+refit`` or ``+keep=0.25``, and ``+<distill>`` when distilled) and ``mid_dim``, with the task
  metric's mean, std and 95 % Student-t interval over seeds, n, its paired difference from the
  ``reference`` method (``ntk_cluster``) seed by seed with its interval, the approximation errors,
  the parameter count, the time per training step and the peak memory; runs that failed or are
  still running are listed apart, never averaged in;
- ``task_metric_vs_mid_dim.png`` and ``ntk_sign_err_vs_mid_dim.png``: one line per method with
  95 % interval error bars (``ffn_mode=none`` has no width: a horizontal band), and
  ``task_metric_by_method.png``: every row's task metric with its interval.

``--at-step N`` reports the logged metrics (validation, training loss) as they stood after N training steps,
read from each run's ``metrics.csv``, instead of their final values; the other columns stay final.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf

from src.pipeline.settings import VARIANT_OPTIONS
from src.utils.errors import ConfigError
from src.utils.io import write_text
from src.utils.summary import Estimate, estimate, figure, fmt, fmt_difference, fmt_estimate, markdown_table, paired

log = logging.getLogger(__name__)

NTK_SIGN, NTK_STD, OUTPUT_ERR = "fusion/ntk_sign_rel_err", "fusion/ntk_std_rel_err", "fusion/output_rel_err"
HIDDEN_ERR = "fusion/hidden_rel_err"
PARAMS_AFTER, PARAMS_BEFORE = "fusion/params_after", "fusion/params_before"
STEP_TIME, PEAK_MEM = "perf/step_time_s", "perf/peak_mem_mb"
# (report column, run metric): averaged over the seeds of a row
MEANS = {"hidden_rel_err": HIDDEN_ERR, "ntk_sign_rel_err": NTK_SIGN, "ntk_std_rel_err": NTK_STD, "output_rel_err": OUTPUT_ERR,
         "params": PARAMS_AFTER, "step_time_s": STEP_TIME, "peak_mem_mb": PEAK_MEM}
ERROR_BARS = ["ntk_sign_rel_err"]  # columns that also get a 95 % interval, for the plots
KEYS = ["method", "mid_dim"]
REFERENCE = "ntk_cluster"  # the method the others are paired with, unless told
# variant option values whose row label reads better short; any other value reads <option>=<value>
SHORT_LABELS = {("refit", "lstsq"): "refit", ("weighting", "activation"): "act"}


# ---------------------------------------------------------------------------------------------
# gathering


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def variant_suffix(res: dict[str, Any]) -> str:
    """A variant of a method is its own row: ``+<label>`` for each variant option set to anything but
    null or ``none`` (wanda_sp+refit, ntk_cluster+act, ntk_cluster+budget=0.25, ntk_keep+keep=0.25)."""
    values = ((option, res.get(option)) for option in VARIANT_OPTIONS)
    return "".join(f"+{SHORT_LABELS.get((o, v), f'{o}={v}')}" for o, v in values if v not in (None, "none"))


def metrics_at_step(folder: Path, step: int) -> dict[str, float]:
    """The metrics a run logged after ``step`` training steps (``metrics.csv``; Lightning writes them at step
    ``step - 1``, counting from 0), and nan for each one it logs along the way (more than once) but not there, so
    that a final value never stands in for it; {} without a ``metrics.csv``."""
    try:
        rows = pd.read_csv(folder / "metrics.csv")
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError):
        return {}
    rows = rows.drop(columns=["epoch"], errors="ignore")
    along = [c for c in rows.columns if c != "step" and rows[c].notna().sum() > 1]
    at = rows[rows["step"] == step - 1].drop(columns=["step"]).bfill().head(1)
    logged = {k: float(v) for k, v in at.iloc[0].dropna().items()} if len(at) else {}
    return dict.fromkeys(along, math.nan) | logged


def read_run(folder: Path, root: Path, at_step: int | None = None) -> dict[str, Any]:
    """One run folder as a flat record: settings, status and its final metrics (``metric:<key>``), the logged ones
    as they stood after ``at_step`` steps where given (a run that never got there: status ``short``)."""
    cfg_path = folder / ".hydra" / "config.yaml"
    cfg = OmegaConf.to_container(OmegaConf.load(cfg_path), resolve=False) if cfg_path.is_file() else {}
    res = _read_json(folder / "results.json")
    if res is None:  # never got as far as the first results.json write, or it is unreadable
        res = {"status": "unknown", "error": "no readable results.json"}
    if at_step is not None:
        logged = metrics_at_step(folder, at_step)
        res["metrics"] = {**(res.get("metrics") or {}), **logged}
        if all(math.isnan(v) for v in logged.values()) and res.get("status") == "completed":
            res = {**res, "status": "short", "error": f"logged nothing after step {at_step}"}
    ffn = cfg.get("ffn_mode", {})
    ffn_mode = res.get("ffn_mode") or ffn.get("name", "?")
    distill = res.get("distill") or cfg.get("distill", {}).get("name", "none")
    finetune = res.get("finetune") or cfg.get("finetune", {}).get("name", "full")
    mid_dim = res.get("mid_dim", ffn.get("mid_dim"))
    return {
        "run": str(folder.relative_to(root)),
        "status": res.get("status", "unknown"),
        "error": res.get("error"),
        "task": res.get("task") or cfg.get("task", {}).get("name"),
        "model": res.get("model") or cfg.get("model", {}).get("name"),
        "ffn_mode": ffn_mode,
        # results.json records the variant options; runs written before it did are the method's defaults
        "method": ffn_mode + variant_suffix(res) + ("" if distill in (None, "none") else f"+{distill}") + ("" if finetune == "full" else f"+{finetune}"),
        # ffn_mode=none compresses nothing: a width set for it (by an experiment) means nothing
        "mid_dim": None if ffn_mode == "none" or mid_dim is None else int(mid_dim),
        "seed": res.get("seed", cfg.get("seed")),
        "monitor": res.get("monitor") or cfg.get("task", {}).get("monitor"),
        **{f"metric:{k}": v for k, v in (res.get("metrics") or {}).items()},
    }


def gather_runs(folder: str | Path, at_step: int | None = None) -> pd.DataFrame:
    """Every run under ``folder`` (a folder holding ``results.json`` or ``.hydra/config.yaml``), one row each."""
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"{folder}: no such folder; give a multirun folder, e.g. logs/multiruns/<time>_<sweep>.")
    runs = sorted({p.parent for p in root.rglob("results.json")} | {p.parent.parent for p in root.rglob(".hydra/config.yaml")})
    if not runs:
        raise ConfigError(
            f"{folder} holds no runs (no folder under it has a results.json or .hydra/config.yaml); give the "
            "multirun folder of a sweep, e.g. logs/multiruns/<time>_minilm_rt_sweep."
        )
    return pd.DataFrame([read_run(r, root, at_step) for r in runs])


# ---------------------------------------------------------------------------------------------
# the table


def task_metric(runs: pd.DataFrame, at_step: int | None = None) -> str:
    """The run metric to report: the monitor's test counterpart (``val/acc`` -> ``test/acc``), else,
    where test labels are hidden (GLUE), the best validation value, else the last one; the monitor itself
    along the way (``at_step``)."""
    monitor = next((m for m in runs["monitor"].dropna()), None)
    if monitor is None:
        raise ConfigError("the runs name no task.monitor in results.json or .hydra/config.yaml; pass --metric.")
    if at_step is not None:
        return monitor
    head, _, rest = monitor.partition("/")
    candidates = [f"test/{rest}" if head.startswith("val") else monitor, f"best/{monitor}", monitor]
    present = [c for c in candidates if f"metric:{c}" in runs]
    complete = [c for c in present if runs[f"metric:{c}"].notna().all()]
    return (complete or present or candidates)[0]


def _values(g: pd.DataFrame, col: str) -> dict[Any, float]:
    """{seed: value} of a column over a row group's runs (nan dropped)."""
    return {seed: float(v) for seed, v in zip(g["seed"], g[col]) if not pd.isna(v)}


def summarize(done: pd.DataFrame, metric: str, reference: str = REFERENCE) -> pd.DataFrame:
    """One row per (method, mid_dim) of completed runs: the metric's mean, std, 95 % t interval and n over
    seeds, its paired difference from ``reference`` at the same width (seed by seed), and other means."""
    def col(key: str) -> pd.Series:
        return done[f"metric:{key}"] if f"metric:{key}" in done else pd.Series(math.nan, index=done.index)

    frame = done[KEYS + ["seed"]].assign(**{"_metric": col(metric)}, **{name: col(key) for name, key in MEANS.items()})
    # The uncompressed model's size, for ffn_mode=none rows: what the compressed runs started from.
    before = col(PARAMS_BEFORE).dropna()
    frame.loc[done["ffn_mode"] == "none", "params"] = before.iloc[0] if len(before) else math.nan
    groups = {key: g for key, g in frame.groupby(["method", frame["mid_dim"].fillna(-1)], sort=True)}
    ref_widths = {w: g for (m, w), g in groups.items() if m == reference}
    rows = []
    for (method, mid_dim), g in groups.items():
        e = estimate(list(_values(g, "_metric").values()))
        # full fine-tuning has no width: pair it with the reference when that has one width only
        ref = ref_widths.get(mid_dim) if mid_dim != -1 else next(iter(ref_widths.values())) if len(ref_widths) == 1 else None
        d = paired(_values(g, "_metric"), _values(ref, "_metric")) if ref is not None and method != reference else estimate([])
        rows.append({"method": method, "mid_dim": None if mid_dim == -1 else int(mid_dim), "seeds": int(g["seed"].nunique()),
                     f"{metric} mean": e.mean, f"{metric} std": e.std, f"{metric} ci_low": e.low, f"{metric} ci_high": e.high,
                     f"diff vs {reference}": d.mean, f"diff vs {reference} ci_low": d.low, f"diff vs {reference} ci_high": d.high,
                     f"diff vs {reference} n": d.n,
                     **{name: estimate(list(_values(g, name).values())).mean for name in MEANS},
                     **{f"{name} {q}": getattr(estimate(list(_values(g, name).values())), q) for name in ERROR_BARS for q in ("low", "high")}})
    table = pd.DataFrame(rows)
    if table.empty:
        table = pd.DataFrame(columns=["method", "mid_dim", "seeds", f"{metric} mean", f"{metric} std"])
    table["mid_dim"] = table["mid_dim"].astype("Int64")  # integers in the CSV, blank for none
    return table


# ---------------------------------------------------------------------------------------------
# Markdown


def _first_line(error: Any, width: int = 120) -> str:
    return error.strip().splitlines()[0][:width] if isinstance(error, str) and error.strip() else ""


def to_markdown(table: pd.DataFrame, others: pd.DataFrame, metric: str, folder: Path, reference: str = REFERENCE) -> str:
    """The report: the summary table, then the runs left out of it (failed, running, unknown)."""
    diff = f"diff vs {reference}"
    header = ["method", "mid_dim", "n", f"{metric} (mean ± std [95 % CI])", f"{metric} − {reference} (paired, 95 % CI)",
              "final hidden err", "NTK sign err", "NTK std err", "output err", "params", "s/step", "peak MB"]

    def cell(r: Any) -> str:
        return fmt_estimate(Estimate(r[f"{metric} mean"], r[f"{metric} std"], r[f"{metric} ci_low"], r[f"{metric} ci_high"], int(r.seeds)))

    def dcell(r: Any) -> str:
        if r.method == reference:
            return "(reference)"
        return fmt_difference(Estimate(r[diff], math.nan, r[f"{diff} ci_low"], r[f"{diff} ci_high"], int(r[f"{diff} n"])))

    rows = [[r.method, fmt(r.mid_dim if not pd.isna(r.mid_dim) else None), str(r.seeds), cell(r), dcell(r),
             fmt(r.hidden_rel_err), fmt(r.ntk_sign_rel_err), fmt(r.ntk_std_rel_err), fmt(r.output_rel_err), fmt(r.params),
             fmt(r.step_time_s, 3), fmt(r.peak_mem_mb)] for _, r in table.iterrows()]
    text = [f"# Sweep report: {folder.name}", "",
            f"Completed runs; `{metric}` is the task metric: mean ± std over seeds [95 % Student-t interval], n = seeds (no "
            f"interval for n = 1). The paired column is the per-seed difference from `{reference}` at the same mid_dim (full "
            "fine-tuning is paired with the reference when that has one width), mean [95 % interval], **bold** where the "
            "interval excludes 0. Error columns are means over seeds: final hidden err, the relative error of the model's last "
            "hidden states at setup; NTK errors, the relative Frobenius error of the sign (Adam) and standard kernels over the "
            "compressed layers' MLP parameters; output err, the mean relative error of the compressed MLPs' outputs.", "",
            markdown_table(header, rows) if rows else "_No completed runs._\n"]
    if len(others):
        text += ["## Runs not in the table", "",
                 markdown_table(["run", "status", "method", "mid_dim", "seed", "error"],
                                [[r.run, r.status, r.method, fmt(r.mid_dim), fmt(r.seed), _first_line(r.error)]
                                 for r in others.itertuples()])]
    return "\n".join(text)


# ---------------------------------------------------------------------------------------------
# plots


def _yerr(g: pd.DataFrame, mean: str, low: str, high: str) -> list[list[float]]:
    """Asymmetric error bars from interval columns; 0 where there is no interval (n = 1)."""
    return [(g[mean] - g[low]).fillna(0).tolist(), (g[high] - g[mean]).fillna(0).tolist()]


def plot_vs_mid_dim(table: pd.DataFrame, mean: str, low: str, high: str, ylabel: str, path: Path) -> None:
    """``mean`` against mid_dim, one line per method with 95 % interval error bars; width-less rows as bands."""
    widths = sorted({int(w) for w in table["mid_dim"].dropna()})
    with figure(path, (6, 4)) as (_, ax):
        for i, (method, g) in enumerate(table.dropna(subset=[mean]).groupby("method", sort=True)):
            color = f"C{i % 10}"
            if g["mid_dim"].isna().all():  # e.g. full fine-tuning: the same at every width
                y, lo, hi = (float(g[c].iloc[0]) for c in (mean, low, high))
                ax.axhline(y, linestyle="--", color=color, label=method)
                if not math.isnan(lo):
                    ax.axhspan(lo, hi, color=color, alpha=0.15)
                continue
            g = g.dropna(subset=["mid_dim"]).sort_values("mid_dim")
            ax.errorbar(g["mid_dim"].astype(int), g[mean], yerr=_yerr(g, mean, low, high), color=color, marker="o", capsize=3, label=method)
        if widths:
            ax.set_xticks(widths)
        ax.set_xlabel("mid_dim (compressed MLP width)")
        ax.set_ylabel(f"{ylabel} (95 % CI)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no completed runs with this metric", ha="center", va="center", transform=ax.transAxes)
        ax.grid(alpha=0.3)


def plot_by_method(table: pd.DataFrame, metric: str, path: Path) -> None:
    """The task metric of every (method, mid_dim) row as a point with its 95 % interval, best first."""
    rows = table.dropna(subset=[f"{metric} mean"]).sort_values(f"{metric} mean", ascending=False)
    labels = [m if pd.isna(k) else f"{m} k={k}" for m, k in zip(rows["method"], rows["mid_dim"])]
    with figure(path, (7, 0.5 * len(rows) + 1.5)) as (_, ax):
        err = _yerr(rows, f"{metric} mean", f"{metric} ci_low", f"{metric} ci_high")
        ax.errorbar(rows[f"{metric} mean"], range(len(rows)), xerr=err, fmt="o", capsize=4)
        ax.set_yticks(range(len(rows)), labels)
        ax.invert_yaxis()
        ax.set_xlabel(f"{metric}: mean over seeds, 95 % t interval")
        ax.grid(alpha=0.3, axis="x")


# ---------------------------------------------------------------------------------------------
# entry point


def build_report(folder: str | Path, metric: str | None = None, reference: str | None = None,
                 at_step: int | None = None) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """Gather, summarise and write ``report.md``, ``report.csv`` and the three plots into ``folder``
    (``report_step<N>.md`` / ``.csv`` and no plots for the metrics after ``at_step`` steps). A ``metric`` or
    ``reference`` (default ``REFERENCE``) given must be among the runs'.

    Returns (summary table, runs left out, Markdown text).
    """
    folder = Path(folder)
    runs = gather_runs(folder, at_step)
    done, others = runs[runs["status"] == "completed"], runs[runs["status"] != "completed"]
    if metric is not None and f"metric:{metric}" not in runs:
        logged = sorted(c.removeprefix("metric:") for c in runs.columns if c.startswith("metric:"))
        raise ConfigError(f"--metric {metric}: no run under {folder} has it; theirs are {', '.join(logged) or 'none'}.")
    if reference is not None and reference not in set(runs["method"]):
        raise ConfigError(f"--reference {reference}: no run under {folder} is of that method; theirs are {', '.join(sorted(set(runs['method'])))}.")
    reference = reference or REFERENCE  # the default may be absent from a sweep: no paired differences then
    metric = metric or task_metric(runs, at_step)
    setups = runs[["task", "model"]].drop_duplicates().dropna()
    if len(setups) > 1:  # rows are per method and width only
        log.warning("the runs span %d task/model pairs (%s): their rows mix; report one sweep at a time",
                    len(setups), ", ".join(f"{t}/{m}" for t, m in setups.itertuples(index=False)))
    table = summarize(done, metric, reference)
    label, stem = (metric, "report") if at_step is None else (f"{metric} @ step {at_step}", f"report_step{at_step}")
    table = table.rename(columns=lambda c: c.replace(metric, label))
    text = to_markdown(table, others, label, folder, reference)
    write_text(folder / f"{stem}.md", text)
    write_text(folder / f"{stem}.csv", table.to_csv(index=False))
    if at_step is not None:  # the plots are of the final values
        return table, others, text
    plot_vs_mid_dim(table, f"{metric} mean", f"{metric} ci_low", f"{metric} ci_high", metric, folder / "task_metric_vs_mid_dim.png")
    plot_vs_mid_dim(table, "ntk_sign_rel_err", "ntk_sign_rel_err low", "ntk_sign_rel_err high", "NTK (sign kernel) relative error",
                    folder / "ntk_sign_err_vs_mid_dim.png")
    plot_by_method(table, metric, folder / "task_metric_by_method.png")
    log.info("%d runs: %d completed, %d left out; wrote report.md, report.csv and 3 plots to %s",
             len(runs), len(done), len(others), folder)
    return table, others, text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m src.report", description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a multirun folder (logs/multiruns/<time>_<sweep>)")
    parser.add_argument("--metric", help="the run metric to report (default: the monitor's test counterpart, e.g. test/acc)")
    parser.add_argument("--reference", help=f"the method the others are paired with, seed by seed ({REFERENCE})")
    parser.add_argument("--at-step", help="the logged metrics after this many training steps (metrics.csv), not the final ones")
    # `reference=svd` / `metric=...` / `at_step=50` as in the other entry points' key=value overrides
    keys = {"reference": "--reference", "metric": "--metric", "at_step": "--at-step"}
    argv = [a for kv in (sys.argv[1:] if argv is None else argv)
            for a in ((keys[kv.split("=", 1)[0]], kv.split("=", 1)[1]) if kv.split("=", 1)[0] in keys else (kv,))]
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        # checked here rather than by argparse's type=int, whose refusal is its usage block
        at_step = None if args.at_step is None else int(args.at_step) if args.at_step.strip().isdigit() else -1
        if at_step is not None and at_step < 1:
            raise ConfigError(f"--at-step {args.at_step}: give a number of training steps >= 1, e.g. --at-step 50.")
        _, _, text = build_report(args.folder, args.metric, args.reference, at_step)
    except ConfigError as e:
        log.error("%s", e)
        sys.exit(2)
    print(text)  # the report is this command's output


if __name__ == "__main__":
    main()
