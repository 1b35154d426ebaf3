"""Streamed compression (src.pipeline.stream): one block at a time, the same weights as the in-memory path."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from src.export.exported import load_exported, prepare_for_export
from src.methods.refit import CHUNK
from src.models import mlp_io
from src.models.build import build_model
from src.models.shards import ShardReader, skeleton
from src.pipeline.calibration import Calibrator
from src.pipeline.fuse import compress_model
from src.pipeline.settings import CalibSettings, CompressionSettings
from src.pipeline.stream import PROGRESS, compress_streamed, memory_model
from src.utils.errors import ConfigError
from tests.conftest import compress_fn


def _folder(compose_cfg, name: str, tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = build_model(compose_cfg([f"model={name}"]).model, "generation")
    folder = tmp_path / "src"
    # the module tree's names (transformers 5 would rename MoE experts to the original per-expert format)
    model.save_pretrained(folder, max_shard_size="200KB", save_original_format=False)
    return folder


def _batches(vocab: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(2):
        mask = (torch.arange(12) < torch.randint(5, 13, (4, 1), generator=g)).long()
        out.append({"input_ids": torch.randint(1, vocab, (4, 12), generator=g), "attention_mask": mask})
    return out


def _settings(method: str, layers: list[int], width: int, refit: str) -> CompressionSettings:
    calib = CalibSettings(size=8, sequential=True) if refit != "none" or method == "wanda_sp" else CalibSettings()
    return CompressionSettings.of(compress_fn(method), layers, width, name=method, refit=refit, calib=calib)


def _in_memory(folder: Path, settings: CompressionSettings, batches):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    report = compress_model(model, settings, calibrator=Calibrator(batches) if settings.needs_calibration else None)
    prepare_for_export(model)
    return model.state_dict(), report


@pytest.mark.parametrize("name,method,refit", [
    ("tiny_llama", "wanda_sp", "lstsq"),
    ("tiny_llama", "prune", "none"),
    ("tiny_gemma3", "wanda_sp", "lstsq"),  # sliding and full attention layers: each block's own mask
    ("tiny_gpt2", "wanda_sp", "lstsq"),
    ("tiny_qwen3_moe", "prune", "lstsq"),
])
def test_streamed_equals_in_memory(compose_cfg, tmp_path: Path, name: str, method: str, refit: str) -> None:
    folder = _folder(compose_cfg, name, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    layers = list(range(1, mlp_io.num_layers(skeleton(AutoModelForCausalLM, folder))))
    width = 8
    settings = _settings(method, layers, width, refit)
    batches = _batches(config["vocab_size"])
    report = compress_streamed(folder, AutoModelForCausalLM, settings, tmp_path / "out", batches=batches)
    want, want_report = _in_memory(folder, settings, batches)
    got = load_exported(tmp_path / "out", AutoModelForCausalLM).state_dict()
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5, msg=k)
    assert (report.params_before, report.params_after) == (want_report.params_before, want_report.params_after)
    assert report.params_after < report.params_before
    assert report.spec["layers"] == layers and not (tmp_path / ".out.partial").exists()


@pytest.mark.parametrize("allocation", ["error", "flap"])
def test_a_budget_streams_in_two_passes_and_allocates_as_in_memory(compose_cfg, tmp_path: Path, allocation: str) -> None:
    """ffn_mode.budget streamed: a first pass over the original blocks gathers each chosen layer's evidence (error
    curves, or FLAP's neuron scores ranked over layers), then the blocks are compressed at the widths it allocates:
    the widths and weights of the in-memory path; a resumed run reads the widths from its progress."""
    folder = _folder(compose_cfg, "tiny_llama", tmp_path)
    settings = dataclasses.replace(_settings("wanda_sp", [1, 2, 3], 8, "lstsq"), budget=0.5, allocation=allocation)
    batches = _batches(100)
    report = compress_streamed(folder, AutoModelForCausalLM, settings, tmp_path / "out", batches=batches)
    want, want_report = _in_memory(folder, settings, batches)
    assert report.spec["widths"] == want_report.spec["widths"] and sum(report.spec["widths"].values()) == 96  # half of 3 x 64
    got = load_exported(tmp_path / "out", AutoModelForCausalLM).state_dict()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5, msg=k)
    if allocation == "flap":  # killed in the second pass: the widths are in the progress, and the rerun does not allocate again
        import src.pipeline.stream as stream

        partial = tmp_path / ".again.partial"

        def dying(module):
            if (partial / PROGRESS).is_file() and json.loads((partial / PROGRESS).read_text())["done"]:
                raise KeyboardInterrupt
            real(module)

        real = stream.release
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(stream, "release", dying)
            with pytest.raises(KeyboardInterrupt):
                compress_streamed(folder, AutoModelForCausalLM, settings, tmp_path / "again", batches=batches)
        assert json.loads((partial / PROGRESS).read_text())["widths"] == {str(k): v for k, v in report.spec["widths"].items()}
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(stream, "_budget_pass", lambda *a: pytest.fail("the widths were allocated again"))
            compress_streamed(folder, AutoModelForCausalLM, settings, tmp_path / "again", batches=batches)
        for f in (tmp_path / "out").iterdir():
            assert (tmp_path / "again" / f.name).read_bytes() == f.read_bytes(), f.name


def test_a_killed_run_resumes_with_the_same_files(compose_cfg, tmp_path: Path, monkeypatch) -> None:
    folder = _folder(compose_cfg, "tiny_llama", tmp_path)
    settings = _settings("wanda_sp", [1, 2, 3], 8, "lstsq")
    batches = _batches(100)
    compress_streamed(folder, AutoModelForCausalLM, settings, tmp_path / "whole", batches=batches)

    import src.pipeline.stream as stream

    real, partial = stream.release, tmp_path / ".out.partial"

    def dying(module):  # killed while the third block is dropped: two blocks recorded finished
        if (partial / PROGRESS).is_file() and len(json.loads((partial / PROGRESS).read_text())["done"]) == 3:
            raise KeyboardInterrupt
        real(module)

    monkeypatch.setattr(stream, "release", dying)
    with pytest.raises(KeyboardInterrupt):
        compress_streamed(folder, AutoModelForCausalLM, settings, tmp_path / "out", batches=batches)
    assert not (tmp_path / "out").exists()
    assert len(json.loads((partial / PROGRESS).read_text())["done"]) == 3
    monkeypatch.setattr(stream, "release", real)
    compress_streamed(folder, AutoModelForCausalLM, settings, tmp_path / "out", batches=batches)
    files = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "out").iterdir())
    for f in files:
        assert (tmp_path / "whole" / f).read_bytes() == (tmp_path / "out" / f).read_bytes(), f


def test_refusals(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match="pickle files"):
        ShardReader(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(ConfigError, match="names 1 file"):
        ShardReader(tmp_path)


def test_memory_model_counts_one_block_not_the_model(compose_cfg) -> None:
    config = build_model(compose_cfg(["model=tiny_llama"]).model, "generation").config
    model = skeleton(AutoModelForCausalLM, config)
    parts = memory_model(model, calib_tokens=100, padded_tokens=128, width=16, refit=True)
    assert parts["block"] == sum(t.numel() for t in mlp_io.block_module(model, 0).parameters()) * 4
    h = config.hidden_size
    assert parts["refit"] == (100 * 16 + 100 * (16 + h) // 5) * 4 + (2 * CHUNK * (16 + h) + 2 * 16 * 16 + 2 * 16 * h) * 8
    config.num_hidden_layers *= 4  # four times the blocks: the same peak
    assert memory_model(skeleton(AutoModelForCausalLM, config), calib_tokens=100, padded_tokens=128, width=16, refit=True) == parts


@pytest.mark.slow
def test_the_benchmark_streams_a_written_model_and_records_its_peak(tmp_path: Path) -> None:
    """bench.stream end to end on Llama 3.2 1B's shape (16 blocks of hidden 2048, 2.5 GB in bf16; about 14 min on 2 cores):
    the model written once in bf16, compressed streamed with the SmolLM2 defaults' method in a child process, the
    record read back; the peak stays under the model's own size in float32 (4.9 GiB): one block at a time."""
    from bench import stream as bench_stream

    assert bench_stream.main(["--shape", "1b", "--dir", str(tmp_path / "m"), "--out", str(tmp_path / "r")]) == 0
    rec = json.loads((tmp_path / "r" / "1b.json").read_text())
    assert rec["write_seconds"] > 0 and 0 < rec["peak_rss_gib"] < rec["model_bytes_bf16"] * 2 / 2**30 and rec["predicted_peak_gib"] > 0
    assert len(rec["seconds_per_block"]["compressed"]) == 11 and len(rec["seconds_per_block"]["copied"]) == 5  # the top two thirds of 16
    assert (tmp_path / "m" / "1b-compressed" / "model.safetensors.index.json").is_file()
