"""The sweep files of multirun_sweeps/ compose, and a tiny real sweep runs (joblib, 2 jobs) and reports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig

from src.report import build_report
from tests.conftest import CONF, FAST, ROOT, run_cli

SWEEPS = ROOT / "multirun_sweeps"


def _compose_sweep(name: str):
    """A sweep file as ``--config-dir multirun_sweeps --config-name <name>`` composes it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(SWEEPS)):
        cfg = compose(name, overrides=[f"hydra.searchpath=[file://{CONF}]"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # resolves ${hydra:...} in paths
    return cfg


@pytest.mark.parametrize(
    "name,model,launcher,runs",
    [("minilm_rt_sweep", "minilm", "BasicLauncher", 8), ("minilm_rt_methods", "minilm", "BasicLauncher", 55),
     ("minilm_rt_sweep_joblib", "minilm", "JoblibLauncher", 8),
     ("roberta_sst2_sweep", "roberta_base", "BasicLauncher", 90), ("roberta_sst2_full_ft", "roberta_base", "BasicLauncher", 5),
     ("roberta_sst2_sweep_slurm", "roberta_base", "SlurmLauncher", 90)],
)
def test_sweep_files_compose(name: str, model: str, launcher: str, runs: int) -> None:
    cfg = _compose_sweep(name)
    GlobalHydra.instance().clear()
    assert cfg.model.name == model and cfg.hydra.launcher._target_.endswith(launcher)
    n = 1
    for values in cfg.hydra.sweeper.params.values():
        n *= len(str(values).split(","))
    assert n == runs
    assert cfg.hydra.sweep.dir.endswith(f"_{name.removesuffix('_joblib').removesuffix('_slurm')}")
    if launcher == "SlurmLauncher":
        assert cfg.hydra.launcher.gpus_per_node == 1 and cfg.hydra.launcher.timeout_min > 0 and cfg.trainer.accelerator == "gpu"
    if name == "minilm_rt_methods":  # the study: every method of the registry, five seeds
        from src.utils.config import ffn_modes

        assert sorted(cfg.hydra.sweeper.params.ffn_mode.split(",")) == ffn_modes() and cfg.task.max_train_samples == 3000
    if name == "roberta_sst2_sweep":
        assert cfg.hydra.sweeper.params.seed == "42,2,4,6,8" and cfg.ffn_mode.layers == list(range(4, 12))


@pytest.fixture(scope="module", params=["minilm_rt_sweep", pytest.param("minilm_rt_sweep_joblib", marks=pytest.mark.slow)])
def tiny_sweep(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, str]:
    """The offline sweep file shrunk to tiny_bert and 2 widths, run in one process (basic launcher)
    or through the joblib launcher (2 jobs at once, in worker processes): (name, folder, output)."""
    name, tmp = request.param, tmp_path_factory.mktemp("sweep")
    proc = run_cli(  # from another working directory, with the sweep file's own hydra.sweep.dir, as a user runs it
        "src.train", "-m", "--config-dir", str(SWEEPS), "--config-name", name,
        "model=tiny_bert", "ffn_mode=ntk_cluster", "ffn_mode.layers=[2,3]", "ffn_mode.mid_dim=16,32", "seed=1", *FAST,
        "approx_metrics.probe_size=8", f"paths.cache_dir={tmp / 'cache'}", cwd=tmp, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep_dir,) = (tmp / "logs" / "multiruns").glob(f"*_{name.removesuffix('_joblib')}")
    return name, sweep_dir, proc.stdout + proc.stderr


def test_tiny_sweep_then_report(tiny_sweep: tuple[str, Path, str]) -> None:
    name, sweep_dir, output = tiny_sweep
    if name.endswith("joblib"):
        assert re.search(r"Joblib\.Parallel\(n_jobs=2.*launching 2 jobs", output)
    runs = sorted(p.parent for p in sweep_dir.glob("*/results.json"))
    assert [r.name for r in runs] == ["0_rt_polarity-tiny_bert-ntk_cluster-k16-s1", "1_rt_polarity-tiny_bert-ntk_cluster-k32-s1"]
    assert all(json.loads((r / "results.json").read_text())["status"] == "completed" for r in runs)

    table, others, _ = build_report(sweep_dir)
    assert list(table["mid_dim"]) == [16, 32] and list(table["seeds"]) == [1, 1] and others.empty
    assert table["test/acc mean"].notna().all() and table["ntk_sign_rel_err"].notna().all()
    assert (sweep_dir / "task_metric_vs_mid_dim.png").is_file() and (sweep_dir / "ntk_sign_err_vs_mid_dim.png").is_file()


def test_each_sweep_run_is_one_wandb_run_in_the_sweep_group(tiny_sweep: tuple[str, Path, str]) -> None:
    _, sweep_dir, _ = tiny_sweep
    for run in sorted(p.parent for p in sweep_dir.glob("*/results.json")):
        (wandb_file,) = (run / "wandb").glob("offline-run-*/run-*.wandb")  # this run's own offline W&B run
        assert f"sweep-{sweep_dir.name}".encode() in wandb_file.read_bytes()  # the sweep's group
