"""One table and two plots for a multirun sweep: ``python -m src.report <multirun folder>``.

Reads every run folder under the given folder (``results.json`` and ``.hydra/config.yaml``, written
by ``src.train``; never W&B, so it works offline) and writes, into that folder:

- ``report.md`` / ``report.csv``: one row per method (``ffn_mode``, plus ``+<distill>`` when
  distilled) and ``mid_dim``, with the task metric's mean and std over seeds and the number of
  seeds, the NTK and output errors, the parameter count, the time per training step and the peak
  memory; runs that failed or are still running are listed apart, never averaged in;
- ``task_metric_vs_mid_dim.png`` and ``ntk_sign_err_vs_mid_dim.png``: one line per method, error
  bars one standard deviation over seeds (``ffn_mode=none`` has no width: a horizontal band).
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

from src.utils.errors import ConfigError
from src.utils.io import atomic_path, write_text

log = logging.getLogger(__name__)

NTK_SIGN, NTK_STD, OUTPUT_ERR = "fusion/ntk_sign_rel_err", "fusion/ntk_std_rel_err", "fusion/output_rel_err"
PARAMS_AFTER, PARAMS_BEFORE = "fusion/params_after", "fusion/params_before"
STEP_TIME, PEAK_MEM = "perf/step_time_s", "perf/peak_mem_mb"
# (report column, run metric): averaged over the seeds of a row
MEANS = {"ntk_sign_rel_err": NTK_SIGN, "ntk_std_rel_err": NTK_STD, "output_rel_err": OUTPUT_ERR,
         "params": PARAMS_AFTER, "step_time_s": STEP_TIME, "peak_mem_mb": PEAK_MEM}
KEYS = ["method", "mid_dim"]


# ---------------------------------------------------------------------------------------------
# gathering


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def read_run(folder: Path, root: Path) -> dict[str, Any]:
    """One run folder as a flat record: settings, status and its final metrics (``metric:<key>``)."""
    cfg_path = folder / ".hydra" / "config.yaml"
    cfg = OmegaConf.to_container(OmegaConf.load(cfg_path), resolve=False) if cfg_path.is_file() else {}
    res = _read_json(folder / "results.json")
    if res is None:  # never got as far as the first results.json write, or it is unreadable
        res = {"status": "unknown", "error": "no readable results.json"}
    ffn = cfg.get("ffn_mode", {})
    ffn_mode = res.get("ffn_mode") or ffn.get("name", "?")
    distill = res.get("distill") or cfg.get("distill", {}).get("name", "none")
    mid_dim = res.get("mid_dim", ffn.get("mid_dim"))
    return {
        "run": str(folder.relative_to(root)),
        "status": res.get("status", "unknown"),
        "error": res.get("error"),
        "task": res.get("task") or cfg.get("task", {}).get("name"),
        "model": res.get("model") or cfg.get("model", {}).get("name"),
        "ffn_mode": ffn_mode,
        "method": ffn_mode if distill in (None, "none") else f"{ffn_mode}+{distill}",
        # ffn_mode=none compresses nothing: a width set for it (by an experiment) means nothing
        "mid_dim": None if ffn_mode == "none" or mid_dim is None else int(mid_dim),
        "seed": res.get("seed", cfg.get("seed")),
        "monitor": res.get("monitor") or cfg.get("task", {}).get("monitor"),
        **{f"metric:{k}": v for k, v in (res.get("metrics") or {}).items()},
    }


def gather_runs(folder: str | Path) -> pd.DataFrame:
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
    return pd.DataFrame([read_run(r, root) for r in runs])


# ---------------------------------------------------------------------------------------------
# the table


def task_metric(runs: pd.DataFrame) -> str:
    """The run metric to report: the monitor's test counterpart (``val/acc`` -> ``test/acc``), else,
    where test labels are hidden (GLUE), the best validation value, else the last one."""
    monitor = next((m for m in runs["monitor"].dropna()), None)
    if monitor is None:
        raise ConfigError("the runs name no task.monitor in results.json or .hydra/config.yaml; pass --metric.")
    head, _, rest = monitor.partition("/")
    candidates = [f"test/{rest}" if head.startswith("val") else monitor, f"best/{monitor}", monitor]
    present = [c for c in candidates if f"metric:{c}" in runs]
    complete = [c for c in present if runs[f"metric:{c}"].notna().all()]
    return (complete or present or candidates)[0]


def _mean_std(values: pd.Series) -> tuple[float, float]:
    v = values.dropna().astype(float)
    return (float(v.mean()) if len(v) else math.nan), (float(v.std(ddof=1)) if len(v) > 1 else math.nan)


def summarize(done: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per (method, mid_dim) of completed runs: metric mean/std over seeds, seeds, other means."""
    def col(key: str) -> pd.Series:
        return done[f"metric:{key}"] if f"metric:{key}" in done else pd.Series(math.nan, index=done.index)

    frame = done[KEYS + ["seed"]].assign(**{"_metric": col(metric)}, **{name: col(key) for name, key in MEANS.items()})
    # The uncompressed model's size, for ffn_mode=none rows: what the compressed runs started from.
    before = col(PARAMS_BEFORE).dropna()
    frame.loc[done["ffn_mode"] == "none", "params"] = before.iloc[0] if len(before) else math.nan
    rows = []
    for (method, mid_dim), g in frame.groupby(["method", frame["mid_dim"].fillna(-1)], sort=True):
        mean, std = _mean_std(g["_metric"])
        rows.append({"method": method, "mid_dim": None if mid_dim == -1 else int(mid_dim), "seeds": int(g["seed"].nunique()),
                     f"{metric} mean": mean, f"{metric} std": std, **{name: _mean_std(g[name])[0] for name in MEANS},
                     "ntk_sign_rel_err std": _mean_std(g["ntk_sign_rel_err"])[1]})
    cols = ["method", "mid_dim", "seeds", f"{metric} mean", f"{metric} std", "ntk_sign_rel_err", "ntk_sign_rel_err std",
            *[c for c in MEANS if c != "ntk_sign_rel_err"]]
    table = pd.DataFrame(rows, columns=cols)
    table["mid_dim"] = table["mid_dim"].astype("Int64")  # integers in the CSV, blank for none
    return table


