"""Data-to-text generation on tiny causal LMs: data rules, perplexity, generation and its corpus metrics."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping

from src.data.generation import GenerationDataModule, load_rt_review, pad
from src.models.build import load_tokenizer
from src.modules.causal_lm import CausalLMModule, generate_texts
from src.preflight import preflight
from src.train import train
from src.utils.errors import ConfigError

GEN = ["ffn_mode=none", "task.max_new_tokens=6", "task.max_eval_samples=4"]


def _generations(cfg) -> list[dict]:
    return [json.loads(line) for line in (Path(cfg.paths.output_dir) / "generations" / "test.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("model", ["tiny_gpt2", "tiny_llama"])
def test_rt_review_end_to_end(compose_cfg, model: str) -> None:
    cfg = compose_cfg(["task=rt_review", f"model={model}", *GEN])
    metrics = train(cfg)
    assert {"val/ppl", "test/ppl", "test/bleu", "test/rouge_l", "test/ter", "test/chrf"} <= set(metrics)
    assert metrics["val/ppl"] == pytest.approx(math.exp(metrics["val/loss"]), rel=1e-4)
    res = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
    assert res["status"] == "completed" and res["metrics"]["test/bleu"] == metrics["test/bleu"]
    rows = _generations(cfg)
    assert len(rows) == 4 and all(set(r) == {"source", "prediction", "references"} for r in rows)
    assert rows[0]["source"].startswith("movie: ") and any(len(r["references"]) > 1 for r in rows)


def test_rt_review_splits_grouped_by_movie_and_deduplicated() -> None:
    splits = load_rt_review(0)
    movies = {name: set(df.movie) for name, df in splits.items()}
    assert not (movies["train"] & movies["validation"] or movies["train"] & movies["test"] or movies["validation"] & movies["test"])
    texts = pd.concat([df.target for df in splits.values()])
    assert texts.is_unique and len(texts) == 12752
    assert 0.7 < len(movies["train"]) / sum(map(len, movies.values())) < 0.9
    assert splits["test"].equals(load_rt_review(0)["test"])  # fixed seed


def _datamodule(compose_cfg, overrides: list[str], splits: dict[str, pd.DataFrame]) -> GenerationDataModule:
    cfg = compose_cfg(["task=rt_review", "model=tiny_gpt2", *overrides])
    dm = GenerationDataModule(cfg.task, load_tokenizer(cfg.model), splits)
    dm.setup()
    return dm


def test_references_grouped_and_length_rule(compose_cfg) -> None:
    long = " ".join(["word"] * 50)
    pairs = pd.DataFrame({"source": ["a b", "a b", "a b", "c d"], "target": ["one", "two", "three", long]})
    dm = _datamodule(compose_cfg, ["task.max_target_length=20", "task.max_seq_length=16"], {s: pairs for s in ("train", "validation", "test")})
    assert len(dm.data["train"]) == 4
    first, second = dm.data["validation"]
    assert first["references"] == ["one", "two", "three"] and len(first["pairs"]) == 3 and second["references"] == [long]
    p = first["pairs"][0]
    n_prompt = len(first["prompt_ids"])
    assert p["labels"][:n_prompt] == [-100] * n_prompt and p["labels"][n_prompt:] == p["input_ids"][n_prompt:]
    assert p["input_ids"][-1] == dm.eos_token_id  # [SEP]: MiniLM's WordPiece tokenizer has no EOS
    cut = second["pairs"][0]["input_ids"]
    assert len(cut) == 16 and cut[-1] != dm.eos_token_id  # cut to max_seq_length, so no EOS
    probe = dm.probe_batch(2, seed=0)
    assert probe["input_ids"].shape == probe["labels"].shape == probe["attention_mask"].shape
    assert (probe["labels"][probe["attention_mask"] == 0] == -100).all()


def test_lists_in_cells_webnlg_style(compose_cfg, tmp_path: Path) -> None:
    """WebNLG's Hub columns: a list of triples as the source, a list of references in eval splits."""
    row = {"input": ["A | b | C", "A | d | E"], "target": "A b C and d E.", "references": ["A b C, d E.", "A does b C and d E."]}
    for split in ("train", "validation", "test"):
        pd.DataFrame([row]).to_json(tmp_path / f"{split}.jsonl", orient="records", lines=True)
    cfg = compose_cfg(["task=web_nlg", "model=tiny_gpt2", "ffn_mode=none", f"task.data_dir={tmp_path}"])
    splits = preflight(cfg).splits
    assert splits["train"].source.tolist() == ["A | b | C ; A | d | E"] and splits["train"].target.tolist() == [row["target"]]
    assert splits["validation"].target.tolist() == row["references"]


