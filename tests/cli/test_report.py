"""The sweep report on a synthetic multirun folder: table, CSV, plots; failed and running runs left out."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import pytest

from src.report import build_report, main

METRICS = {"fusion/ntk_std_rel_err": 0.5, "fusion/output_rel_err": 0.2, "fusion/params_after": 2.0e7,
           "fusion/params_before": 2.3e7, "perf/step_time_s": 0.25, "perf/peak_mem_mb": 900.0, "val/acc": 0.7}


def _run(root: Path, name: str, status: str, mode: str, mid_dim: int | None, seed: int, metrics: dict, error: str | None = None,
         **options: object) -> None:
    """A run folder as src.train leaves it: .hydra/config.yaml and results.json."""
    d = root / name
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "config.yaml").write_text(f"seed: {seed}\nffn_mode:\n  name: {mode}\ntask:\n  name: rt_polarity\n  monitor: val/acc\n")
    res = {"status": status, "task": "rt_polarity", "model": "minilm", "ffn_mode": mode, "mid_dim": mid_dim, "seed": seed,
           "distill": "none", "monitor": "val/acc", "metrics": metrics, **options}
    (d / "results.json").write_text(json.dumps(res if error is None else {**res, "error": error}))


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """2 methods x 2 widths x 2 seeds, a full fine-tuning baseline (with a width an experiment left
    in its config), one failed and one still-running run whose numbers must not count."""
    root = tmp_path / "2026-01-01_00-00-00_sweep"
    n = 0
    for mode, base in (("ntk_cluster", 0.80), ("cluster", 0.70)):
        for k in (16, 32):
            for seed in (1, 2):
                m = {**METRICS, "test/acc": base + 0.01 * seed, "fusion/ntk_sign_rel_err": 1.0 / k + 0.001 * seed}
                _run(root, f"{n}_rt-{mode}-k{k}-s{seed}", "completed", mode, k, seed, m)
                n += 1
    for seed in (1, 2):
        _run(root, f"{n}_rt-none-s{seed}", "completed", "none", 32, seed, {"test/acc": 0.9, "perf/step_time_s": 0.3, "perf/peak_mem_mb": 950.0})
        n += 1
    _run(root, f"{n}_rt-ntk_cluster-k16-s3", "failed", "ntk_cluster", 16, 3, {"test/acc": 0.0}, error="RuntimeError: out of memory\ntrace")
    _run(root, f"{n + 1}_rt-ntk_cluster-k16-s4", "running", "ntk_cluster", 16, 4, {})
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def test_report_table_csv_and_plots(sweep: Path) -> None:
    table, others, text = build_report(sweep)
    rows = {(r.method, None if pd.isna(r.mid_dim) else int(r.mid_dim)): r for r in table.itertuples(index=False)}
    assert set(rows) == {("ntk_cluster", 16), ("ntk_cluster", 32), ("cluster", 16), ("cluster", 32), ("none", None)}
    fused = table[(table.method == "ntk_cluster") & (table.mid_dim == 16)].iloc[0]
    # the failed run's test/acc of 0.0 and the running run are not averaged in
    assert fused["seeds"] == 2 and fused["test/acc mean"] == pytest.approx(0.815)
    assert fused["test/acc std"] == pytest.approx(0.00707107, rel=1e-4)
    assert fused["ntk_sign_rel_err"] == pytest.approx(1 / 16 + 0.0015)
    assert fused["params"] == 2.0e7 and fused["step_time_s"] == 0.25
    none = table[table.method == "none"].iloc[0]
    assert none["params"] == 2.3e7 and pd.isna(none["ntk_sign_rel_err"])  # the uncompressed size; no NTK error
    assert sorted(others.status) == ["failed", "running"]

    csv = pd.read_csv(sweep / "report.csv")
    assert len(csv) == 5 and {"test/acc mean", "test/acc std", "seeds", "ntk_sign_rel_err", "ntk_std_rel_err",
                              "output_rel_err", "params", "step_time_s", "peak_mem_mb"} <= set(csv.columns)
    md = (sweep / "report.md").read_text()
    assert md == text and "| ntk_cluster | 16 | 2 | 0.815 ± 0.0071 [0.7515, 0.8785] | (reference) |" in md
    # cluster is 0.1 below ntk_cluster on both seeds: the paired interval is a point, and excludes 0
    assert "| cluster | 16 | 2 | 0.715 ± 0.0071 [0.6515, 0.7785] | **-0.1 [-0.1, -0.1]** |" in md
    assert "## Runs not in the table" in md and "RuntimeError: out of memory" in md and "| running |" in md
    for png in ("task_metric_vs_mid_dim.png", "ntk_sign_err_vs_mid_dim.png", "task_metric_by_method.png"):
        assert (sweep / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_variants_of_a_method_are_their_own_rows(sweep: Path) -> None:
    for seed in (1, 2):
        _run(sweep, f"v{seed}", "completed", "ntk_cluster", 16, seed, {**METRICS, "test/acc": 0.85}, refit="lstsq", weighting="activation")
        _run(sweep, f"b{seed}", "completed", "wanda_sp", 16, seed, {**METRICS, "test/acc": 0.75}, refit="none", budget=0.25)
    table, _, text = build_report(sweep)
    assert {"ntk_cluster+refit+act", "wanda_sp+budget=0.25", "ntk_cluster"} <= set(table.method)
    assert table[table.method == "ntk_cluster"].iloc[0]["seeds"] == 2  # the plain runs are not mixed with the variant's
    assert "| ntk_cluster+refit+act | 16 | 2 | 0.85 | +0.035 [-0.0285, +0.0985] |" in text  # paired with plain ntk_cluster


def test_runs_at_different_keep_values_are_their_own_rows(sweep: Path) -> None:
    """ntk_keep at keep 0.25 and at 0.5: two rows, each with both of its seeds (not one row whose seeds overwrite)."""
    for keep, acc in ((0.25, 0.8), (0.5, 0.9)):
        for seed in (1, 2):
            _run(sweep, f"keep{keep}-s{seed}", "completed", "ntk_keep", 16, seed, {**METRICS, "test/acc": acc}, refit="none", keep=keep)
    table, _, _ = build_report(sweep)
    rows = table[table.method.str.startswith("ntk_keep")].set_index("method")
    assert sorted(rows.index) == ["ntk_keep+keep=0.25", "ntk_keep+keep=0.5"]
    assert (rows["seeds"] == 2).all()
    assert rows.loc["ntk_keep+keep=0.25", "test/acc mean"] == pytest.approx(0.8)
    assert rows.loc["ntk_keep+keep=0.5", "test/acc mean"] == pytest.approx(0.9)


def test_report_falls_back_to_best_validation_when_test_labels_are_hidden(sweep: Path) -> None:
    for res_path in sweep.glob("*/results.json"):
        res = json.loads(res_path.read_text())
        acc = res["metrics"].pop("test/acc", None)
        res["metrics"]["best/val/acc"] = acc
        res_path.write_text(json.dumps(res))
    table, _, _ = build_report(sweep)
    assert "best/val/acc mean" in table.columns


def test_report_on_a_folder_without_runs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path)])
    assert exit_info.value.code == 2
    assert "holds no runs" in caplog.text and str(tmp_path) in caplog.text


def test_report_at_step_reads_each_runs_logged_metrics(tmp_path: Path) -> None:
    """``--at-step 50``: the value each run logged after 50 steps (Lightning's CSV row at step 49), paired per seed;
    a run that stopped before is listed apart, not averaged in."""
    root = tmp_path / "sweep"
    for ft, base in (("full", 60.0), ("lora", 70.0)):
        for seed in (0, 1, 2):
            name = f"{ft}-s{seed}"
            _run(root, name, "completed", "wanda_sp", 1152, seed, {"val/ppl": base, "perf/step_time_s": 4.0}, finetune=ft)
            rows = [{"step": 49, "epoch": 0, "val/ppl": base + 10 + seed, "train/loss": None},
                    {"step": 49, "epoch": 0, "val/ppl": None, "train/loss": 3.0},
                    {"step": 99, "epoch": 0, "val/ppl": base + seed, "train/loss": None}]
            pd.DataFrame(rows[: 2 if name == "lora-s2" else 3]).to_csv(root / name / "metrics.csv", index=False)
    table, others, text = build_report(root, metric="val/ppl", reference="wanda_sp", at_step=100)
    rows = table.set_index("method")
    assert rows.loc["wanda_sp", "val/ppl @ step 100 mean"] == pytest.approx(61.0)  # 60, 61, 62
    assert rows.loc["wanda_sp+lora", "seeds"] == 2 and list(others["run"]) == ["lora-s2"]
    assert rows.loc["wanda_sp+lora", "diff vs wanda_sp"] == pytest.approx(10.0)  # paired on seeds 0 and 1
    assert "val/ppl @ step 100" in text and (root / "report_step100.md").is_file()
    table, _, _ = build_report(root, metric="val/ppl", reference="wanda_sp", at_step=50)
    assert table.set_index("method").loc["wanda_sp", "val/ppl @ step 50 mean"] == pytest.approx(71.0)
    with pytest.raises(SystemExit):
        main([str(root), "--at-step", "0"])