# ---------------------------------------------------------------------------------------------
# Markdown


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or (not isinstance(v, str) and pd.isna(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.{digits}g}"
    return str(v)


def _first_line(error: Any, width: int = 120) -> str:
    return error.strip().splitlines()[0][:width] if isinstance(error, str) and error.strip() else ""


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])


def to_markdown(table: pd.DataFrame, others: pd.DataFrame, metric: str, folder: Path) -> str:
    """The report: the summary table, then the runs left out of it (failed, running, unknown)."""
    header = ["method", "mid_dim", "seeds", f"{metric} (mean ± std)", "NTK sign err", "NTK std err", "output err",
              "params", "s/step", "peak MB"]
    rows = [[r.method, _fmt(r.mid_dim), str(r.seeds),
             f"{_fmt(r[f'{metric} mean'])} ± {_fmt(r[f'{metric} std'])}" if r.seeds > 1 else _fmt(r[f"{metric} mean"]),
             _fmt(r.ntk_sign_rel_err), _fmt(r.ntk_std_rel_err), _fmt(r.output_rel_err), _fmt(r.params),
             _fmt(r.step_time_s, 3), _fmt(r.peak_mem_mb)] for _, r in table.iterrows()]
    text = [f"# Sweep report: {folder.name}", "",
            f"Completed runs, mean over seeds; `{metric}` is the task metric. NTK errors: relative Frobenius error of "
            "the sign (Adam) and standard kernels over the compressed layers' MLP parameters; output err: mean relative "
            "error of the compressed MLPs' outputs.", "",
            markdown_table(header, rows) if rows else "_No completed runs._"]
    if len(others):
        text += ["", "## Runs not in the table", "",
                 markdown_table(["run", "status", "method", "mid_dim", "seed", "error"],
                                [[r.run, r.status, r.method, _fmt(r.mid_dim), _fmt(r.seed), _first_line(r.error)]
                                 for r in others.itertuples()])]
    return "\n".join(text) + "\n"


# ---------------------------------------------------------------------------------------------
# plots


def plot_vs_mid_dim(table: pd.DataFrame, mean: str, std: str, ylabel: str, path: Path) -> None:
    """``mean`` against mid_dim, one line per method with std error bars; width-less rows as bands."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    widths = sorted({int(w) for w in table["mid_dim"].dropna()})
    for i, (method, g) in enumerate(table.dropna(subset=[mean]).groupby("method", sort=True)):
        color = f"C{i % 10}"
        if g["mid_dim"].isna().all():  # e.g. full fine-tuning: the same at every width
            y, e = float(g[mean].iloc[0]), float(g[std].fillna(0).iloc[0])
            ax.axhline(y, linestyle="--", color=color, label=method)
            ax.axhspan(y - e, y + e, color=color, alpha=0.15)
            continue
        g = g.dropna(subset=["mid_dim"]).sort_values("mid_dim")
        ax.errorbar(g["mid_dim"].astype(int), g[mean], yerr=g[std].fillna(0), color=color, marker="o", capsize=3, label=method)
    if widths:
        ax.set_xticks(widths)
    ax.set_xlabel("mid_dim (compressed MLP width)")
    ax.set_ylabel(ylabel)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no completed runs with this metric", ha="center", va="center", transform=ax.transAxes)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# entry point


def build_report(folder: str | Path, metric: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """Gather, summarise and write ``report.md``, ``report.csv`` and the two plots into ``folder``.

    Returns (summary table, runs left out, Markdown text).
    """
    folder = Path(folder)
    runs = gather_runs(folder)
    done, others = runs[runs["status"] == "completed"], runs[runs["status"] != "completed"]
    metric = metric or task_metric(runs)
    setups = runs[["task", "model"]].drop_duplicates().dropna()
    if len(setups) > 1:  # rows are per method and width only
        log.warning("the runs span %d task/model pairs (%s): their rows mix; report one sweep at a time",
                    len(setups), ", ".join(f"{t}/{m}" for t, m in setups.itertuples(index=False)))
    table = summarize(done, metric)
    text = to_markdown(table, others, metric, folder)
    write_text(folder / "report.md", text)
    write_text(folder / "report.csv", table.to_csv(index=False))
    plot_vs_mid_dim(table, f"{metric} mean", f"{metric} std", metric, folder / "task_metric_vs_mid_dim.png")
    plot_vs_mid_dim(table, "ntk_sign_rel_err", "ntk_sign_rel_err std", "NTK (sign kernel) relative error",
                    folder / "ntk_sign_err_vs_mid_dim.png")
    log.info("%d runs: %d completed, %d left out; wrote report.md, report.csv and 2 plots to %s",
             len(runs), len(done), len(others), folder)
    return table, others, text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m src.report", description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a multirun folder (logs/multiruns/<time>_<sweep>)")
    parser.add_argument("--metric", help="the run metric to report (default: the monitor's test counterpart, e.g. test/acc)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        _, _, text = build_report(args.folder, args.metric)
    except ConfigError as e:
        log.error("%s", e)
        sys.exit(2)
    print(text)  # the report is this command's output


if __name__ == "__main__":
    main()
