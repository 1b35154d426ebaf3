"""The compression methods on small random MLPs: exactness at k = d, fusion properties, baselines."""

import functools

import pytest
import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from src.methods import cluster, mmd, ntk_cluster, prune, refit, sketch, svd
from src.methods.common import clamped_swiglu
from src.methods.method import Method
from src.methods.types import FusedMLP, LowRankMLP, MLPCalibration, MLPWeights
from tests.conftest import METHODS as NAMES
from tests.conftest import compress_fn


def _with_calibration(fn):
    """Methods that read calibration data (wanda_sp) get a fixed random sample of inputs."""
    if not Method.of(fn).needs_calibration:
        return fn
    x = torch.randn(64, H, generator=torch.Generator().manual_seed(7))
    return functools.partial(fn, calib=MLPCalibration(x=x, y=torch.zeros_like(x)))


H, D = 16, 64
METHODS = {name: _with_calibration(compress_fn(name)) for name in NAMES}



OSS = clamped_swiglu(1.702, 7.0)  # gpt-oss's constants


def make_mlp(h=H, d=D, *, gated=False, bias=True, act="gelu", std=0.02, seed=0) -> MLPWeights:
    """gated: False, True, or "oss" (gpt-oss: biases on gate, up and down, the clamped SwiGLU; ``act`` unused)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * std

    if gated == "oss":
        return MLPWeights(up=rnd(d, h), down=rnd(h, d), gate=rnd(d, h), gate_bias=rnd(d), up_bias=rnd(d), down_bias=rnd(h), activation=OSS)
    if gated:
        return MLPWeights(up=rnd(d, h), down=rnd(h, d), gate=rnd(d, h), activation=act)
    biases = dict(up_bias=rnd(d), down_bias=rnd(h)) if bias else {}
    return MLPWeights(up=rnd(d, h), down=rnd(h, d), activation=act, **biases)


def paired_mlp(gated=False) -> MLPWeights:
    """Second half of the neurons a copy of the first."""
    w = make_mlp(d=D // 2, gated=gated)

    def twice(t, dim=0):
        return None if t is None else torch.cat([t, t], dim)

    return MLPWeights(twice(w.up), twice(w.down, 1), twice(w.up_bias), w.down_bias, twice(w.gate), w.activation, twice(w.gate_bias))


def mlp_out(w: MLPWeights, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """y = down(scale * act(up x + b)) + b_out, or down(scale * act(gate x) * up x) gated; gpt-oss's form by
    transformers' own GptOssExperts._apply_gate on the interleaved [gate_0, up_0, ...] pre-activations."""
    if w.activation == OSS:
        from types import SimpleNamespace

        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

        pre = torch.stack([F.linear(x, w.gate, w.gate_bias), F.linear(x, w.up, w.up_bias)], -1).flatten(-2)  # [T, 2d] interleaved
        z = GptOssExperts._apply_gate(SimpleNamespace(limit=7.0, alpha=1.702), pre)
    elif w.is_gated:
        z = ACT2FN[w.activation](x @ w.gate.T) * (x @ w.up.T)
    else:
        z = ACT2FN[w.activation](F.linear(x, w.up, w.up_bias))
    return F.linear(z if scale is None else z * scale, w.down, w.down_bias)


def out(c: FusedMLP | LowRankMLP, x: torch.Tensor) -> torch.Tensor:
    if isinstance(c, FusedMLP):
        return mlp_out(c.weights, x, c.scale)
    mat = {name: left @ right for name, (left, right) in c.factors.items()}
    w = MLPWeights(mat["up"], mat["down"], c.up_bias, c.down_bias, mat.get("gate"), c.activation, c.gate_bias)
    return mlp_out(w, x)


def inputs(n=32, h=H, seed=1):
    return torch.randn(n, h, generator=torch.Generator().manual_seed(seed))


def n_params(w: MLPWeights) -> int:
    return sum(t.numel() for t in (w.up, w.down, w.up_bias, w.down_bias, w.gate, w.gate_bias) if t is not None)


GATED = pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
KINDS = pytest.mark.parametrize("gated", [False, True, "oss"], ids=["plain", "gated", "gpt_oss"])


def test_gpt_oss_form_clamps_like_transformers():
    """Past the clamp (|pre-activation| > 7) the reference and ours still agree, and the clamp bites."""
    w, x = make_mlp(gated="oss", std=2.0), inputs()
    y = mlp_out(w, x)
    torch.testing.assert_close(refit.output(FusedMLP(w), x), y, rtol=1e-4, atol=1e-4)  # outputs ~1e3 at std 2
    assert (F.linear(x, w.gate, w.gate_bias).abs() > 7).any() and (F.linear(x, w.up, w.up_bias).abs() > 7).any()


