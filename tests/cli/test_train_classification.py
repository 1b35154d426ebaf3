"""End to end on tiny models: fine-tune, evaluate, write metrics and results (in-process, seconds each)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from src.train import train


def _results(cfg) -> dict:
    return json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())


def test_rt_polarity_tiny_bert_end_to_end(compose_cfg) -> None:
    cfg = compose_cfg(["model=tiny_bert", "ffn_mode=none"])
    metrics = train(cfg)
    out = Path(cfg.paths.output_dir)
    assert {"val/acc", "test/acc"} <= set(metrics)
    df = pd.read_csv(out / "metrics.csv")
    assert {"val/acc", "test/acc"} <= set(df.columns)
    assert (out / "checkpoints" / "last.ckpt").exists() and (out / "checkpoints" / "best.ckpt").exists()
    res = _results(cfg)
    assert res["status"] == "completed" and res["metrics"]["test/acc"] == metrics["test/acc"]
    assert res["metrics"]["perf/step_time_s"] > 0


def _glue_dir(root: Path, task: str) -> Path:
    """Local GLUE-format files (real GLUE column names; the texts are Rotten Tomatoes snippets)."""
    from src.data.classification import load_rt_polarity

    rt = load_rt_polarity(0)
    d = root / task
    d.mkdir()
    evals = ["validation_matched", "validation_mismatched", "test_matched", "test_mismatched"] if task == "mnli" else ["validation", "test"]
    for split, n in {"train": 48, **{e: 16 for e in evals}}.items():
        src = rt["train" if split == "train" else "validation"].iloc[:n]
        text = [" ".join(t.replace('"', "").split()) for t in src.text]  # GLUE TSVs are unquoted
        if task == "sst2":
            df = pd.DataFrame({"sentence": text, "label": src.label})
        elif task == "mnli":
            df = pd.DataFrame({"premise": text, "hypothesis": text[::-1], "label": [i % 3 for i in range(n)]})
        else:  # stsb: regression scores in [0, 5]
            df = pd.DataFrame({"sentence1": text, "sentence2": text[::-1], "label": [i % 6 * 1.0 for i in range(n)]})
        if split.startswith("test"):
            df["label"] = -1  # GLUE hides test labels
        df.to_csv(d / f"{split}.tsv", sep="\t", index=False, quoting=3)
    return d


@pytest.mark.parametrize(
    "task,expected",
    [("sst2", {"val/acc"}), ("mnli", {"val/acc", "val_mm/acc"}), ("stsb", {"val/pearson", "val/spearmanr", "val/combined_score"})],
)
def test_glue_local_files(compose_cfg, tmp_path: Path, task: str, expected: set) -> None:
    data = _glue_dir(tmp_path, task)
    cfg = compose_cfg(["model=tiny_bert", "ffn_mode=none", f"task={task}", f"task.data_dir={data}"])
    metrics = train(cfg)
    assert expected <= set(metrics)
    # hidden test labels: a GLUE submission file instead of a score
    sub = {"sst2": "SST-2", "mnli": "MNLI-m", "stsb": "STS-B"}[task]
    pred = pd.read_csv(Path(cfg.paths.output_dir) / "predictions" / f"{sub}.tsv", sep="\t")
    assert list(pred.columns) == ["index", "prediction"] and len(pred) == 8  # limit_test_batches=1 x batch 8
    assert not any(k.startswith("test/acc") for k in metrics)
