"""FLAP (ffn_mode=flap) against FLAP's official code, bias compensation, score allocation, the held-out ridge,
activation fusion and the mixed calibration text (docs/methods.md section 6)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from src.builders import build_data_and_module
from src.callbacks.fusion import FusionCallback
from src.data import general_text
from src.methods import act_fusion, flap, refit, wanda_sp
from src.methods.common import activations
from src.methods.types import FusedMLP, MLPCalibration, MLPWeights
from src.models import mlp_io
from src.models.source import model_identity
from src.pipeline.budget import allocate_by_scores, total_neurons
from src.preflight import preflight
from tests.conftest import assert_refused_before_loading

DATA = Path(__file__).parents[2] / "data"  # tests/data


def _gated(d: int = 12, h: int = 6, seed: int = 0) -> MLPWeights:
    g = torch.Generator().manual_seed(seed)
    return MLPWeights(up=torch.randn(d, h, generator=g), down=torch.randn(h, d, generator=g), gate=torch.randn(d, h, generator=g),
                      activation="silu")


def _calib(w: MLPWeights, lengths: list[int], seed: int = 1) -> MLPCalibration:
    x = torch.randn(sum(lengths), w.hidden_size, generator=torch.Generator().manual_seed(seed))
    return MLPCalibration(x=x, y=refit.output(FusedMLP(w), x), lengths=torch.tensor(lengths))


def _biasgpt_fluctuation(a: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """FLAP's BiasGPT.add_batch (lib/layerwrapper.py, WIFV) restated step by step, one sequence a batch; its
    ``old_baseline_inp`` is the very tensor updated in place, so both factors use the new mean."""
    baseline, fluc, n = torch.zeros(a.shape[1], dtype=torch.float64), None, 0
    for chunk in a.double().split(lengths):
        inp = chunk.T  # (dim, seqlen)
        baseline *= n / (n + 1)
        baseline += inp.mean(1) / (n + 1)
        if n == 0:
            fluc = torch.zeros_like(baseline)
        else:
            fluc *= (n - 1) / (n + 1 - 1)
            fluc += ((inp - baseline[:, None]) * (inp - baseline[:, None])).sum(1) / (n + 1)
        n += 1
    return fluc


def test_fluctuation_is_flaps_running_estimate_sequence_by_sequence() -> None:
    a = torch.randn(40, 5, generator=torch.Generator().manual_seed(0)) * torch.arange(1.0, 6.0)
    lengths = [3, 9, 1, 7, 12, 8]
    torch.testing.assert_close(flap.fluctuation(a, torch.tensor(lengths)), _biasgpt_fluctuation(a, lengths))
    # without lengths every token is a sequence of one; one sequence alone adds nothing (FLAP starts at 0)
    torch.testing.assert_close(flap.fluctuation(a), _biasgpt_fluctuation(a, [1] * 40))
    assert flap.fluctuation(a, torch.tensor([40])).abs().max() == 0


@pytest.mark.parametrize("reference", [
    "flap_reference_tiny.json",
    pytest.param("flap_reference_smollm2.json", marks=pytest.mark.slow),
])
def test_flap_reproduces_the_official_codes_kept_neurons_and_bias(compose_cfg, reference: str) -> None:
    """tests/data/flap_reference_*.json: FLAP's own BiasGPT, WIFV metric, UL-UM threshold and compress() on a tiny
    Llama's layers 1-3 and on SmolLM2's layers 10, 20 and 29 at width 1152 (docs/study/llm/flap_official.py
    --reference); ffn_mode=flap on the same weights and calibration sequences keeps the same neurons and adds
    the same bias (FLAP rounds its mean to float16)."""
    ref = json.loads((DATA / reference).read_text())
    layers = sorted(int(i) for i in ref["layers"])
    c = ref["calib"]
    cfg = compose_cfg([f"model={ref['model']}", "task=rt_review", "trainer=cpu", "seed=0", "ffn_mode=flap", "ffn_mode.cache=false",
                       f"ffn_mode.layers=[{','.join(map(str, layers))}]", f"ffn_mode.mid_dim={ref['mid_dim']}", f"ffn_mode.seed={c['seed']}",
                       f"ffn_mode.calib.seed={c['seed']}", f"ffn_mode.calib.size={c['size']}",
                       f"ffn_mode.calib.source={c['source']}"], fast=False)  # the reference's sample, whatever the model's default
    checked = preflight(cfg)
    torch.manual_seed(0)  # the random weights the reference was computed on
    datamodule, module = build_data_and_module(cfg, checked)
    original = {i: mlp_io.read_mlp(module.model, i) for i in layers}
    FusionCallback(checked.compression, {"enabled": False}, model_identity(cfg.model)).compress_and_measure(module.model, "cpu", datamodule, {})
    for i in layers:
        kept, w = ref["layers"][str(i)]["kept"], mlp_io.read_mlp(module.model, i)
        torch.testing.assert_close(w.up, original[i].up[kept], rtol=0, atol=0)
        torch.testing.assert_close(w.gate, original[i].gate[kept], rtol=0, atol=0)
        bias = torch.tensor(ref["layers"][str(i)]["bias"])
        torch.testing.assert_close(w.down_bias, bias, rtol=2e-3, atol=1e-3 * bias.abs().max().item())


def test_bias_compensation_adds_the_removed_neurons_mean_output() -> None:
    w = _gated()
    calib = _calib(w, [5, 7, 4, 8])
    pruned = wanda_sp.compress(w, 8, seed=0, calib=calib)
    kept = [i for i in range(w.width) if any(torch.equal(w.up[i], r) for r in pruned.weights.up)]
    removed = [i for i in range(w.width) if i not in kept]
    a = activations(w, calib.x)  # [T, d]
    per_seq = torch.stack([s.mean(0) for s in a.split([5, 7, 4, 8])]).mean(0)  # FLAP's baseline: the mean of the sequences' means
    compensated = refit.compensate(pruned, calib)
    torch.testing.assert_close(compensated.weights.down_bias, w.down[:, removed] @ per_seq[removed], rtol=1e-5, atol=1e-6)
    assert torch.equal(compensated.weights.down, pruned.weights.down)  # the weights stay
    assert compensated.stats["calib_err"] < compensated.stats["calib_err_before_refit"]


def test_score_allocation_standardises_each_layer_and_keeps_the_total() -> None:
    g = torch.Generator().manual_seed(0)
    scores = {0: torch.rand(50, generator=g), 1: torch.rand(50, generator=g) ** 3, 2: torch.rand(50, generator=g) + 5}
    widths = allocate_by_scores(scores, 90)
    assert sum(widths.values()) == 90
    # a layer's scale does not matter, only where each score stands in its own layer
    assert allocate_by_scores({**scores, 1: scores[1] * 1000}, 90) == widths
    assert total_neurons(5 / 6, [1536] * 30) == 38400  # 5/6 in decimals still keeps 5/6 of the neurons


def _sums(c, calib: MLPCalibration) -> refit._Sums:
    return refit._Sums.of(refit.design(c, calib.x).double(), calib.y.double())


def test_auto_ridge_is_chosen_on_held_out_sequences() -> None:
    w = _gated(d=16)
    calib = _calib(w, [6] * 10)
    held = refit._held_tokens(calib)
    assert held.nonzero().flatten().tolist() == list(range(24, 30)) + list(range(54, 60))  # sequences 4 and 9 of 0..9
    pruned = wanda_sp.compress(w, 6, seed=0, calib=calib)
    rho, errors = refit.choose_ridge(pruned, calib)
    assert rho == min(errors, key=errors.get) and set(errors) == set(refit.RIDGES)
    # each ρ's error is its fit on the other sequences alone, scored on the held-out ones
    fit = MLPCalibration(calib.x[~held], calib.y[~held], None)
    for r, err in errors.items():
        alone = refit._solve(pruned, _sums(pruned, fit), r)
        assert err == pytest.approx(refit.rel_error(alone, MLPCalibration(calib.x[held], calib.y[held], None)), rel=1e-5)
    out = refit.refit(pruned, calib, "auto")
    assert out.stats["refit_ridge"] == rho and out.stats["calib_err"] <= out.stats["calib_err_before_refit"]
    # the sums completed in place with the held-out rows are the sums of all tokens: the same refit as a fixed ρ
    torch.testing.assert_close(out.weights.down, refit.refit(pruned, calib, rho).weights.down)


@pytest.mark.parametrize("bias", [False, True])
def test_the_shared_sums_give_the_ridge_solution_on_centred_data(bias: bool) -> None:
    """The solve from ZᵀZ and Zᵀy (centred by n m mᵀ where a bias is fitted, Cholesky) equals the ridge
    solution written out: W = (ZcᵀZc + λI)⁻¹ Zcᵀyc, b = m_y − W m_z, λ = ρ mean(diag(ZcᵀZc))."""
    w = _gated(d=16)
    g = torch.Generator().manual_seed(5)
    if bias:
        w = MLPWeights(w.up, w.down, torch.randn(16, generator=g), torch.randn(6, generator=g), w.gate, w.activation)
    calib = _calib(w, [6] * 10)
    pruned = wanda_sp.compress(w, 6, seed=0, calib=calib)
    z, y = refit.design(pruned, calib.x).double(), calib.y.double()
    mz, my = (z.mean(0), y.mean(0)) if bias else (0.0, 0.0)
    zc, yc = z - mz, y - my
    gram = zc.T @ zc
    want = torch.linalg.solve(gram + 0.01 * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype), zc.T @ yc).T
    got = refit._solve(pruned, _sums(pruned, calib), 0.01)
    torch.testing.assert_close(got.weights.down, want.float(), rtol=1e-5, atol=1e-6)
    if bias:
        torch.testing.assert_close(got.weights.down_bias, (my - want @ mz).float(), rtol=1e-5, atol=1e-6)


def test_a_ridge_toward_the_compressed_weights_interpolates_between_them_and_the_least_squares_fit() -> None:
    w = _gated(d=16)
    calib = _calib(w, [6] * 10)
    pruned = wanda_sp.compress(w, 6, seed=0, calib=calib)
    s = _sums(pruned, calib)
    heavy = refit._solve(pruned, s, 1e6, "compressed")
    torch.testing.assert_close(heavy.weights.down, pruned.weights.down, rtol=1e-4, atol=1e-5)  # a large ridge: no refit
    assert refit._solve(pruned, s, 1e6, "zero").weights.down.abs().max() < 1e-3  # toward zero: no output
    torch.testing.assert_close(refit._solve(pruned, s, 1e-12, "compressed").weights.down, refit._solve(pruned, s, 1e-12).weights.down)


def test_act_fusion_merges_neurons_that_always_fire_together_exactly() -> None:
    """Neuron pairs with the same gate and up rows (other down columns) have the same activations: at k = d/2
    act_fusion finds the pairs (counts 2) and the fused MLP computes the original's outputs."""
    base = _gated(d=6, h=5, seed=3)
    g = torch.Generator().manual_seed(4)
    w = MLPWeights(up=torch.cat([base.up, base.up]), gate=torch.cat([base.gate, base.gate]), down=torch.randn(5, 12, generator=g),
                   activation="silu")
    calib = _calib(w, [9] * 4)
    fused = act_fusion.compress(w, 6, seed=0, calib=calib)
    assert fused.scale.tolist() == [2.0] * 6
    torch.testing.assert_close(refit.output(fused, calib.x), calib.y, rtol=1e-4, atol=1e-5)


