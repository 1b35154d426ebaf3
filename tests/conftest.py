"""Shared fixtures: compose the real Hydra config in-process, with the run folder under tmp_path."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from src.utils.config import ffn_modes
from src.utils.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")
# Small and quick: a tiny model, a few steps, a few samples.
FAST = ["trainer.max_steps=3", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "task.max_train_samples=32",
        "task.max_eval_samples=16", "task.batch_size=8", "task.eval_batch_size=8", "task.max_seq_length=32"]


# The compression methods, discovered from the ffn_mode config group (the one registry).
METHODS = [m for m in ffn_modes() if m != "none"]


def compress_fn(method: str) -> Callable:
    """The method's compression function with its config's options (``conf/ffn_mode/<method>.yaml``)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        return instantiate(compose("train", overrides=[f"ffn_mode={method}"]).ffn_mode.compress)


# Tiny models on a shared 2-core machine: one intra-op thread avoids oversubscription stalls.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The gpu tier runs where CUDA is visible and is skipped elsewhere (CI has no GPU)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU visible (the gpu tier: make test-gpu on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def compose_cfg(tmp_path: Path):
    """compose_cfg(overrides, config_name="train") -> a resolved-ready DictConfig writing to tmp_path."""

    def _compose(overrides: list[str], config_name: str = "train", fast: bool = True) -> DictConfig:
        GlobalHydra.instance().clear()
        with initialize_config_dir(version_base="1.3", config_dir=CONF):
            cfg = compose(config_name, overrides=[*(FAST if fast else []), *overrides], return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)
            with open_dict(cfg):
                cfg.paths.output_dir = str(tmp_path / "run")
                cfg.paths.cache_dir = str(tmp_path / "cache")
                del cfg.hydra
        return cfg

    yield _compose
    GlobalHydra.instance().clear()


def compose_with_searchpath(extra: Path, tmp_path: Path, overrides: list[str]) -> tuple[DictConfig, list[str]]:
    """The train config with ``extra`` on Hydra's search path (as ``hydra.searchpath=[file://...]`` puts it), its
    run and cache folders under ``tmp_path``; and the ffn_mode options the registry lists while it is composed."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        cfg = compose("train", overrides=[f"hydra.searchpath=[file://{extra}]", *FAST, *overrides], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        listed = ffn_modes()
    with open_dict(cfg):
        cfg.paths.output_dir, cfg.paths.cache_dir = str(tmp_path / "run"), str(tmp_path / "cache")
        del cfg.hydra
    return cfg, listed


def run_cli(module: str, *args: str, cwd: Path | None = None, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m <module> args`` as a user would; returns the completed process (text output)."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    full_env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": path, **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)


def assert_refused_before_loading(compose_cfg, monkeypatch: pytest.MonkeyPatch, overrides: list[str], message: str) -> None:
    """A run with ``overrides`` ends in the preflight's ConfigError naming ``message``, before any model loads."""
    import re

    import src.train

    monkeypatch.setattr(src.train, "build_data_and_module", lambda *a, **k: pytest.fail("a model was loaded before the check"))
    with pytest.raises(ConfigError, match=re.escape(message)):
        src.train.train(compose_cfg(overrides))


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2's tokenizer from the offline asset (dequantized once into the project's cache, as ``make train`` does): a
    byte-level BPE llama.cpp knows, for GGUF files of tiny models."""
    from src.models.build import load_tokenizer

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        cfg = compose("train", overrides=["model=smollm2"], return_hydra_config=False)
    cfg.model.cache_dir = str(Path(CONF).parent / ".cache" / "models")
    return load_tokenizer(cfg.model)
