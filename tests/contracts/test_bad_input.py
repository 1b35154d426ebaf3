"""The bad-input catalogue: each case is refused with a short message naming the setting and what is
allowed, before any model weights load (``build_data_and_module`` is never reached)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest
from hydra.errors import ConfigCompositionException, HydraException

import src.preflight
import src.train
from src.preflight import check_run_settings
from src.train import train
from src.utils.errors import ConfigError
from src.utils.schema import refusal
from tests.conftest import assert_refused_before_loading, run_cli


@pytest.fixture(autouse=True)
def _no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(src.train, "build_data_and_module", lambda *a, **k: pytest.fail("a model was loaded before the check"))


def _sst2_dir(root: Path, drop: str | None = None, bad_label: bool = False, splits=("train", "validation")) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for s in splits:
        df = pd.DataFrame({"sentence": ["a fine film", "a dull film"], "label": [1, 7 if bad_label and s == "train" else 0]})
        df.drop(columns=[drop] if drop else []).to_csv(root / f"{s}.csv", index=False)
    return root


CASES = {  # name: (overrides, part of the message)
    "mid_dim_zero": (["ffn_mode.mid_dim=0"], "ffn_mode.mid_dim=0 must be a positive integer"),
    "mid_dim_full_width": (["ffn_mode.mid_dim=64"], "allowed is 1..63"),
    "layers_out_of_range": (["ffn_mode.layers=[1,9]"], "ffn_mode.layers has [9] out of range: the model has layers 0..3"),
    "layers_repeated": (["ffn_mode.layers=[1,1]"], "repeats a layer"),
    "layers_empty": (["ffn_mode.layers=[]"], "ffn_mode.layers=[] is empty"),
    "sketch_keep_too_large": (["ffn_mode=sketch", "ffn_mode.mid_dim=8", "ffn_mode.sketch_keep=8"], "ffn_mode.sketch_keep=8 must be in 0..mid_dim-1"),
    "re_init_not_compressed": (["ffn_mode.layers=[2,3]", "ffn_mode.re_init_layers=[1]"], "ffn_mode.re_init_layers has [1], which are not among"),
    "max_seq_length": (["task.max_seq_length=0"], "task.max_seq_length=0 must be a positive integer"),
    "batch_size": (["task.batch_size=-4"], "task.batch_size=-4 must be a positive integer"),
    "ckpt_missing": (["ckpt_path=/nonexistent/x.ckpt"], "ckpt_path='/nonexistent/x.ckpt': no checkpoint file"),
    "ckpt_last_missing": (["ckpt_path=last"], "ckpt_path=last resumes the run in hydra.run.dir"),
    "approx_memory_too_small": (["approx_metrics.max_memory_gb=0.0001"],
        "approx_metrics.max_memory_gb=0.0001 cannot hold the per-sample gradients of one layer's MLP (64 probe samples x 4,192 parameters"),
    "model_folder_missing": (["model.name_or_path=/nonexistent/model"], "model.name_or_path='/nonexistent/model' is not an existing folder"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_refused_settings(compose_cfg, name: str) -> None:
    overrides, message = CASES[name]
    with pytest.raises(ConfigError, match=_re(message)):
        train(compose_cfg(["model=tiny_bert", *overrides]))


def test_memory_budget_at_smollm2_size(compose_cfg) -> None:
    """SmolLM2's dimensions (a config, no weights): 0.01 GB cannot hold one layer's per-sample gradients
    (64 x 2,654,208 parameters x 4 bytes = 0.63 GB) and the copy of the 20 layers compressed, and is refused before
    compressing; the default 2 GB can."""
    from transformers import LlamaConfig

    from src.preflight import check_approx_metrics, compression_settings

    smollm2 = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, vocab_size=49152)
    message = ("approx_metrics.max_memory_gb=0.01 cannot hold the per-sample gradients of one layer's MLP (64 probe samples x 2,654,208 "
               "parameters x 4 bytes = 0.63 GB) and the original's copy of the 20 compressed MLPs (0.20 GB)")

    def check(*overrides: str) -> None:  # on tiny_llama's settings resolved for SmolLM2's shape: its top 20 layers
        cfg = compose_cfg(["model=tiny_llama", *overrides])
        check_approx_metrics(cfg, smollm2, compression_settings(cfg, smollm2))

    with pytest.raises(ConfigError, match=_re(message)):
        check("approx_metrics.max_memory_gb=0.01")
    check()


def _re(text: str) -> str:
    import re

    return re.escape(text)


@pytest.mark.parametrize(
    "case,message",
    [
        ("no_dir", "does not exist or is not a folder"),
        ("no_split", "has no file for split 'validation'"),
        ("no_column", "lacks column(s) ['sentence']"),
        ("bad_label", "holds 1 label(s) outside the task's range, e.g. 7; allowed: integers 0..1"),
    ],
)
def test_refused_data_dir(compose_cfg, tmp_path: Path, case: str, message: str) -> None:
    d = {
        "no_dir": lambda: tmp_path / "nope",
        "no_split": lambda: _sst2_dir(tmp_path / "d", splits=("train",)),
        "no_column": lambda: _sst2_dir(tmp_path / "d", drop="sentence"),
        "bad_label": lambda: _sst2_dir(tmp_path / "d", bad_label=True),
    }[case]()
    with pytest.raises(ConfigError, match=_re(message)):
        train(compose_cfg(["model=tiny_bert", "task=sst2", f"task.data_dir={d}"]))


def test_model_folder_with_missing_files(compose_cfg, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConfigError, match="lacks model.safetensors"):
        train(compose_cfg([f"model.name_or_path={folder}"]))


def test_unknown_architecture_for_compression(compose_cfg) -> None:
    cfg = compose_cfg(["model=tiny_bert", "+model.config.d_model=32", "model.config.model_type=bart"])
    with pytest.raises(ConfigError, match="model=tiny_bert: .*supported"):
        train(cfg)


@pytest.mark.parametrize("group", ["task", "model", "ffn_mode", "distill", "trainer"])
def test_unknown_option_lists_valid_ones(compose_cfg, group: str) -> None:
    with pytest.raises(HydraException, match=f"Could not find '{group}/nope'(.|\n)*Available options in '{group}'"):
        compose_cfg([f"{group}=nope"])


def test_cli_refusal_is_one_paragraph_and_marks_the_run_failed(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli("src.train", "model=tiny_bert", "ffn_mode.layers=[7]", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 2
    assert "ffn_mode.layers has [7] out of range" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    res = json.loads((run_dir / "results.json").read_text())
    assert res["status"] == "failed" and "ffn_mode.layers" in res["error"]
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.csv").exists()


def test_cli_unknown_task_creates_no_run_folder(tmp_path: Path) -> None:
    proc = run_cli("src.train", "task=nope", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode != 0 and "Available options in 'task'" in proc.stderr and "rt_polarity" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_cli_hub_task_offline_fails_fast(tmp_path: Path) -> None:
    start = time.time()
    proc = run_cli("src.train", "task=sst2", "model=tiny_bert", f"hydra.run.dir={tmp_path / 'run'}", timeout=300)
    # the bound catches Hub download retries (minutes), not slowness: 2 busy cores take ~60 s to import and refuse
    assert proc.returncode == 2 and time.time() - start < 180
    out = proc.stdout + proc.stderr
    assert "task 'sst2'" in out and "task.data_dir" in out and "Traceback" not in out


# Settings with a type (src/utils/schema.py): a wrong type is refused by Hydra while composing, a value
# out of range by the preflight's check_run_settings, first of all; either in one sentence.
RUN_SETTINGS = {  # name: (overrides, part of the message)
    "lr_negative": (["optim.lr=-1"], "optim.lr=-1.0 must be a number >= 0, e.g. 1e-4"),
    "betas_one": (["optim.betas=[0.9]"], "optim.betas=[0.9] must be two numbers in [0, 1), e.g. [0.9, 0.98]."),
    "betas_one_and_above": (["optim.betas=[0.9,1.0]"], "optim.betas=[0.9, 1.0] must be two numbers in [0, 1)"),
    "warmup_ratio": (["optim.warmup_ratio=1"], "optim.warmup_ratio=1.0 must be a fraction of the training steps in [0, 1)"),
    "schedule": (["optim.schedule=cosine"], "optim.schedule='cosine' must be linear or polynomial."),
    "seed_negative": (["seed=-1"], "seed=-1 must be in 0..4294967295."),
    "max_steps_negative": (["trainer.max_steps=-5"], "trainer.max_steps=-5 must be a number of optimizer steps >= 1, or -1 (no limit"),
    "no_training": (["trainer.max_steps=0", "trainer.max_epochs=0"],
        "trainer.max_epochs=0 and trainer.max_steps=0 train no step: raise them, or set train=false"),
    "no_training_steps": (["trainer.max_steps=0"], "trainer.max_steps=0 trains no step"),
    "never_ends": (["trainer.max_epochs=-1", "trainer.max_steps=-1"], "trainer.max_epochs=-1 and trainer.max_steps=-1 never end training"),
    "clip_negative": (["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val=-1.0 must be null or a number >= 0"),
    "log_every_zero": (["trainer.log_every_n_steps=0"], "trainer.log_every_n_steps=0 must be a positive integer."),
    "limit_batches_above_one": (["trainer.limit_val_batches=1.5"],
        "trainer.limit_val_batches=1.5 must be null (all batches), a number of batches >= 0 or a fraction"),
    "accumulate_zero": (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches=0 must be a positive integer."),
    "devices_zero": (["trainer.devices=0"], "trainer.devices=0 must be a number of devices >= 1, -1 (all)"),
    "model_dtype": (["model.dtype=float8"], "model.dtype='float8' must be one of float32, bfloat16, float16 (the loaded weights' torch dtype)."),
}


@pytest.mark.parametrize("name", list(RUN_SETTINGS))
def test_refused_run_settings(compose_cfg, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Refused before the model's config is even read (the issue: optim.lr=-1 failed after compressing)."""
    overrides, message = RUN_SETTINGS[name]
    monkeypatch.setattr(src.preflight, "load_hf_config", lambda *a, **k: pytest.fail("the model's config was read before the check"))
    assert_refused_before_loading(compose_cfg, monkeypatch, ["model=tiny_bert", *overrides], message)