def test_mixed_calibration_is_half_task_inputs_half_general_text(compose_cfg) -> None:
    cfg = compose_cfg(["model=tiny_smollm2", "task=rt_review", "ffn_mode=wanda_sp", "ffn_mode.calib.source=mixed"])
    checked = preflight(cfg)
    datamodule, _ = build_data_and_module(cfg, checked)
    batches = datamodule.calib_batches(10, 0, 4, "mixed")
    assert sum(len(b["input_ids"]) for b in batches) == 10 and "labels" not in batches[-1]
    again = general_text.windows(datamodule.tokenizer, 5, 0)
    assert again == general_text.windows(datamodule.tokenizer, 5, 0) and all(1 <= len(x) <= 128 for x in again)
    assert checked.compression.calib.source == "mixed"
    assert set(general_text.documents()) == {"convention_speeches_2012", "presidential_debates_2016", "guardian_headlines", "movie_plots"}


@pytest.mark.parametrize(("override", "message"), [
    ("ffn_mode.refit=ols", "ffn_mode.refit='ols' must be one of none, lstsq, bias"),
    ("ffn_mode.refit_ridge=-1", "ffn_mode.refit_ridge=-1 must be a positive number or auto"),
    ("ffn_mode.refit_ridge=often", "ffn_mode.refit_ridge='often' must be a positive number or auto"),
    ("ffn_mode.allocation=greedy", "ffn_mode.allocation='greedy' must be one of error, flap, wanda_sp"),
    ("ffn_mode.refit_toward=one", "ffn_mode.refit_toward='one' must be one of zero, compressed"),
    ("ffn_mode.calib.source=wiki", "ffn_mode.calib.source='wiki' must be one of task, mixed"),
])
def test_bad_calibration_options_are_refused_in_one_sentence(compose_cfg, monkeypatch, override, message) -> None:
    assert_refused_before_loading(compose_cfg, monkeypatch, ["model=tiny_smollm2", "task=rt_review", "ffn_mode=flap", override], message)