@pytest.mark.parametrize("model", ["tiny_gpt2", "tiny_llama"])
def test_batched_left_padded_generation_matches_one_by_one(compose_cfg, model: str) -> None:
    cfg = compose_cfg(["task=rt_review", f"model={model}"])
    module = CausalLMModule(cfg.model, cfg.task, cfg.optim).eval()
    tok = load_tokenizer(cfg.model)
    prompts = [[101, 2023, 3185], [101, 2204, 2143, 2003, 1037, 2307], [2307]]
    kwargs = {"eos_token_id": tok.sep_token_id, "pad_token_id": tok.pad_token_id, "max_new_tokens": 5}
    batched = generate_texts(module.model, tok, pad(prompts, tok.pad_token_id, left=True),
                             pad([[1] * len(p) for p in prompts], 0, left=True), **kwargs)
    single = [generate_texts(module.model, tok, torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long), **kwargs)[0] for p in prompts]
    assert batched == single
    assert len(generate_texts(module.model, tok, torch.tensor([prompts[0]]), torch.ones(1, 3, dtype=torch.long), num_beams=2, **kwargs)) == 1


def _e2e_dir(root: Path, empty_reference: bool = False, drop: str | None = None) -> Path:
    """Local E2E-format files (real E2E column names; the content is Rotten Tomatoes data), several references per MR."""
    rt = load_rt_review(0)
    d = root / "e2e"
    d.mkdir()
    for split, n in {"train": 48, "validation": 24, "test": 24}.items():
        df = rt["train" if split == "train" else "validation"].iloc[:n]
        mr = df.source.str.replace("movie: ", "name[").str.replace(" | verdict: ", "], verdict[") + "]"
        out = pd.DataFrame({"meaning_representation": mr, "human_reference": df.target})
        if empty_reference:
            out.loc[out.index[3], "human_reference"] = " "
        out.drop(columns=[drop] if drop else []).to_csv(d / f"{split}.csv", index=False)
    return d


def test_e2e_local_files_multi_reference(compose_cfg, tmp_path: Path) -> None:
    data = _e2e_dir(tmp_path)
    cfg = compose_cfg(["task=e2e_nlg", f"task.data_dir={data}", "model=tiny_gpt2", *GEN])
    metrics = train(cfg)
    assert {"val/ppl", "test/ppl", "test/bleu", "test/rouge_l", "test/ter", "test/chrf"} <= set(metrics)
    rows = _generations(cfg)
    test = pd.read_csv(data / "test.csv")
    refs = test.groupby("meaning_representation", sort=False).human_reference.agg(list)
    assert rows and all(r["references"] == refs[r["source"]] for r in rows)
    assert any(len(r["references"]) > 1 for r in rows)


@pytest.mark.parametrize(
    "case,message",
    [("missing", "lacks column(s) ['human_reference']"), ("empty", "empty reference"), ("long", "task.max_new_tokens=200")],
)
def test_bad_input_fails_before_the_model_loads(compose_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str, message: str) -> None:
    data = _e2e_dir(tmp_path, empty_reference=case == "empty", drop="human_reference" if case == "missing" else None)
    overrides = ["task=e2e_nlg", f"task.data_dir={data}", "model=tiny_gpt2", "ffn_mode=none"]
    cfg = compose_cfg(overrides + (["task.max_new_tokens=200"] if case == "long" else []))  # tiny_gpt2 has 128 positions
    monkeypatch.setattr("src.modules.base.build_model", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(ConfigError, match=re.escape(message)):
        train(cfg)


def test_train_false_reports_the_validation_metrics_before_any_step(compose_cfg) -> None:
    """``train=false`` validates too: the compressed model's val/ppl before training equals that
    after one step that changes nothing (lr 0), and no checkpoint is written."""
    base = ["task=rt_review", "model=tiny_llama", "ffn_mode=ntk_cluster", "ffn_mode.mid_dim=16", "task.max_eval_samples=4", "test=false"]
    cfg = compose_cfg([*base, "train=false"])
    before = train(cfg)
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()
    res = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
    assert res["status"] == "completed" and res["metrics"]["val/ppl"] == before["val/ppl"]
    still = train(compose_cfg([*base, "trainer.max_steps=1", "optim.lr=0"]))
    assert before["val/ppl"] == pytest.approx(still["val/ppl"], rel=1e-5) and before["fusion/params_after"] == still["fusion/params_after"]


def test_early_stopping_option(compose_cfg) -> None:
    cfg = compose_cfg(["task=rt_review", "model=tiny_llama", "task.early_stopping=true"])
    (stop,) = CausalLMModule(cfg.model, cfg.task, cfg.optim).configure_callbacks()
    assert isinstance(stop, EarlyStopping) and stop.monitor == "val/ppl" and stop.mode == "min" and stop.patience == 5
    cfg = compose_cfg(["task=rt_review", "model=tiny_llama"])
    assert CausalLMModule(cfg.model, cfg.task, cfg.optim).configure_callbacks() == []


@pytest.mark.slow
def test_smollm2_rt_review(compose_cfg) -> None:
    """The real offline model, dequantized once into the shared cache: a few steps, every metric."""
    cache = os.environ.get("MLP_FUSION_CACHE", str(Path(__file__).resolve().parents[3] / ".cache"))
    cfg = compose_cfg(["task=rt_review", "model=smollm2", "ffn_mode=none", "trainer.max_steps=5", "task.max_eval_samples=16",
                       f"model.cache_dir={cache}/models"], fast=False)
    metrics = train(cfg)
    assert {"val/ppl", "test/ppl", "test/bleu", "test/rouge_l", "test/ter", "test/chrf"} <= set(metrics)
    assert metrics["test/ppl"] < 1000  # a pretrained model, not a random one
    assert len(_generations(cfg)) == 16
