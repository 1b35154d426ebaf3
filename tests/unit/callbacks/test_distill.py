"""Layer-wise distillation (distill=hidden_mse): the loss falls, and only the compressed MLPs change."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import lightning as L
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from src.builders import build_callbacks
from src.callbacks.distill import DistillCallback, HiddenStateDistillation, hidden_mse
from src.models import mlp_io
from src.models.build import build_model
from src.preflight import preflight
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


# distill=logits (src/callbacks/logit_distill.py): a random tiny Llama with larger weights than its default
# (initializer_range 0.3, not 0.02), whose next-token distributions are peaked enough for a KL of about 1
LOGITS = ["model=tiny_llama", "+model.config.initializer_range=0.3", "task=rt_review", "distill=logits", "ffn_mode.layers=[1,2]",
          "approx_metrics.enabled=false", "test=false", "trainer.log_every_n_steps=1", "optim.lr=3e-3"]


class Original(L.Callback):
    """Placed first: the model's weights before any callback's setup (the uncompressed original, freshly loaded)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.state = copy.deepcopy(pl_module.model.state_dict())


class TeacherProbe(L.Callback):
    """Placed last: the teacher's weights, modes and gradients, and its KL to the student on one fixed training
    batch (the student in eval mode: no LoRA dropout), when the fit starts and when training ends."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.batch = next(iter(trainer.datamodule.train_dataloader()))
        self.start, self.kl_start = copy.deepcopy(pl_module.distiller.teacher.state_dict()), self._kl(pl_module)
        self.dtypes = {p.dtype for p in pl_module.distiller.teacher.parameters()}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        teacher = pl_module.distiller.teacher
        self.end, self.kl_end = copy.deepcopy(teacher.state_dict()), self._kl(pl_module)
        self.frozen = not any(p.requires_grad or p.grad is not None for p in teacher.parameters())
        self.eval_mode = not any(m.training for m in teacher.modules())
        self.student_keys = set(pl_module.state_dict())

    def _kl(self, pl_module: L.LightningModule) -> float:
        pl_module.eval()
        with torch.no_grad():
            kl = float(pl_module.distiller.terms(pl_module, self.batch)[0]["distill_kl"])
        pl_module.train()
        return kl


def _train_logits(compose_cfg, monkeypatch: pytest.MonkeyPatch, overrides: list[str]) -> tuple[dict, Original, TeacherProbe, list]:
    original, probe, built = Original(), TeacherProbe(), {}

    def callbacks(*args):
        built["list"] = [original, *build_callbacks(*args), probe]
        return built["list"]

    monkeypatch.setattr("src.train.build_callbacks", callbacks)
    return train(compose_cfg([*LOGITS, *overrides])), original, probe, built["list"]


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_logits_distillation_brings_the_student_towards_a_frozen_teacher(compose_cfg, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                        finetune: str) -> None:
    """Eight steps: the student's KL to the teacher falls on a fixed batch, the teacher (the uncompressed
    original, no LoRA adapters) never changes, stays frozen in eval mode, and is dropped after the fit; the
    terms and the teacher's cost are logged."""
    from src.callbacks.logit_distill import LogitDistillCallback

    overrides = [f"finetune={finetune}", "trainer.max_steps=8", "task.max_train_samples=64"]
    metrics, original, probe, callbacks = _train_logits(compose_cfg, monkeypatch, overrides)
    names = [type(cb).__name__ for cb in callbacks]
    assert names.index("LogitDistillCallback") < names.index("FusionCallback")
    assert probe.kl_end < 0.85 * probe.kl_start, (probe.kl_start, probe.kl_end)  # 1.06 -> 0.78 (full), 0.83 (lora)
    assert probe.start.keys() == original.state.keys() and all(torch.equal(probe.start[k], original.state[k]) for k in original.state)
    assert all(torch.equal(probe.start[k], probe.end[k]) for k in probe.start)  # unchanged by the steps
    assert probe.frozen and probe.eval_mode
    assert (finetune == "lora") == any("lora_" in k for k in probe.student_keys)  # adapters in the student only
    assert next(cb for cb in callbacks if isinstance(cb, LogitDistillCallback)).distiller is None  # freed after the fit
    logged = pd.read_csv(tmp_path / "run" / "metrics.csv")  # the run folder compose_cfg sets
    assert len(logged["train/distill_kl"].dropna()) == 8 and len(logged["train/task_loss"].dropna()) == 8
    assert metrics["perf/teacher_s"] > 0 and metrics["perf/teacher_mb"] > 0 and metrics["train/loss"] == pytest.approx(metrics["train/distill_kl"])


