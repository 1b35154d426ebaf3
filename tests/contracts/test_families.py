"""The tests every row of the MLP family table gets (src/models/mlp_io/families.py), on its tiny config.

The list of architectures comes from the table: a new row with a tiny config is tested without
editing this file.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from src.builders import build_callbacks, build_datamodule, build_module
from src.callbacks.fusion import FusionCallback
from src.models import mlp_io
from src.models.build import HEADS
from src.pipeline.fuse import apply_spec, compress_model
from src.pipeline.settings import CompressionSettings
from src.preflight import preflight
from src.train import train

TINY = sorted({row.tiny for row in mlp_io.FAMILIES.values() if row.tiny})
IDS = torch.randint(1000, 20000, (2, 9), generator=torch.Generator().manual_seed(1))


def test_every_row_names_a_tiny_config_or_shares_a_tested_layout() -> None:
    rows = mlp_io.FAMILIES.values()
    kind = lambda row: (row.mlp and row.mlp.name, row.experts and (row.experts.layout, row.experts.transposed, row.experts.bias))  # noqa: E731
    tested = {kind(row) for row in rows if row.tiny}
    assert all(kind(row) in tested for row in rows)
    assert all((Path(__file__).parents[2] / "conf" / "model" / f"{name}.yaml").is_file() for name in TINY)


def _module(compose_cfg, name: str, overrides: list[str] = ()) -> tuple:
    cfg = compose_cfg([f"model={name}", *_task(name), *overrides])
    checked = preflight(cfg)
    torch.manual_seed(0)
    return cfg, build_module(cfg, checked.task), checked


def _task(name: str) -> list[str]:
    return ["task=rt_polarity"] if name in ("tiny_bert", "tiny_distilbert", "tiny_t5", "tiny_switch") else ["task=rt_review"]


@torch.no_grad()
def _out(model: nn.Module) -> torch.Tensor:
    extra = {"decoder_input_ids": IDS[:, :4]} if model.config.is_encoder_decoder else {}
    return model.eval()(input_ids=IDS, **extra).logits


def _layers(model: nn.Module) -> list[int]:
    sparse = mlp_io.sparse_layers(model.config)
    return sparse or list(range(mlp_io.num_layers(model)))


@pytest.mark.parametrize("name", TINY)
def test_full_width_is_exact_and_folding_changes_nothing(compose_cfg, name: str) -> None:
    """ntk_cluster at k = d reproduces the model; at k < d, folding the counts into down changes no output."""
    _, module, _ = _module(compose_cfg, name)
    model = module.model
    before = _out(model)
    fn = instantiate(compose_cfg(["ffn_mode=ntk_cluster"]).ffn_mode.compress)
    layers = _layers(model)
    full = mlp_io.config_width(model.config)
    compress_model(model, CompressionSettings.of(fn, layers, full, shared_expert=False))
    torch.testing.assert_close(_out(model), before, rtol=1e-4, atol=1e-5)
    compress_model(model, CompressionSettings.of(fn, layers, max(2, full // 4)))
    fused = _out(model)
    assert mlp_io.fold_scales(model) > 0
    torch.testing.assert_close(_out(model), fused, rtol=1e-5, atol=1e-6)


FUSED = sorted(row.tiny for row in mlp_io.FAMILIES.values() if row.tiny and row.experts and row.experts.layout == "fused")


@pytest.mark.parametrize("name", FUSED)
def test_an_expert_read_computes_what_the_module_computes(compose_cfg, name: str) -> None:
    """Each routed expert, read as MLPWeights (layout, biases, gated form), gives the stock experts module's output
    on tokens all sent to it with weight 1 (a read and a write that were wrong together would pass the k = d test)."""
    from src.methods.refit import output
    from src.methods.types import FusedMLP

    model = _module(compose_cfg, name)[1].model
    layer = _layers(model)[0]
    experts = mlp_io.mlp_modules(model, layer)["experts"]
    x = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    for e in (0, mlp_io.num_experts(model.config) - 1):
        with torch.no_grad():
            stock = experts(x, torch.full((5, 1), e), torch.ones(5, 1))
        torch.testing.assert_close(output(FusedMLP(mlp_io.read_mlp(model, layer, str(e))), x), stock, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", TINY)
def test_recorded_structure_rebuilds_every_method(compose_cfg, name: str) -> None:
    """Each kind a layer can take (fused with counts, low rank) records, rebuilds empty and loads back bit-exactly."""
    for method in ("ntk_cluster", "svd"):
        _, module, _ = _module(compose_cfg, name)
        model = module.model
        fn = instantiate(compose_cfg([f"ffn_mode={method}"]).ffn_mode.compress)
        report = compress_model(model, CompressionSettings.of(fn, _layers(model)[-2:], 8, name=method))
        fresh = _module(compose_cfg, name)[1].model
        apply_spec(fresh, report.spec)
        fresh.load_state_dict(model.state_dict(), strict=True)
        assert torch.equal(_out(fresh), _out(model))


@pytest.mark.parametrize("name", TINY)
def test_calibration_and_refit(compose_cfg, name: str) -> None:
    """wanda_sp with the least-squares refit, calibrated on the task's data, through the fusion callback."""
    cfg, module, checked = _module(compose_cfg, name, ["ffn_mode=wanda_sp", "ffn_mode.refit=lstsq", "ffn_mode.calib.size=8",
                                                       "approx_metrics.enabled=false"])
    datamodule = build_datamodule(cfg, checked)
    callback = next(c for c in build_callbacks(cfg, checked.compression) if isinstance(c, FusionCallback))
    report = callback.compress_and_measure(module.model, "cpu", datamodule, {})
    assert report.params_after < report.params_before
    assert torch.isfinite(_out(module.model)).all()
    assert all(s.get("calib_err", 0.0) < 1.5 for s in report.layer_stats.values())