@KINDS
@pytest.mark.parametrize(
    "method, opts",
    [("ntk_cluster", {}), ("prune", {}), ("sketch", {"sketch_keep": D})],
)
def test_full_width_is_exact(method, opts, gated):
    w, x = make_mlp(gated=gated), inputs()
    c = METHODS[method](w, D, seed=0, **opts)
    assert torch.equal(out(c, x), mlp_out(w, x))


@KINDS
def test_fusion_finds_identical_pairs(gated):
    w, x = paired_mlp(gated=gated), inputs()
    c = ntk_cluster.compress(w, D // 2, seed=0)
    assert torch.equal(c.scale, torch.full((D // 2,), 2.0))
    assert c.stats["inertia"] < 1e-8
    torch.testing.assert_close(out(c, x), mlp_out(w, x), rtol=1e-5, atol=1e-7)


@GATED
def test_cluster_equals_fusion_for_relu_only(gated):
    x = inputs()
    for act, same in [("relu", True), ("gelu", False)]:
        w = make_mlp(gated=gated, act=act, std=0.5)
        fused, plain = ntk_cluster.compress(w, 20, seed=3), cluster.compress(w, 20, seed=3)
        assert plain.scale is None and plain.stats == fused.stats
        a, b = out(plain, x), out(fused, x)
        assert ((a - b).norm() / b.norm() < 1e-5) == same, act


def test_counts_fold_into_down():
    w, x = make_mlp(), inputs()
    c = ntk_cluster.compress(w, 24, seed=0)
    assert c.scale.dtype == w.up.dtype and c.scale.shape == (24,) and c.scale.sum() == D
    assert (c.scale >= 1).all() and c.stats["empty_clusters_fixed"] >= 0
    folded = MLPWeights(c.weights.up, c.weights.down * c.scale, c.weights.up_bias, c.weights.down_bias)
    torch.testing.assert_close(mlp_out(folded, x), out(c, x))


@KINDS
@pytest.mark.parametrize("method", ["ntk_cluster", "cluster", "sketch", "mmd", "prune"])
def test_width_params_activation_and_down_bias(method, gated):
    w, k = make_mlp(gated=gated, act="silu"), 12
    opts = {"mmd_steps": 3} if method == "mmd" else {}
    c = METHODS[method](w, k, seed=0, **opts)
    assert c.weights.width == k and c.weights.hidden_size == H and c.weights.activation == w.activation
    assert n_params(c.weights) == {False: k * (2 * H + 1) + H, True: 3 * H * k, "oss": k * (3 * H + 2) + H}[gated]
    if gated != True:  # noqa: E712
        assert torch.equal(c.weights.down_bias, w.down_bias)


def test_half_precision_keeps_dtype():
    w = make_mlp()
    w16 = MLPWeights(*(t.half() for t in (w.up, w.down, w.up_bias, w.down_bias)))
    for name, method in METHODS.items():
        c = method(w16, 16, seed=0, **({"mmd_steps": 2} if name == "mmd" else {}))
        tensors = c.factors["up"] if isinstance(c, LowRankMLP) else (c.weights.up, c.weights.down)
        assert all(t.dtype == torch.float16 for t in tensors), name


def test_svd_rank_and_budget():
    assert svd.svd_rank(768, 3072, 768, gated=False, biased=True) == 153
    assert svd.svd_rank(768, 3072, 768, gated=True, biased=False) == 3 * 768 * 768 // (3 * 3840)
    # the paper's layer: 2·r·(h+d) + biases (d + h) fits a width-768 MLP's k(2h+1) + h
    assert 2 * 153 * (768 + 3072) + 3072 + 768 <= 768 * (2 * 768 + 1) + 768
    x = inputs()
    for gated in (False, True):
        w = make_mlp(gated=gated)
        c = svd.compress(w, 48, seed=0)
        assert c.rank == svd.svd_rank(H, D, 48, gated, not gated) > 0 and c.stats["rank"] == c.rank
        assert len(c.factors) == (3 if gated else 2) and c.activation == w.activation
        low = sum(t.numel() for t in (*sum(c.factors.values(), ()), c.up_bias, c.down_bias) if t is not None)
        assert low <= n_params(make_mlp(d=48, gated=gated))
        assert out(c, x).shape == (32, H)
        # Eckart-Young: the error is the mass of the dropped singular values
        s = torch.linalg.svdvals(w.up)
        err = (c.factors["up"][0] @ c.factors["up"][1] - w.up).norm()
        torch.testing.assert_close(err, s[c.rank :].norm(), rtol=1e-4, atol=1e-6)


def test_seeds_determinism_and_no_mutation():
    w = make_mlp()
    before = {k: v.clone() for k, v in vars(w).items() if isinstance(v, torch.Tensor)}
    for name, method in METHODS.items():
        opts = {"mmd_steps": 3} if name == "mmd" else {}
        a, b, c = (method(w, 16, seed=s, **opts) for s in (0, 0, 1))
        wa, wb, wc = (out(m, inputs()) for m in (a, b, c))
        assert torch.equal(wa, wb), name
        if name in ("ntk_cluster", "cluster", "sketch", "mmd"):
            assert not torch.equal(wa, wc), name
    assert all(torch.equal(getattr(w, k), v) for k, v in before.items())


def test_parameters_in_plain_tensors_out():
    w = make_mlp()
    params = MLPWeights(*(torch.nn.Parameter(t) for t in (w.up, w.down, w.up_bias, w.down_bias)))
    for name, method in METHODS.items():
        c = method(params, 16, seed=0, **({"mmd_steps": 2} if name == "mmd" else {}))
        assert not out(c, inputs()).requires_grad, name


def test_sketch_keeps_largest_and_is_unbiased_for_linear_act():
    w = make_mlp(act="linear")
    boost = torch.ones(D)
    boost[[3, 40, 7]] = 10.0  # three sub-MLPs with by far the largest norm product
    w = MLPWeights(w.up * boost[:, None], w.down, w.up_bias, w.down_bias, activation="linear")
    c = sketch.compress(w, 16, seed=0, sketch_keep=3)
    torch.testing.assert_close(c.weights.up[:3], w.up[[3, 7, 40]])  # kept, in index order
    # E[S Sᵀ] = I: with a linear activation the sketched output is unbiased, so the error of the
    # mean over N sketches shrinks like 1/√N (here 1/10) of a single sketch's error
    x = inputs()
    ys = torch.stack([out(sketch.compress(w, 16, seed=s), x) for s in range(100)])
    ref = mlp_out(w, x)
    assert (ys.mean(0) - ref).norm() < 0.3 * (ys - ref).norm(dim=(1, 2)).mean()


def test_prune_keeps_top_importance():
    w = make_mlp()
    score = w.up.norm(dim=1) * w.down.norm(dim=0)
    keep = score.topk(10).indices.sort().values
    c = prune.compress(w, 10, seed=0)
    assert torch.equal(c.weights.up, w.up[keep]) and torch.equal(c.weights.down, w.down[:, keep])
    assert torch.equal(c.weights.up_bias, w.up_bias[keep])


def test_mmd_reduces_mmd():
    w = make_mlp()
    c = mmd.compress(w, 16, seed=0)  # defaults: 100 AdamW steps at lr 1e-2
    assert c.stats["mmd_final"] < c.stats["mmd_init"]
    assert torch.equal(c.weights.down_bias, w.down_bias) and c.scale is None


def test_mmd_folds_sqrt_d_over_k():
    w, k = make_mlp(), 16
    c = mmd.compress(w, k, seed=0, mmd_steps=0)  # the particles are k of the sub-MLPs
    f = (D / k) ** 0.5
    rows = (c.weights.up / f)[:, None] - w.up  # [k, d, h]: which original row each one is
    pick = rows.abs().amax(-1).argmin(1)
    torch.testing.assert_close(c.weights.up, f * w.up[pick])
    torch.testing.assert_close(c.weights.up_bias, f * w.up_bias[pick])
    torch.testing.assert_close(c.weights.down, f * w.down[:, pick])
    assert len(set(pick.tolist())) == k


@pytest.mark.parametrize("mid_dim", [0, D + 1, 8.0, True])
def test_bad_mid_dim(mid_dim):
    for name, method in METHODS.items():
        with pytest.raises(ValueError, match="mid_dim"):
            method(make_mlp(), mid_dim, seed=0)


@pytest.mark.parametrize("keep, mid_dim", [(-1, 16), (16, 16), (20, 16), (D, D - 1)])
def test_bad_sketch_keep(keep, mid_dim):
    with pytest.raises(ValueError, match="sketch_keep"):
        sketch.compress(make_mlp(), mid_dim, seed=0, sketch_keep=keep)


def test_svd_refuses_rank_zero():
    with pytest.raises(ValueError, match="rank"):
        svd.compress(make_mlp(), 1, seed=0)
