"""The ffn_mode config group is the one method registry: a new method is a function and a YAML file."""

from __future__ import annotations

import functools
import importlib
import json
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from src.methods import cluster, ntk_cluster
from src.methods.common import check_mid_dim, mlp_from_points, sub_mlp_points
from src.methods.method import Method
from src.methods.types import FusedMLP, MLPWeights, OptionError
from src.train import train
from src.utils.config import ffn_modes
from src.utils.errors import ConfigError
from tests.conftest import METHODS, ROOT, compose_with_searchpath, compress_fn


def test_methods_are_discovered_from_the_config_group() -> None:
    stems = sorted(p.stem for p in (ROOT / "conf" / "ffn_mode").glob("*.yaml") if not p.stem.startswith("_"))
    assert ffn_modes() == stems and "none" in stems and "ntk_cluster" in METHODS
    for method in METHODS:  # each names a pure function in src/methods/<method>.py
        target = (ROOT / "conf" / "ffn_mode" / f"{method}.yaml").read_text().split("_target_: ")[1].split()[0]
        assert target == f"src.methods.{method}.compress"
        assert callable(importlib.import_module(f"src.methods.{method}").compress)


# ---- a method added from outside the project: this module (VERSION, compress, check), one YAML file in a config dir ----

VERSION = "1"


def check(width: int, mid_dim: int, *, stride: int = 1, **_: object) -> None:
    if stride < 1:
        raise OptionError("stride", stride, "must be at least 1.")


@torch.no_grad()
def compress(w: MLPWeights, mid_dim: int, *, seed: int, stride: int = 1) -> FusedMLP:
    """Keep every ``stride``-th sub-MLP, the first ``mid_dim`` of them."""
    check_mid_dim(w, mid_dim)
    check(w.width, mid_dim, stride=stride)
    return FusedMLP(mlp_from_points(sub_mlp_points(w)[::stride][:mid_dim], w))


YAML = """defaults:
  - _base
  - _self_
name: every_other
stride: 2
compress:
  _target_: tests.contracts.test_registry.compress
  _partial_: true
  stride: ${..stride}
"""


def test_a_methods_contract_is_read_from_its_module() -> None:
    """``Method`` reads VERSION, check, needs_calibration and whether compress takes ``calib`` from the module
    its compress function lives in (cluster shares ntk_cluster's check)."""
    plain = Method.of(compress_fn("cluster"), "cluster")
    assert (plain.version, plain.check, plain.takes_calib, plain.needs_calibration) == (cluster.VERSION, ntk_cluster.check, True, False)
    assert Method.of(functools.partial(cluster.compress, weighting="activation")).needs_calibration
    ours = Method.of(functools.partial(compress, stride=2))  # this module's method
    assert (ours.name, ours.version, ours.check, ours.takes_calib, ours.needs_calibration) == ("test_registry", "1", check, False, False)
    assert dict(ours.options) == {"stride": 2}
    with pytest.raises(OptionError, match="stride=0 must be at least 1"):
        Method.of(functools.partial(compress, stride=0)).validate(64, 16, calib_size=0)


@pytest.fixture
def extra_conf(tmp_path: Path) -> Path:
    (tmp_path / "conf" / "ffn_mode").mkdir(parents=True)
    (tmp_path / "conf" / "ffn_mode" / "every_other.yaml").write_text(YAML)
    return tmp_path / "conf"


def _compose(extra: Path, tmp_path: Path, overrides: list[str]):
    return compose_with_searchpath(extra, tmp_path, ["model=tiny_bert", "ffn_mode=every_other", *overrides])


def test_a_new_method_is_one_function_and_one_yaml(extra_conf: Path, tmp_path: Path) -> None:
    cfg, listed = _compose(extra_conf, tmp_path, ["approx_metrics.probe_size=4"])
    assert "every_other" in listed
    metrics = train(cfg)
    assert metrics["fusion/params_after"] < metrics["fusion/params_before"] and "fusion/ntk_sign_rel_err" in metrics
    assert json.loads((tmp_path / "run" / "results.json").read_text())["ffn_mode"] == "every_other"
    GlobalHydra.instance().clear()


def test_a_new_methods_check_hook_refuses_before_loading(extra_conf: Path, tmp_path: Path) -> None:
    cfg, _ = _compose(extra_conf, tmp_path, ["ffn_mode.stride=0"])
    with pytest.raises(ConfigError, match=r"^ffn_mode\.stride=0 must be at least 1\.$"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()
    GlobalHydra.instance().clear()
