"""Layer-wise distillation (distill=hidden_mse): the loss falls, and only the compressed MLPs change."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import lightning as L
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from src.builders import build_callbacks
from src.preflight import preflight
from src.callbacks.distill import DistillCallback, HiddenStateDistillation, hidden_mse
from src.models import mlp_io
from src.models.build import build_model
from src.train import train
from src.utils.errors import ConfigError
from tests.conftest import ROOT, run_cli

DISTILL = ["model=tiny_bert", "ffn_mode=ntk_cluster", "ffn_mode.layers=[1,3]", "ffn_mode.mid_dim=16", "distill=hidden_mse",
           "distill.lr=1e-3", "distill.epochs=2", "distill.log_every_n_steps=1", "approx_metrics.enabled=false"]


class Snapshots(L.Callback):
    """Placed after the distillation and fusion callbacks: records the weights after compression
    (``setup``) and after distillation (``on_fit_start``), and the state fine-tuning starts from."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.compressed = copy.deepcopy(pl_module.model.state_dict())

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = pl_module.model
        self.distilled = copy.deepcopy(model.state_dict())
        self.all_trainable = all(p.requires_grad for p in model.parameters())
        self.all_train_mode = all(m.training for m in model.modules())
        self.tuned = {n for i in (1, 3) for n in mlp_io.mlp_param_names(model, i)}


def test_distillation_tunes_only_the_compressed_mlps(compose_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = compose_cfg(DISTILL)
    snap, built = Snapshots(), {}

    def callbacks(*args):
        built["list"] = [*build_callbacks(*args), snap]
        return built["list"]

    monkeypatch.setattr("src.train.build_callbacks", callbacks)
    train(cfg)
    distill = next(cb for cb in built["list"] if isinstance(cb, DistillCallback))
    names = [type(cb).__name__ for cb in built["list"]]
    assert names.index("DistillCallback") < names.index("FusionCallback")  # the teacher is copied before compression

    h = distill.history
    assert len(h) == 8  # 2 epochs x 32 samples / batch 8
    assert sum(h[-2:]) < 0.8 * sum(h[:2]), h
    changed = {k for k in snap.distilled if not torch.equal(snap.distilled[k], snap.compressed[k])}
    assert changed == snap.tuned  # every compressed MLP weight moved, nothing else did (buffers included)
    assert snap.all_trainable and snap.all_train_mode  # fine-tuning starts as it would have without the stage
    assert distill.teacher is None  # freed

    res = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
    assert res["status"] == "completed" and res["metrics"]["distill/loss_end"] < res["metrics"]["distill/loss_start"]
    logged = pd.read_csv(Path(cfg.paths.output_dir) / "metrics.csv")["distill/loss"].dropna()
    assert len(logged) == 8 and logged.iloc[-1] < logged.iloc[0]


def test_resumed_run_is_not_distilled_again(compose_cfg) -> None:
    first = train(compose_cfg([*DISTILL, "trainer.max_steps=2"]))
    assert first["distill/steps"] == 8
    resumed = train(compose_cfg([*DISTILL, "trainer.max_steps=3", "ckpt_path=last"]))
    assert not any(k.startswith("distill/") for k in resumed)  # the checkpoint's weights are distilled already


@pytest.mark.filterwarnings(r"ignore:.*module\(s\) in eval mode")
@pytest.mark.parametrize("name", ["tiny_gpt2", "tiny_llama"])
def test_stage_on_causal_lms(compose_cfg, name: str) -> None:
    """The stage itself on generation models (GPT-2's Conv1D MLPs, Llama's gated ones): a perturbed
    layer learns its way back to the teacher; the labels of the batches are ignored."""
    cfg = compose_cfg([f"model={name}"])
    model = build_model(cfg.model, "generation")
    teacher = copy.deepcopy(model.base_model)
    tuned = set(mlp_io.mlp_param_names(model, 2))
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.requires_grad_(n in tuned)
            if n in tuned:
                p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(5, 1000, (16, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[::2, 8:] = 0  # right padding
    data = [{"input_ids": i, "attention_mask": m, "labels": torch.full_like(i, -100)} for i, m in zip(ids, mask)]
    stage = HiddenStateDistillation(model.base_model, teacher, lr=3e-3)
    L.Trainer(max_epochs=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(stage, DataLoader(data, batch_size=8))
    losses = [float(x) for x in stage.losses]
    assert losses[-1] < 0.5 * losses[0], losses


def test_hidden_mse_ignores_padding() -> None:
    s = [torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)]
    t = [torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)]
    t[1][0, 2] = 100.0  # only on a padded position
    t[0][1, 0, 0] = 2.0  # a real token of layer 0: squared distance 4, one of 5 tokens, one of 2 layers
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert hidden_mse(tuple(s), tuple(t), mask).item() == pytest.approx(4 / 5 / 2)


def test_refused_without_compression(compose_cfg) -> None:
    with pytest.raises(ConfigError, match=r"distill=hidden_mse.*ffn_mode=none"):
        preflight(compose_cfg(["model=tiny_bert", "ffn_mode=none", "distill=hidden_mse"]))
    with pytest.raises(ConfigError, match=r"distill\.epochs=0"):
        preflight(compose_cfg([*DISTILL, "distill.epochs=0"]))


@pytest.mark.slow
def test_distillation_under_ddp(tmp_path: Path) -> None:
    """trainer=ddp_sim (2 CPU processes): the stage joins the run's process group and completes."""
    out = tmp_path / "run"
    proc = run_cli("src.train", *DISTILL, "trainer=ddp_sim", "trainer.max_steps=2", "task.max_train_samples=32",
                   "task.max_eval_samples=16", "task.batch_size=8", "task.max_seq_length=32", f"hydra.run.dir={out}",
                   f"paths.cache_dir={tmp_path / 'cache'}", cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "completed" and res["metrics"]["distill/steps"] == 4  # 32 samples / 2 ranks / 8, x 2 epochs
    assert res["metrics"]["distill/loss_end"] < res["metrics"]["distill/loss_start"]
    assert "distill step" in (out / "train.log").read_text()


@pytest.mark.slow
def test_minilm_rt_experiment_with_distillation(compose_cfg) -> None:
    cfg = compose_cfg(["experiment=minilm_rt", "distill=hidden_mse", "distill.max_steps=10", "task.max_train_samples=320"])
    metrics = train(cfg)
    assert metrics["distill/steps"] == 10 and metrics["distill/loss_end"] < metrics["distill/loss_start"]
    assert "test/acc" in metrics


@pytest.mark.slow
def test_generation_with_distillation(compose_cfg) -> None:
    """A causal LM (GPT-2's Conv1D MLPs) on the offline generation task: distillation, then fine-tuning."""
    cfg = compose_cfg([*DISTILL, "model=tiny_gpt2", "task=rt_review", "task.max_new_tokens=4", "task.max_eval_samples=4"])
    metrics = train(cfg)
    assert metrics["distill/loss_end"] < metrics["distill/loss_start"] and "test/ppl" in metrics
