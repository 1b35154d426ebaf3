"""LoRA recovery (finetune=lora) and lm-evaluation-harness (src.evaluation, src.evaluate) on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from peft.tuners.lora import LoraLayer, ParamWrapper
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from src.builders import read_checkpoint, restore_module
from src.export.exported import load_exported
from src.models.replacements import ExpertLowRank, LowRankLinear, ScaledLinear
from src.train import train
from src.utils.errors import ConfigError
from tests.conftest import CONF

IDS = torch.randint(1000, 20000, (2, 9), generator=torch.Generator().manual_seed(1))
LORA = ["finetune=lora", "approx_metrics.enabled=false", "test=false"]


def _evaluate_cfg(overrides: list[str]):
    """conf/evaluate.yaml with ``overrides`` (it has no run folder, unlike the train config the fixture composes)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        return compose("evaluate", overrides=overrides)


@pytest.mark.parametrize("model, method", [("tiny_llama", "ntk_cluster"), ("tiny_llama", "svd"), ("tiny_gpt2", "ntk_cluster"),
                                           ("tiny_mixtral", "ntk_cluster"), ("tiny_mixtral", "svd"), ("tiny_gpt_oss", "ntk_cluster")])
def test_lora_trains_only_adapters_resumes_and_exports_merged(compose_cfg, tmp_path: Path, model: str, method: str) -> None:
    """Only the adapters change (the compressed base, count scales folded, stays as compression left it); the run
    resumes with them; the merged export computes what the adapted model computes. MoE: the fused experts' 3-D
    weights are adapted too (Mixtral [E, out, in]; gpt-oss transposed, gate/up interleaved, with biases), svd-factored
    ones are not."""
    from src.export.__main__ import export

    common = [f"model={model}", "task=rt_review", f"ffn_mode={method}", "ffn_mode.layers=[1,2]", *LORA]
    cfg = compose_cfg([*common, "trainer.max_steps=2"])
    train(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    first = read_checkpoint(ckpt)
    train(compose_cfg([*common, "trainer.max_steps=3", "ckpt_path=last"]))
    last = read_checkpoint(ckpt)
    assert last["global_step"] == 3
    state0, state = first["state_dict"], last["state_dict"]
    lora = [k for k in state if "lora_" in k]
    assert lora and all(torch.equal(state0[k], state[k]) for k in state if "lora_" not in k)  # the base is frozen
    assert all(state0[k].abs().sum() > 0 for k in lora if "lora_B" in k)  # the adapters trained (B starts at zero)
    module = restore_module(last)
    kinds = {type(m.base_layer) for m in module.model.modules() if isinstance(m, LoraLayer) and not isinstance(m, ParamWrapper)}
    experts = {(int(n.split(".layers.")[1].split(".")[0]), m.parameter_name) for n, m in module.model.named_modules() if isinstance(m, ParamWrapper)}
    moe = model in ("tiny_mixtral", "tiny_gpt_oss")
    adapted = [i for i in range(module.model.config.num_hidden_layers) if method != "svd" or i not in (1, 2)]  # svd-factored experts: none
    assert experts == ({(i, p) for i in adapted for p in ("gate_up_proj", "down_proj")} if moe else set())
    assert not any(isinstance(m, ScaledLinear) for m in module.model.modules())  # counts folded into the frozen base
    assert (method == "svd") == any(isinstance(m, (LowRankLinear, ExpertLowRank)) for m in module.model.modules())
    assert kinds == ({torch.nn.Linear, Conv1D} if model == "tiny_gpt2" else {torch.nn.Linear})  # GPT-2's attention: Conv1D
    with torch.no_grad():
        adapted = module.model.eval()(input_ids=IDS).logits
    loaded = load_exported(export(str(ckpt), str(tmp_path / "export"), fmt="hf"), AutoModelForCausalLM)
    assert not any("lora" in n for n, _ in loaded.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, adapted, rtol=1e-4, atol=1e-5)


def test_lora_classifier_trains_its_head_and_counts_parameters(compose_cfg, caplog: pytest.LogCaptureFixture) -> None:
    cfg = compose_cfg(["model=tiny_bert", *LORA, "trainer.max_steps=1"])
    with caplog.at_level("INFO", logger="src.modules.lora"):
        train(cfg)
    state = read_checkpoint(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")["state_dict"]
    assert any(k.startswith("model.classifier.") for k in state)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("LoRA rank 16"))
    assert "trainable parameters of" in line


def test_lora_settings_are_refused_in_one_sentence(compose_cfg) -> None:
    from src.preflight import preflight

    for override, words in (("finetune.rank=0", "finetune.rank=0 .* an integer >= 1"), ("finetune.dropout=1.5", "finetune.dropout=1.5"),
                            ("finetune.target_modules=[]", "finetune.target_modules")):
        with pytest.raises(ConfigError, match=words):
            preflight(compose_cfg(["model=tiny_llama", "task=rt_review", "finetune=lora", override]))


def test_lm_eval_offline_tasks_at_the_end_of_training_and_on_a_checkpoint(compose_cfg) -> None:
    """hamlet (two sequence lengths) and rt_verdict, before and after training: eval[_before]/<task>/<metric> in
    results.json and the CSV; src.evaluate on the checkpoint gives the same numbers and merges them into the run's
    results.json."""
    from src.evaluate import evaluate

    lm = ["lm_eval.enabled=true", "lm_eval.before=true", "lm_eval.limit={hamlet:1,rt_verdict:4}", "lm_eval.seq_lens=[32,64]",
          "lm_eval.batch_size=16"]
    cfg = compose_cfg(["model=tiny_llama", "task=rt_review", *LORA, "trainer.max_steps=1", *lm])
    metrics = train(cfg)
    run = Path(cfg.paths.output_dir)
    keys = {f"eval/hamlet_{n}/{m}" for n in (32, 64) for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")}
    keys |= {"eval/rt_verdict/acc", "eval/rt_verdict/acc_norm"}
    assert keys <= set(metrics) and keys <= set(json.loads((run / "results.json").read_text())["metrics"])
    assert {k.replace("eval/", "eval_before/") for k in keys} <= set(metrics)
    assert "eval/rt_verdict/acc" in (run / "metrics.csv").read_text().splitlines()[0]
    assert metrics["eval/hamlet_32/word_perplexity"] > 1 and 0 <= metrics["eval/rt_verdict/acc"] <= 1
    again = evaluate(_evaluate_cfg([f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", *lm[2:]]))
    assert again == pytest.approx({k: metrics[k] for k in keys}, rel=1e-5)
    assert json.loads((run / "eval.json").read_text())["metrics"] == again


def test_lm_eval_refusals_come_before_any_model_loads(compose_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    import src.evaluation
    from src.evaluate import evaluate
    from src.preflight import preflight

    monkeypatch.setattr(src.evaluation, "hub_reachable", lambda: False)
    with pytest.raises(ConfigError, match=r"lm_eval.tasks \['boolq'\] must be downloaded from the Hugging Face Hub, which is not "
                                          r"reachable here; the offline tasks are hamlet, rt_verdict\."):
        evaluate(_evaluate_cfg(["ckpt_path=/nonexistent.ckpt", "lm_eval.tasks=[hamlet,boolq]"]))
    with pytest.raises(ConfigError, match="unknown 'hellaswagg'"):
        preflight(compose_cfg(["model=tiny_llama", "task=rt_review", "lm_eval.enabled=true", "lm_eval.tasks=[hellaswagg]"]))
    with pytest.raises(ConfigError, match=r"lm_eval.limit=\{'boolq': 3\} .* a mapping of lm_eval.tasks to document counts"):
        preflight(compose_cfg(["model=tiny_llama", "task=rt_review", "lm_eval.enabled=true", "lm_eval.limit={boolq:3}"]))
    with pytest.raises(ConfigError, match="lm-evaluation-harness scores language models, and this run trains a classifier"):
        preflight(compose_cfg(["model=tiny_bert", "lm_eval.enabled=true"]))
