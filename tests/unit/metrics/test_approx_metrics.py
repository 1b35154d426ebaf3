"""The approximation metrics end to end (compress_model, then approximation_metrics, as the callback
runs them), per-layer randomness, method versions in the cache key, and the interval code."""

from __future__ import annotations

import functools

import pytest
import torch
from scipy import stats
from torch import nn

import src.methods.ntk_cluster
import src.methods.sketch
from src.methods import kmeans, ntk_cluster, sketch
from src.metrics import ntk
from src.metrics.approximation import approximation_metrics
from src.models import mlp_io
from src.models.build import build_model
from src.pipeline.fuse import compress_model
from src.pipeline.settings import CompressionSettings
from src.utils.summary import estimate, paired

H, D = 32, 64
CONFIG = {"model_type": "bert", "hidden_size": H, "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": D, "vocab_size": 128}
LAYERS = [1, 3]


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = build_model({"name": "tiny", "config": CONFIG}, "classification", num_labels=2, pad_token_id=0).eval()
    with torch.no_grad():  # O(1) activations: BERT's init (std 0.02) leaves the down bias dominating the kernels
        for i in range(CONFIG["num_hidden_layers"]):
            for m in mlp_io.mlp_modules(model, i).values():
                nn.init.normal_(m.weight, std=m.in_features**-0.5)
    return model


def _batch(n: int = 6, t: int = 9) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    mask = (torch.arange(t) < torch.randint(3, t + 1, (n, 1), generator=g)).long()
    return {"input_ids": torch.randint(1, 128, (n, t), generator=g) * mask, "attention_mask": mask,
            "labels": torch.randint(0, 2, (n,), generator=g)}


PROBES = {"class0_prob": ntk.class0_prob, "label_logprob": ntk.true_label_logprob}


def _measure(original: nn.Module, fn, mid_dim: int) -> dict[str, float]:
    compressed = _copy(original)
    compress_model(compressed, CompressionSettings.of(fn, LAYERS, mid_dim))
    metrics, _ = approximation_metrics(original, compressed, LAYERS, _batch(), PROBES)
    return metrics


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


ERRORS = ["hidden_rel_err", "logits_rel_err", "output_rel_err", "ntk_sign_rel_err", "ntk_std_rel_err", "ntk_probe_sign_rel_err",
          "ntk_probe_std_rel_err", "label_logprob/ntk_sign_rel_err", "label_logprob/ntk_std_rel_err"]


@pytest.mark.parametrize("lloyd", [False, True], ids=["identity", "lloyd"])
def test_ntk_cluster_at_full_width_has_zero_errors(monkeypatch: pytest.MonkeyPatch, lloyd: bool) -> None:
    if lloyd:  # k = d through k-means++ and Lloyd (a permutation of the neurons), not the k = n shortcut
        monkeypatch.setattr(src.methods.ntk_cluster, "kmeans", functools.partial(kmeans.kmeans, identity_at_n=False))
    metrics = _measure(_model(), functools.partial(ntk_cluster.compress, n_init=2), D)
    for key in ERRORS:
        assert metrics[f"fusion/{key}"] < (1e-5 if lloyd else 1e-12), key
    for i in LAYERS:
        assert metrics[f"fusion/output_rel_err/layer_{i}"] < 1e-5 and metrics[f"fusion/ntk_sign_rel_err/layer_{i}"] < 1e-5


def test_identical_pairs_keep_the_sign_kernel_not_the_standard_one() -> None:
    """docs/methods.md section 4 in miniature, through the pipeline: pairs of identical sub-MLPs fused at
    k = d/2 with frozen counts 2 keep outputs and the sign kernel; the standard kernel is off by ~1."""
    model, half = _model(), D // 2
    with torch.no_grad():
        for i in LAYERS:
            mods = mlp_io.mlp_modules(model, i)
            mods["up"].weight[half:] = mods["up"].weight[:half]
            mods["up"].bias[half:] = mods["up"].bias[:half]
            mods["down"].weight[:, half:] = mods["down"].weight[:, :half]
    compressed = _copy(model)
    report = compress_model(compressed, CompressionSettings.of(functools.partial(ntk_cluster.compress, n_init=2), LAYERS, half))
    assert all(torch.equal(mlp_io.mlp_modules(compressed, i)["down"].scale, torch.full((half,), 2.0)) for i in LAYERS)
    metrics, _ = approximation_metrics(model, compressed, LAYERS, _batch(), PROBES)
    assert report.layer_stats[1]["inertia"] < 1e-9
    for key in ("hidden_rel_err", "output_rel_err", "ntk_sign_rel_err", "label_logprob/ntk_sign_rel_err"):
        assert metrics[f"fusion/{key}"] < 1e-5, key
    assert 0.75 < metrics["fusion/ntk_std_rel_err"] < 1.05


