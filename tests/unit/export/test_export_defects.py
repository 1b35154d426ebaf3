"""What ``src.export`` and ``src.evaluate`` leave behind: no log file where they run, no temporary folder
after a failed or killed export, and an earlier export untouched by a failed one."""

from __future__ import annotations

from pathlib import Path

import pytest

from src.train import train
from tests.conftest import run_cli


@pytest.mark.parametrize(("module", "args", "refusal"), [
    ("src.export", ["ckpt_path=/nonexistent", "out=x"], "ckpt_path='/nonexistent' is not a file."),
    ("src.evaluate", ["export_dir=/nonexistent"], "export_dir='/nonexistent' is not a folder written by src.export (no export.json)."),
], ids=["export", "evaluate"])
def test_a_refused_cli_run_leaves_no_log_file_where_it_runs(tmp_path: Path, module: str, args: list[str], refusal: str) -> None:
    """Hydra's default logging opens ``<run dir>/<job>.log``, and these commands' run dir is the working folder."""
    proc = run_cli(module, *args, cwd=tmp_path)
    assert proc.returncode == 2 and refusal in proc.stdout, proc.stdout + proc.stderr
    assert not list(tmp_path.iterdir())  # no export.log / evaluate.log, nor anything else


def test_a_failed_export_leaves_no_temporary_folder_and_the_earlier_export_untouched(
        compose_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The next export also removes what a killed one left (a SIGKILL skips ``atomic_dir``'s cleanup), and only that."""
    import src.export.__main__ as export_cli

    cfg = compose_cfg(["model=tiny_llama", "task=rt_review", "approx_metrics.enabled=false", "trainer.max_steps=1", "test=false"])
    train(cfg)
    ckpt = str(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")
    out = export_cli.export(ckpt, str(tmp_path / "out"), fmt="hf")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for killed in (".out.k1lled00.tmp", ".out.k1lled01.old", ".out.v2.abc12345.tmp"):  # the last: another folder's (out.v2)
        (tmp_path / killed / "out").mkdir(parents=True)
        (tmp_path / killed / "out" / "model.safetensors").write_bytes(b"half")

    def half(model, path: Path, samples) -> tuple:
        path.write_bytes(b"half an ONNX file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_cli, "export_onnx", half)
    with pytest.raises(OSError, match="No space left on device"):
        export_cli.export(ckpt, str(out), fmt="both")
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == [".out.v2.abc12345.tmp"]


def test_sigterm_during_export_or_evaluate_says_what_was_kept(compose_cfg, tmp_path: Path) -> None:
    """SIGTERM (a scheduler's stop) once the export's temporary folder holds the weights, and while lm-eval runs: one line
    each saying what stopped and what was kept, exit code 143 (128 + SIGTERM), no traceback; the export's temporary
    folder is removed and the earlier export there untouched, and the evaluation writes neither eval.json nor results.json."""
    import src.export.__main__ as export_cli

    cfg = compose_cfg(["model=tiny_llama", "task=rt_review", "approx_metrics.enabled=false", "trainer.max_steps=1", "test=false"])
    train(cfg)
    run = Path(cfg.paths.output_dir)
    ckpt = str(run / "checkpoints" / "last.ckpt")
    exports = tmp_path / "exports"
    out = export_cli.export(ckpt, str(exports / "out"), fmt="hf")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    proc = run_cli("tests.signals", "src.export.exported:export_onnx", "src.export", f"ckpt_path={ckpt}", f"out={out}", "format=both", cwd=exports)
    said = [line for line in proc.stdout.splitlines() if "SIGTERM received" in line]
    assert proc.returncode == 143 and "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert len(said) == 1 and said[0].endswith(f"SIGTERM received: the export to {out} stopped: nothing was written there (an earlier "
                                               "export in it is kept) and its temporary folder was removed.")
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in exports.iterdir()) == ["out"]  # no .out.<random>.tmp, no log file
    results = (run / "results.json").read_text()
    proc = run_cli("tests.signals", "src.evaluation:lm_eval", "src.evaluate", f"ckpt_path={ckpt}", "lm_eval.tasks=[rt_verdict]", "lm_eval.limit=2", cwd=exports)
    said = [line for line in proc.stdout.splitlines() if "SIGTERM received" in line]
    assert proc.returncode == 143 and "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert len(said) == 1 and said[0].endswith("SIGTERM received: src.evaluate stopped before writing its metrics; eval.json and "
                                               "results.json are as they were.")
    assert not (run / "eval.json").exists() and (run / "results.json").read_text() == results


def test_a_stop_between_the_renames_puts_the_earlier_folder_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``atomic_dir`` moves the earlier folder aside, then renames the new one in; a signal between the two leaves the earlier one."""
    import os

    import src.utils.io
    from src.utils.config import Interrupted
    from src.utils.io import atomic_dir

    folder = tmp_path / "out"
    with atomic_dir(folder) as tmp:
        (tmp / "model.safetensors").write_text("earlier")
    real, calls = os.replace, []

    def stopped_at_the_second(src: object, dst: object) -> None:
        calls.append(dst)
        if len(calls) == 2:
            raise Interrupted(15)
        real(src, dst)

    monkeypatch.setattr(src.utils.io.os, "replace", stopped_at_the_second)
    with pytest.raises(Interrupted), atomic_dir(folder, overwrite=True) as tmp:
        (tmp / "model.safetensors").write_text("new")
    assert (folder / "model.safetensors").read_text() == "earlier" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