# distill=logits (src/callbacks/logit_distill.py) on a tiny causal LM; each refused by its check in the preflight
LOGITS = ["model=tiny_llama", "task=rt_review", "distill=logits"]
DISTILL_LOGITS = {  # name: (overrides, part of the message)
    "temperature_zero": (["distill.temperature=0"], "distill.temperature=0 must be a positive number"),
    "temperature_negative": (["distill.temperature=-2.0"], "distill.temperature=-2.0 must be a positive number"),
    "kl_weight_negative": (["distill.kl_weight=-1"], "distill.kl_weight=-1 must be a number >= 0"),
    "task_weight_negative": (["distill.task_weight=-0.5"], "distill.task_weight=-0.5 must be a number >= 0"),
    "hidden_weight_negative": (["distill.hidden_weight=-1"], "distill.hidden_weight=-1 must be a number >= 0"),
    "no_loss": (["distill.kl_weight=0"], "distill.kl_weight=0 and distill.task_weight=0 (and no weighted distill.hidden_layers) leave no loss"),
    "top_k_zero": (["distill.top_k=0"], "distill.top_k=0 must be null (the whole vocabulary) or a number of logits in 1..30522."),
    "top_k_above_vocabulary": (["distill.top_k=40000"], "distill.top_k=40000 must be null (the whole vocabulary) or a number of logits in 1..30522."),
    "hidden_layers_out_of_range": (["distill.hidden_layers=[1,4]"], "distill.hidden_layers has [4] out of range: model=tiny_llama has layers 0..3."),
    "hidden_layers_repeated": (["distill.hidden_layers=[2,2]"], "distill.hidden_layers=[2, 2] repeats a layer."),
    "without_compression": (["ffn_mode=none"], "distill=logits distils the uncompressed model into the compressed one, but ffn_mode=none compresses nothing"),
    "classification": (["task=rt_polarity"], "task=rt_polarity trains a classifier, whose head is as untrained in the uncompressed model"),
    "encoder_decoder": (["model=tiny_t5"], "model=tiny_t5 runs as the seq2seq kind (an encoder-decoder model)"),
}


