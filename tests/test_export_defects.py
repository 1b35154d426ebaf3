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
    import src.export

    cfg = compose_cfg(["model=tiny_llama", "task=rt_review", "approx_metrics.enabled=false", "trainer.max_steps=1", "test=false"])
    train(cfg)
    ckpt = str(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")
    out = src.export.export(ckpt, str(tmp_path / "out"), fmt="hf")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for killed in (".out.k1lled00.tmp", ".out.k1lled01.old", ".out.v2.abc12345.tmp"):  # the last: another folder's (out.v2)
        (tmp_path / killed / "out").mkdir(parents=True)
        (tmp_path / killed / "out" / "model.safetensors").write_bytes(b"half")

    def half(model, path: Path, samples) -> tuple:
        path.write_bytes(b"half an ONNX file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(src.export, "export_onnx", half)
    with pytest.raises(OSError, match="No space left on device"):
        src.export.export(ckpt, str(out), fmt="both")
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == [".out.v2.abc12345.tmp"]