@pytest.mark.slow  # three in-process runs per row
@pytest.mark.parametrize("name", TINY)
def test_compress_train_resume_export(compose_cfg, tmp_path: Path, name: str) -> None:
    """Compress and fine-tune, resume from the last checkpoint, export: the export computes the checkpoint's function."""
    from src.export.__main__ import export
    from src.export.exported import load_exported

    common = [f"model={name}", *_task(name), "ffn_mode=ntk_cluster", "approx_metrics.enabled=false", "test=false"]
    cfg = compose_cfg([*common, "trainer.max_steps=2"])
    train(cfg)
    train(compose_cfg([*common, "trainer.max_steps=3", "ckpt_path=last"]))
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    c = torch.load(ckpt, weights_only=True)
    assert c["global_step"] == 3
    out = export(str(ckpt), str(tmp_path / "export"), fmt="hf")
    module = build_module(cfg, preflight(cfg).task)
    apply_spec(module.model, c["fusion"])
    module.load_state_dict(c["state_dict"])
    loaded = load_exported(out, HEADS[module.head])
    torch.testing.assert_close(_out(loaded), _out(module.model), rtol=1e-4, atol=1e-5)


HUB = sorted(p.stem for p in (Path(__file__).parents[2] / "conf" / "model").glob("*.yaml")
             if not p.stem.startswith("_") and any(line.startswith("name_or_path: ") and line.split(": ", 1)[1].strip() not in ("null", "")
                                                    for line in p.read_text().splitlines()))


@pytest.mark.parametrize("name", HUB)
def test_hub_models_fail_fast_offline(compose_cfg, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Every Hub model config, offline: one sentence before anything loads."""
    import src.models.source
    from src.utils.errors import ConfigError

    monkeypatch.setattr(src.models.source, "hub_reachable", lambda: False)
    with pytest.raises(ConfigError, match=f"model '{name}' .* must be downloaded from the Hugging Face Hub"):
        train(compose_cfg([f"model={name}", "task=rt_review"]))