def test_two_layers_get_different_sketch_matrices() -> None:
    model = _model()
    with torch.no_grad():  # layer 3 := layer 1, so only the random draw can make them differ
        for role, m in mlp_io.mlp_modules(model, 3).items():
            m.load_state_dict(mlp_io.mlp_modules(model, 1)[role].state_dict())
    compress_model(model, CompressionSettings.of(sketch.compress, LAYERS, 16))
    a, b = (mlp_io.read_mlp(model, i) for i in LAYERS)
    assert not torch.allclose(a.up, b.up)
    again = _model()
    with torch.no_grad():
        for role, m in mlp_io.mlp_modules(again, 3).items():
            m.load_state_dict(mlp_io.mlp_modules(again, 1)[role].state_dict())
    compress_model(again, CompressionSettings.of(sketch.compress, LAYERS, 16))
    assert torch.equal(mlp_io.read_mlp(again, 3).up, b.up)  # and the draw is a function of (seed, layer)


def test_a_cache_entry_of_another_method_version_is_not_reused(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    def run() -> list[float]:  # the method's VERSION is read when its settings are made
        report = compress_model(_model(), CompressionSettings.of(sketch.compress, LAYERS, 16, cache_dir=str(tmp_path / "c")))
        return [report.layer_stats[i]["cache_hit"] for i in LAYERS]

    assert run() == [0.0, 0.0] and run() == [1.0, 1.0]
    monkeypatch.setattr(src.methods.sketch, "VERSION", src.methods.sketch.VERSION + "-changed")
    assert run() == [0.0, 0.0]


def test_textbook_t_interval_and_paired_difference() -> None:
    e = estimate([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.7764451051977987 * (2.5**0.5) / 5**0.5  # t(0.975, df=4) · s / √n
    assert (e.mean, e.n) == (3.0, 5) and e.std == pytest.approx(2.5**0.5)
    assert (e.low, e.high) == pytest.approx((3 - half, 3 + half)) and e.excludes_zero
    lo, hi = stats.t.interval(0.95, 4, loc=3.0, scale=stats.sem([1, 2, 3, 4, 5]))
    assert (e.low, e.high) == pytest.approx((lo, hi))
    one = estimate([0.7])
    assert one.n == 1 and one.mean == 0.7 and one.low != one.low  # no interval from one seed (nan)
    d = paired({1: 0.80, 2: 0.82, 3: 0.79}, {1: 0.78, 2: 0.799, 3: 0.771, 4: 0.9})  # seed 4 has no pair
    assert d.n == 3 and d.mean == pytest.approx(0.02) and d.excludes_zero
    assert not paired({1: 0.8, 2: 0.7}, {1: 0.7, 2: 0.8}).excludes_zero



def test_a_shared_reference_gives_the_same_metrics() -> None:
    """src.approx measures the original once per seed: the metrics equal those measured from scratch."""
    from src.metrics.approximation import measure_reference

    original = _model()
    compressed = _copy(original)
    compress_model(compressed, CompressionSettings.of(ntk_cluster.compress, LAYERS, 8))
    ref = measure_reference(original, LAYERS, _batch(), PROBES)
    assert approximation_metrics(original, compressed, LAYERS, _batch(), PROBES, reference=ref) == approximation_metrics(
        original, compressed, LAYERS, _batch(), PROBES)
    with pytest.raises(ValueError, match="another probe batch"):
        approximation_metrics(original, compressed, LAYERS, _batch(n=5), PROBES, reference=ref)