def test_logits_teacher_is_not_checkpointed_and_a_resumed_run_has_the_original(compose_cfg, monkeypatch: pytest.MonkeyPatch,
                                                                               tmp_path: Path) -> None:
    """The checkpoint holds the compressed student's state only; resumed from it, the run's teacher is again the
    uncompressed original (copied before the fusion callback rebuilds the checkpoint's structure), not the student."""
    from src.builders import read_checkpoint

    _, original, first, _ = _train_logits(compose_cfg, monkeypatch, ["trainer.max_steps=2"])
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"  # in the run folder compose_cfg sets
    ckpt = read_checkpoint(last)
    assert set(ckpt["state_dict"]) == first.student_keys and not any("teacher" in k or "distiller" in k for k in ckpt["state_dict"])
    _, reloaded, resumed, _ = _train_logits(compose_cfg, monkeypatch, ["trainer.max_steps=3", "ckpt_path=last"])
    assert read_checkpoint(last)["global_step"] == 3
    assert resumed.start.keys() == original.state.keys() and all(torch.equal(resumed.start[k], original.state[k]) for k in original.state)
    assert all(torch.equal(reloaded.state[k], original.state[k]) for k in original.state)  # the same original, loaded again
    up = "model.model.layers.1.mlp.up_proj.weight"
    assert resumed.start[up[len("model."):]].shape == (64, 32) and ckpt["state_dict"][up].shape == (16, 32)  # teacher full, student compressed


@pytest.mark.parametrize("precision, dtype", [("bf16-true", torch.bfloat16), ("bf16-mixed", torch.float32)])
def test_logits_teacher_is_in_the_training_dtype(compose_cfg, monkeypatch: pytest.MonkeyPatch, precision: str, dtype: torch.dtype) -> None:
    """bf16-true converts the student after the teacher was copied: the teacher follows; the mixed precision keeps
    float32 weights for both (the step's autocast runs them in bfloat16)."""
    metrics, _, probe, _ = _train_logits(compose_cfg, monkeypatch, [f"trainer.precision={precision}", "trainer.max_steps=1"])
    assert probe.dtypes == {dtype} and math.isfinite(metrics["train/distill_kl"])


@pytest.mark.slow
def test_logits_distillation_under_ddp(tmp_path: Path) -> None:
    """trainer=ddp_sim (2 CPU processes): every rank copies its own teacher before rank zero compresses; the run completes."""
    out = tmp_path / "run"
    proc = run_cli("src.train", *LOGITS, "trainer=ddp_sim", "trainer.max_steps=2", "task.max_train_samples=32", "task.max_eval_samples=8",
                   "task.batch_size=8", "task.max_seq_length=32", "trainer.limit_val_batches=1", f"hydra.run.dir={out}",
                   f"paths.cache_dir={tmp_path / 'cache'}", cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "completed" and res["distill"] == "logits" and res["metrics"]["perf/teacher_mb"] > 0
    assert len(pd.read_csv(out / "metrics.csv")["train/distill_kl"].dropna()) == 2


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
@pytest.mark.parametrize("top_k, checkpointing", [(None, False), (5, False), (None, True), (5, True)])
def test_logits_loss_is_the_formula(compose_cfg, top_k: int | None, checkpointing: bool) -> None:
    """The module's training step on a hand-made batch (padding, targets in two spans) equals the documented
    loss computed from the full logits: 0.3 CE + 0.7 T² KL (T = 2; top_k: the KL over the teacher's top 5,
    both renormalised) + 0.5 hidden MSE at blocks 1 and 3; with checkpointing, in chunks of 4 positions."""
    import torch.nn.functional as F

    from src.callbacks.logit_distill import LogitDistiller
    from src.modules.causal_lm import CausalLMModule

    cfg = compose_cfg([*LOGITS, f"model.gradient_checkpointing={str(checkpointing).lower()}"])
    torch.manual_seed(0)
    module = CausalLMModule(cfg.model, cfg.task, cfg.optim).train()
    module.head_chunk = 4  # 13 target positions: 4 chunks
    teacher = copy.deepcopy(module.model)
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(5, 1000, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    labels = torch.full_like(ids, -100)
    labels[0, 3:7], labels[1, 5:], labels[2, 1:5] = ids[0, 3:7], ids[1, 5:], ids[2, 1:5]
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    T = 2.0
    module.distiller = LogitDistiller(teacher, temperature=T, kl_weight=0.7, task_weight=0.3, top_k=top_k, hidden_layers=[1, 3], hidden_weight=0.5)
    loss = module.training_step(batch, 0)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters()) and module.model.get_input_embeddings().weight.grad is not None

    with torch.no_grad():
        s, t = (m.eval()(input_ids=ids, attention_mask=mask, output_hidden_states=True) for m in (module.model, teacher))
    keep = labels[:, 1:] != -100
    s_logits, t_logits, y = s.logits[:, :-1][keep], t.logits[:, :-1][keep], labels[:, 1:][keep]  # [13, V]
    ce = F.cross_entropy(s_logits, y)
    if top_k:
        t_logits, idx = t_logits.topk(top_k, dim=-1)
        s_logits = s_logits.gather(-1, idx)
    kl = F.kl_div(F.log_softmax(s_logits / T, -1), F.log_softmax(t_logits / T, -1), log_target=True, reduction="batchmean")
    m = mask.bool()
    hidden = sum(((s.hidden_states[i + 1] - t.hidden_states[i + 1]) ** 2).sum(-1)[m].mean() for i in (1, 3)) / 2
    assert kl > 0.01 and hidden > 0.01
    torch.testing.assert_close(loss.detach(), 0.3 * ce + 0.7 * T**2 * kl + 0.5 * hidden, rtol=1e-4, atol=1e-6)