@pytest.mark.parametrize("name", list(DISTILL_LOGITS))
def test_refused_logit_distillation(compose_cfg, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    overrides, message = DISTILL_LOGITS[name]
    assert_refused_before_loading(compose_cfg, monkeypatch, [*LOGITS, *overrides], message)


def test_logit_distillation_refused_under_fsdp(compose_cfg) -> None:
    """The check itself: on this CPU machine the preflight refuses trainer=fsdp earlier (FSDP needs CUDA)."""
    from src.callbacks.logit_distill import check_config
    from src.models.build import load_hf_config

    cfg = compose_cfg([*LOGITS, "trainer=fsdp"])
    with pytest.raises(ConfigError, match=_re("distill=logits keeps a whole unsharded teacher on every rank, which FSDP cannot shard")):
        check_config(cfg, load_hf_config(cfg.model))


def test_no_training_is_allowed_when_only_evaluating(compose_cfg) -> None:
    check_run_settings(compose_cfg(["trainer.max_steps=0", "trainer.max_epochs=0", "train=false"]))


@pytest.mark.parametrize(
    "override,sentence",
    [
        ("seed=abc", "seed='abc' must be an integer."),
        ("seed=null", "seed=null must be an integer."),
        ("train=maybe", "train='maybe' must be true or false."),
        ("optim.lr=fast", "optim.lr='fast' must be a number."),
        ("optim.betas=[0.9,x]", "optim.betas[1]='x' must be a number."),
        ("trainer.max_steps=1.5", "trainer.max_steps=1.5 must be an integer."),
        ("trainer.gradient_clip_val=abc", "trainer.gradient_clip_val='abc' must be a number or null."),
        ("approx_metrics.max_memory_gb=lots", "approx_metrics.max_memory_gb='lots' must be a number."),
    ],
)
def test_wrong_type_refused_while_composing(compose_cfg, override: str, sentence: str) -> None:
    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg([override])
    assert refusal(e.value) == sentence


@pytest.mark.parametrize(
    "overrides",
    [[], ["debug=fast"], ["+trainer.profiler=simple"], *([f"trainer={t}"] for t in ("auto", "cpu", "gpu", "ddp", "ddp_sim", "fsdp")),
     *([f"experiment={e}"] for e in ("minilm_rt", "roberta_sst2", "roberta_mnli", "gpt2_webnlg", "switch_sst2"))],
)
def test_shipped_configs_fit_the_schema(compose_cfg, overrides: list[str]) -> None:
    """Every trainer option and experiment composes onto the schema and passes the range checks; a trainer
    option the YAML leaves out is still added with +, and a misspelt key is refused."""
    check_run_settings(compose_cfg(overrides, fast=False))
    with pytest.raises(HydraException, match="Could not override 'trainer.max_step'"):
        compose_cfg([*overrides, "trainer.max_step=5"])


def test_cli_wrong_type_is_one_sentence(tmp_path: Path) -> None:
    """seed=abc: one sentence naming the setting, its value and the type allowed, exit code 2, before
    anything runs (no run folder: nothing was composed to write one)."""
    run_dir = tmp_path / "run"
    proc = run_cli("src.train", "model=tiny_bert", "seed=abc", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "seed='abc' must be an integer."
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not run_dir.exists()


@pytest.mark.slow  # a CLI run up to the preflight: 10 s
def test_cli_out_of_range_is_one_sentence_and_marks_the_run_failed(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli("src.train", "model=tiny_bert", "optim.lr=-1", f"hydra.run.dir={run_dir}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "optim.lr=-1.0 must be a number >= 0" in out and "Traceback" not in out
    res = json.loads((run_dir / "results.json").read_text())
    assert res["status"] == "failed" and res["error"].startswith("optim.lr=-1.0 must be")


@pytest.mark.parametrize(
    "args,sentence",
    [
        (["--metric", "no/such_metric"], "--metric no/such_metric: no run under {root} has it; theirs are test/acc, val/acc."),
        (["--reference", "nope"], "--reference nope: no run under {root} is of that method; theirs are none, svd."),
        (["reference=nope"], "--reference nope: no run under {root} is of that method; theirs are none, svd."),
        (["--at-step", "abc"], "--at-step abc: give a number of training steps >= 1, e.g. --at-step 50."),
    ],
    ids=["metric", "reference", "reference_key_value", "at_step_text"],
)
def test_report_refuses_what_the_runs_lack(tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture,
                                          args: list[str], sentence: str) -> None:
    """src.report: a metric or reference method no run has would make a report of dashes; a step count that is not a
    number would end in argparse's usage block. Each is one sentence, exit code 2, and no report is written."""
    import logging

    from src.report import main

    root = tmp_path / "sweep"
    for i, (method, seed) in enumerate((("svd", 1), ("svd", 2), ("none", 1))):
        (root / str(i)).mkdir(parents=True)
        (root / str(i) / "results.json").write_text(json.dumps({"status": "completed", "ffn_mode": method, "mid_dim": 8, "seed": seed,
                                                               "monitor": "val/acc", "metrics": {"test/acc": 0.5, "val/acc": 0.6}}))
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as e:
        main([str(root), *args])
    assert e.value.code == 2 and caplog.messages == [sentence.format(root=root)]
    assert "usage:" not in capsys.readouterr().err and not list(root.glob("report*"))


def test_gguf_dtype_in_either_case(tmp_path: Path) -> None:
    """llama.cpp writes the types upper case (F16, Q8_0): accepted as their lower-case names (here the export goes on to
    the checkpoint, which is missing); an unknown type lists the allowed ones."""
    from src.export.__main__ import export

    for dtype in ("F16", "Q8_0", "bf16"):
        with pytest.raises(ConfigError, match=_re("ckpt_path='/nonexistent.ckpt' is not a file.")):
            export("/nonexistent.ckpt", str(tmp_path / "out"), fmt="gguf", gguf_dtype=dtype)
    with pytest.raises(ConfigError, match=_re("gguf_dtype='F8' is not a GGUF weight type this export writes; allowed: ['f32', 'f16', 'bf16', 'q8_0'].")):
        export("/nonexistent.ckpt", str(tmp_path / "out"), fmt="gguf", gguf_dtype="F8")


# src.train, src.export and src.evaluate on a causal LM
LLM = ["model=tiny_llama", "task=rt_review"]


def _evaluate_cfg(overrides: list[str]):
    """conf/evaluate.yaml (src.evaluate's) with ``overrides``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from tests.conftest import CONF

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        return compose("evaluate", overrides=overrides)


def _fake_checkpoint(compose_cfg, path: Path) -> Path:
    """A checkpoint file with tiny_llama's hyper-parameters and no weights: what src.evaluate reads before restoring a model."""
    import torch
    from omegaconf import OmegaConf

    cfg = compose_cfg(LLM)
    torch.save({"hyper_parameters": {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "task")}, "state_dict": {}}, path)
    return path


def test_truncated_checkpoint_is_one_sentence(compose_cfg, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """src.train, src.export and src.evaluate: one sentence naming the setting (torch's own message is a paragraph)."""
    import src.evaluate
    import src.export.__main__ as export_cli

    whole = _fake_checkpoint(compose_cfg, tmp_path / "whole.ckpt")
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    message = f"ckpt_path={str(cut)!r} is not a whole checkpoint file: it is truncated (an interrupted copy or save) or was not written by torch.save."
    with pytest.raises(ConfigError) as e:
        train(compose_cfg([*LLM, f"ckpt_path={cut}"]))
    assert str(e.value) == message
    with pytest.raises(ConfigError) as e:
        export_cli.export(str(cut), str(tmp_path / "out"))
    assert str(e.value) == message
    with pytest.raises(ConfigError) as e:
        src.evaluate.evaluate(_evaluate_cfg([f"ckpt_path={cut}"]))
    assert str(e.value) == message


# A causal LM's settings, refused against their own ranges or the model's config, before its weights load
LLM_SETTINGS = {  # name: (overrides, part of the message)
    "lora_target_modules_unknown": (["finetune=lora", "finetune.target_modules=[no_such_proj]"],
                                    "finetune.target_modules=['no_such_proj'] names no Linear module of model=tiny_llama, whose Linear "
                                    "modules are named down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj."),
    "lm_eval_limit_negative": (["lm_eval.enabled=true", "lm_eval.limit=-1"], "lm_eval.limit=-1 must be null (every document), a positive "
                               "number of documents per task, or a mapping of tasks to them, e.g. {hamlet: 2}."),
    "lm_eval_limit_text": (["lm_eval.enabled=true", "lm_eval.limit=abc"], "lm_eval.limit='abc' must be null (every document)"),
    "lm_eval_limit_task_zero": (["lm_eval.enabled=true", "lm_eval.limit={hamlet:0}"], "lm_eval.limit.hamlet=0 must be a positive number of documents."),
    "lm_eval_past_positions": (["lm_eval.enabled=true", "lm_eval.tasks=[hamlet]", "lm_eval.seq_lens=[128,2048]"],
                               "lm_eval.seq_lens has [2048], past the 128 positions of model=tiny_llama: its perplexity there is not the "
                               "model's; keep lm_eval.seq_lens within 2..128, e.g. [128]."),
}


@pytest.mark.parametrize("name", list(LLM_SETTINGS))
def test_refused_llm_settings(compose_cfg, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    overrides, message = LLM_SETTINGS[name]
    assert_refused_before_loading(compose_cfg, monkeypatch, [*LLM, *overrides], message)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["lm_eval.limit=-1"], "lm_eval.limit=-1 must be null (every document), a positive number of documents per task"),
        (["lm_eval.limit=abc"], "lm_eval.limit='abc' must be null (every document)"),
        (["lm_eval.batch_size=0"], "lm_eval.batch_size=0 must be a positive integer."),
        (["lm_eval.tasks=[hamlet]", "lm_eval.seq_lens=[2048]"], "lm_eval.seq_lens has [2048], past the 128 positions of model=tiny_llama"),
    ],
    ids=["limit_negative", "limit_text", "batch_size_zero", "past_positions"],
)
def test_evaluate_refuses_before_restoring_the_model(compose_cfg, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                      overrides: list[str], message: str) -> None:
    """src.evaluate on a checkpoint: the settings before the checkpoint is read, the lengths against its model's config."""
    import src.evaluate

    monkeypatch.setattr(src.evaluate, "restore_module", lambda *a, **k: pytest.fail("a model was restored before the check"))
    ckpt = _fake_checkpoint(compose_cfg, tmp_path / "x.ckpt")
    with pytest.raises(ConfigError, match=_re(message)):
        src.evaluate.evaluate(_evaluate_cfg([f"ckpt_path={ckpt}", *overrides]))


@pytest.mark.parametrize(
    "config,message",
    [
        ("{not json", "its config.json is not JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))."),
        (json.dumps({"model_type": "no_such_model"}), "its config.json's model_type 'no_such_model' is not one transformers"),
    ],
    ids=["not_json", "unknown_model_type"],
)
def test_model_folder_with_a_bad_config(compose_cfg, tmp_path: Path, config: str, message: str) -> None:
    """One sentence, not transformers' traceback and its paragraph on upgrading transformers."""
    folder = tmp_path / "model"
    folder.mkdir()
    for name, text in (("config.json", config), ("model.safetensors", ""), ("tokenizer.json", "{}")):
        (folder / name).write_text(text)
    with pytest.raises(ConfigError, match=_re(f"model folder {folder}: {message}")):
        train(compose_cfg([f"model.name_or_path={folder}"]))
