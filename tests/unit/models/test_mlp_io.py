"""Architecture adapters on tiny models built from configs (no downloads)."""

from __future__ import annotations

import copy
import dataclasses
import gc
import weakref

import pytest
import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    DistilBertConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.pytorch_utils import Conv1D

from src.methods.types import FusedMLP, LowRankMLP, MLPWeights
from src.models.mlp_io import (
    MLPSpec,
    MoESpec,
    build_from_spec,
    discovery,
    family_of,
    find_mlp_layers,
    fold_scales,
    intermediate_sizes,
    layer_spec,
    mlp_forward,
    mlp_input_module,
    mlp_modules,
    mlp_param_names,
    num_layers,
    read_mlp,
    reinit_mlp,
    spec_from_dict,
    stock_widths,
    write_mlp,
)
from src.models.replacements import LowRankLinear, ScaledLinear
from src.pipeline.fuse import apply_spec

H, D, L, V = 32, 64, 4, 50
ARCHS = ["bert", "distilbert", "gpt2", "llama"]


def make(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if arch == "bert":
        cfg = BertConfig(hidden_size=H, num_hidden_layers=L, intermediate_size=D, num_attention_heads=2, vocab_size=V)
        model = AutoModelForSequenceClassification.from_config(cfg)
    elif arch == "distilbert":
        cfg = DistilBertConfig(dim=H, n_layers=L, hidden_dim=D, n_heads=2, vocab_size=V)
        model = AutoModelForSequenceClassification.from_config(cfg)
    elif arch == "gpt2":  # n_inner=None: width 4h = 128
        model = GPT2LMHeadModel(GPT2Config(n_embd=H, n_layer=L, n_head=2, vocab_size=V, bos_token_id=0, eos_token_id=0))
    else:
        model = LlamaForCausalLM(LlamaConfig(hidden_size=H, intermediate_size=D, num_hidden_layers=L,
                                             num_attention_heads=2, num_key_value_heads=2, vocab_size=V))
    return model.eval()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny matmuls: extra intra-op threads only add contention (0.5 s instead of 2 ms per forward)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


IDS = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def logits(model: nn.Module) -> torch.Tensor:
    return model(input_ids=IDS).logits


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def rand_fused(model: nn.Module, layer: int, k: int, scaled: bool) -> FusedMLP:
    w = read_mlp(model, layer)
    h = w.hidden_size
    r = lambda *s: 0.1 * torch.randn(*s)  # noqa: E731
    weights = MLPWeights(up=r(k, h), down=r(h, k), up_bias=None if w.up_bias is None else r(k),
                         down_bias=None if w.down_bias is None else r(h),
                         gate=r(k, h) if w.is_gated else None, activation=w.activation)
    return FusedMLP(weights, scale=torch.randint(1, 5, (k,)).float() if scaled else None)


def rand_lowrank(model: nn.Module, layer: int, rank: int) -> LowRankMLP:
    w = read_mlp(model, layer)
    mats = {"up": w.up, "down": w.down} | ({"gate": w.gate} if w.is_gated else {})
    factors = {n: (torch.randn(m.shape[0], rank), torch.randn(rank, m.shape[1]) / m.shape[1]) for n, m in mats.items()}
    return LowRankMLP(factors, up_bias=w.up_bias, down_bias=w.down_bias, activation=w.activation)


@pytest.mark.parametrize("arch", [*ARCHS, "distilbert"])
def test_read_write_roundtrip_is_exact(arch):
    model = make(arch)
    before = logits(model)
    assert num_layers(model) == L
    for i in range(L):
        write_mlp(model, i, read_mlp(model, i))
    assert torch.equal(logits(model), before)
    assert all(layer_spec(model, i).kind == "dense" for i in range(L))


def test_conv1d_is_read_transposed():
    model = make("gpt2")
    mlp = model.transformer.h[0].mlp
    w = read_mlp(model, 0)
    assert w.up.shape == (4 * H, H) and w.down.shape == (H, 4 * H) and w.activation == "gelu_new"
    x = torch.randn(3, H)
    with torch.no_grad():
        torch.testing.assert_close(x @ w.up.T + w.up_bias, mlp.c_fc(x))
        h = torch.randn(3, 4 * H)
        torch.testing.assert_close(h @ w.down.T + w.down_bias, mlp.c_proj(h))


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_write_shrinks_width(arch):
    model, k = make(arch), 16
    d, before = intermediate_sizes(model)[0], n_params(model)
    w0 = read_mlp(model, 0)
    for i in (1, 2):
        write_mlp(model, i, rand_fused(model, i, k, scaled=True))
    assert intermediate_sizes(model) == [d, k, k, d]
    assert torch.isfinite(logits(model)).all()
    n_mat = 3 if w0.is_gated else 2
    per_layer = n_mat * H * (d - k) + (d - k) * (w0.up_bias is not None)
    assert before - n_params(model) == 2 * per_layer
    down = mlp_modules(model, 1)["down"]
    assert isinstance(down, ScaledLinear) and not down.scale.requires_grad
    scale_names = [n for n in model.state_dict() if n.endswith(".scale")]
    assert len(scale_names) == 2 and not any(n.endswith(".scale") for n, _ in model.named_parameters())
    assert layer_spec(model, 1) == MLPSpec("fused", k, scaled=True, up_bias=w0.up_bias is not None, down_bias=w0.down_bias is not None)
    if arch == "gpt2":  # Conv1D replaced by nn.Linear; the HF module tree is kept
        assert type(model.transformer.h[1].mlp.c_fc) is nn.Linear
    if arch == "bert":
        assert model.bert.encoder.layer[1].output.dense is down


@pytest.mark.parametrize("arch", ARCHS)
def test_scale_folding_keeps_outputs(arch):
    model = make(arch)
    folded = make(arch)
    for i in (1, 3):
        fused = rand_fused(model, i, 16, scaled=True)
        write_mlp(model, i, fused)
        w = fused.weights
        down = w.down * fused.scale[None, :]  # W2' · diag(n)
        write_mlp(folded, i, FusedMLP(MLPWeights(w.up, down, w.up_bias, w.down_bias, w.gate, w.activation)))
    ref = logits(model)
    torch.testing.assert_close(logits(folded), ref)
    assert fold_scales(model) == 2 and fold_scales(model) == 0
    assert not any(isinstance(m, ScaledLinear) for m in model.modules())
    torch.testing.assert_close(logits(model), ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_lowrank_write(arch):
    model, r = make(arch), 4
    d, before = intermediate_sizes(model)[0], n_params(model)
    lr = rand_lowrank(model, 2, r)
    write_mlp(model, 2, lr)
    assert torch.isfinite(logits(model)).all()
    assert before - n_params(model) == len(lr.factors) * (H * d - r * (H + d))
    assert all(isinstance(m, LowRankLinear) for m in mlp_modules(model, 2).values())
    torch.testing.assert_close(read_mlp(model, 2).up, lr.factors["up"][0] @ lr.factors["up"][1])
    assert layer_spec(model, 2).kind == "lowrank" and layer_spec(model, 2).rank == r


@pytest.mark.parametrize("arch", ARCHS)
def test_spec_rebuild_then_load_reproduces_logits(arch):
    model = make(arch)
    write_mlp(model, 1, rand_fused(model, 1, 16, scaled=True))
    write_mlp(model, 2, rand_lowrank(model, 2, 4))
    write_mlp(model, 3, rand_fused(model, 3, 8, scaled=False))
    specs = [layer_spec(model, i) for i in range(L)]
    assert [s.kind for s in specs] == ["dense", "fused", "lowrank", "fused"]
    fresh = make(arch, seed=1)
    for i, spec in enumerate(specs):
        build_from_spec(fresh, i, spec)
    assert [layer_spec(fresh, i) for i in range(L)] == specs
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(logits(fresh), logits(model))


def test_a_models_mlps_are_found_once_and_anew_when_an_mlp_module_is_replaced(monkeypatch):
    """mlp_io walks a model's module tree once: swapped projections keep the list (each read looks them up anew), a
    replaced MLP module is found again, another model and a copy have their own lists, and a model that goes is collected."""
    model = make("llama")
    first = find_mlp_layers(model)
    walks = []
    walk = discovery._discover
    monkeypatch.setattr(discovery, "_discover", lambda m: walks.append(m) or walk(m))
    write_mlp(model, 1, rand_fused(model, 1, 16, scaled=True))
    assert intermediate_sizes(model) == [D, 16, D, D] and find_mlp_layers(model) == first and walks == []
    new = copy.deepcopy(model.model.layers[2].mlp)
    nn.init.normal_(new.up_proj.weight)
    model.model.layers[2].mlp = new
    assert find_mlp_layers(model)[2].root is new and torch.equal(read_mlp(model, 2).up, new.up_proj.weight) and walks == [model]
    assert find_mlp_layers(model)[2].root is new and walks == [model]
    other = make("llama")
    assert find_mlp_layers(other)[0].root is other.model.layers[0].mlp and walks == [model, other]
    twin = copy.deepcopy(model)  # a copy finds its own
    assert find_mlp_layers(twin)[2].root is twin.model.layers[2].mlp and walks == [model, other, twin]
    gone = weakref.ref(other)
    del other, walks[:]
    gc.collect()
    assert gone() is None


def test_layer_specs_are_plain_data_where_recorded_and_records_read_back():
    """Checkpoints and exported configs hold ``as_dict()``; what they hold today (a dense MLP's six keys, a block's
    experts without biases) reads back to the same typed spec; a bad record is refused."""
    dense = {"kind": "fused", "width": 16, "scaled": True, "rank": None, "up_bias": False, "down_bias": True}
    moe = {"kind": "moe", "experts": {"kind": "lowrank", "width": 64, "scaled": False, "rank": 4}, "shared": dense}
    assert spec_from_dict(dense) == MLPSpec("fused", 16, scaled=True, up_bias=False, down_bias=True)
    assert spec_from_dict(moe) == MoESpec(MLPSpec("lowrank", 64, rank=4), MLPSpec("fused", 16, scaled=True, up_bias=False, down_bias=True))
    assert spec_from_dict({**moe, "shared": None}).shared is None
    for record in (dense, moe, {**moe, "shared": None}):
        assert spec_from_dict(record).as_dict() == record
    model = make("llama")
    write_mlp(model, 1, rand_lowrank(model, 1, 4))
    assert spec_from_dict(layer_spec(model, 1).as_dict()) == layer_spec(model, 1)
    with pytest.raises(ValueError, match="unknown MLP kind 'sparse'"):
        spec_from_dict({**dense, "kind": "sparse"})
    with pytest.raises(ValueError, match="layer 1 has no experts, but its recorded structure is a Mixture-of-Experts block"):
        build_from_spec(model, 1, spec_from_dict(moe))


def test_a_down_bias_in_a_bias_free_gated_mlp_computes_trains_and_rebuilds(tmp_path):
    """Bias compensation's output (FLAP): a narrower Llama MLP whose down projection alone gains a bias [h]."""
    model = make("llama")
    fused = rand_fused(model, 1, 16, scaled=True)
    w = dataclasses.replace(fused.weights, down_bias=0.5 + torch.rand(H))  # nonzero everywhere
    write_mlp(model, 1, dataclasses.replace(fused, weights=w))
    assert layer_spec(model, 1) == MLPSpec("fused", 16, scaled=True, up_bias=False, down_bias=True)
    mods = mlp_modules(model, 1)
    assert mods["gate"].bias is None and mods["up"].bias is None and torch.equal(read_mlp(model, 1).down_bias, w.down_bias)
    x = torch.randn(3, H)
    with torch.no_grad():
        want = (nn.functional.silu(x @ w.gate.T) * (x @ w.up.T) * fused.scale) @ w.down.T + w.down_bias
        torch.testing.assert_close(mlp_forward(model, 1, x), want)
    model(input_ids=IDS, labels=IDS).loss.backward()  # training moves the bias
    assert mods["down"].bias.grad.abs().sum() > 0
    # a checkpoint: saved, its structure rebuilt from the record (as resume and load_exported do), loaded strictly
    spec = {"layer_specs": {str(i): layer_spec(model, i).as_dict() for i in range(L)}}
    torch.save({"state_dict": model.state_dict(), "fusion": spec}, tmp_path / "c.ckpt")
    ckpt = torch.load(tmp_path / "c.ckpt", weights_only=True)
    fresh = make("llama", seed=1)
    apply_spec(fresh, ckpt["fusion"])
    fresh.load_state_dict(ckpt["state_dict"], strict=True)
    assert torch.equal(logits(fresh), logits(model))


def test_a_bias_the_stock_mlp_lacks_makes_no_stock_model():
    """One width everywhere, but a down bias in a bias-free Llama: no stock config holds it (``mlp_bias`` gives every
    layer's gate, up and down a bias), so the export records the structure for load_exported."""
    model = make("llama")
    for i in range(L):
        write_mlp(model, i, rand_fused(model, i, 16, scaled=False))
    assert stock_widths(model) == {"intermediate_size": 16}
    write_mlp(model, 1, FusedMLP(dataclasses.replace(read_mlp(model, 1), down_bias=torch.randn(H))))
    assert stock_widths(model) is None


def test_unsupported_models_raise():
    bart = BartForConditionalGeneration(BartConfig(d_model=16, encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_layers=1, decoder_layers=1,
                                                   encoder_attention_heads=2, decoder_attention_heads=2, vocab_size=V))
    with pytest.raises(ValueError, match=r"'bart' is not in the table and its module structure shows no known MLP layout.*supported: bert"):
        read_mlp(bart, 0)
    with pytest.raises(ValueError, match="Sequential contains no transformers PreTrainedModel"):
        num_layers(nn.Sequential(nn.Linear(4, 4)))
    assert family_of(AutoConfig.for_model("roberta")).mlp.name == "bert"
    assert family_of(GPT2Config()).mlp.name == "gpt2"
    assert family_of(AutoConfig.for_model("qwen2")).mlp.name == "gated"


def test_unknown_model_type_falls_back_to_its_module_structure(caplog):
    """A type missing from the table whose MLPs match exactly one layout is read as that layout (with a warning)."""
    config = AutoConfig.for_model("granite", hidden_size=H, intermediate_size=D, num_hidden_layers=2, num_attention_heads=2,
                                  num_key_value_heads=2, vocab_size=V)
    with caplog.at_level("WARNING"):
        fam = family_of(config)
    assert fam.mlp.name == "gated" and "untested" in caplog.text
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config).eval()
    before = logits(model)
    write_mlp(model, 1, read_mlp(model, 1))
    torch.testing.assert_close(logits(model), before)


@pytest.mark.parametrize("arch", ARCHS)
def test_mlp_forward_matches_hooked_forward(arch):
    model = make(arch)
    write_mlp(model, 2, rand_fused(model, 2, 16, scaled=True))
    out_module = {"bert": lambda i: model.bert.encoder.layer[i].output.dense,  # before dropout/residual/LN
                  "distilbert": lambda i: model.distilbert.transformer.layer[i].ffn,  # eval: dropout is identity
                  "gpt2": lambda i: model.transformer.h[i].mlp,
                  "llama": lambda i: model.model.layers[i].mlp}[arch]
    seen = {}
    hooks = []
    for i in (0, 2):
        hooks.append(mlp_input_module(model, i).register_forward_pre_hook(
            lambda m, args, i=i: seen.__setitem__(("in", i), args[0])))
        hooks.append(out_module(i).register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(("out", i), out)))
    logits(model)
    for h in hooks:
        h.remove()
    for i in (0, 2):
        with torch.no_grad():
            torch.testing.assert_close(mlp_forward(model, i, seen[("in", i)]), seen[("out", i)])
    if arch == "bert":
        assert mlp_input_module(model, 0) is model.bert.encoder.layer[0].intermediate


@pytest.mark.parametrize("arch", ARCHS)
def test_param_names_follow_the_layer_kind(arch):
    model = make(arch)
    params = dict(model.named_parameters())
    n_proj = 3 if arch == "llama" else 2
    dense = mlp_param_names(model, 1)
    assert len(dense) == (3 if arch == "llama" else 4) and set(dense) <= set(params)
    write_mlp(model, 1, rand_lowrank(model, 1, 4))
    lowrank = mlp_param_names(model, 1)
    assert set(lowrank) <= set(dict(model.named_parameters()))
    assert sum(n.endswith("right.weight") for n in lowrank) == n_proj
    write_mlp(model, 1, rand_fused(model, 1, 16, scaled=True))
    assert not any("scale" in n for n in mlp_param_names(model, 1))


def test_reinit_keeps_scale_and_zeroes_biases():
    model = make("bert")
    fused = rand_fused(model, 1, 16, scaled=True)
    write_mlp(model, 1, fused)
    reinit_mlp(model, 1)
    mods = mlp_modules(model, 1)
    assert torch.equal(mods["down"].scale, fused.scale)
    assert not mods["up"].bias.any() and not mods["down"].bias.any()
    assert not torch.equal(mods["up"].weight, fused.weights.up)
    assert abs(mods["up"].weight.std().item() - 0.02) < 0.005


def test_bad_writes_raise():
    model = make("bert")
    w = read_mlp(model, 0)
    with pytest.raises(ValueError, match="activation"):
        write_mlp(model, 0, MLPWeights(w.up, w.down, w.up_bias, w.down_bias, activation="relu"))
    write_mlp(model, 0, rand_fused(model, 0, 16, scaled=False))
    with pytest.raises(ValueError, match="same shape"):
        write_mlp(model, 0, w)  # width 64 into a width-16 layer
    write_mlp(model, 1, rand_lowrank(model, 1, 4))
    with pytest.raises(ValueError, match="LowRankLinear"):
        write_mlp(model, 1, read_mlp(model, 1))


def test_new_modules_take_dtype_of_replaced():
    model = make("llama").to(torch.float64)
    write_mlp(model, 0, rand_fused(model, 0, 16, scaled=True))
    write_mlp(model, 1, rand_lowrank(model, 1, 4))
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert mlp_modules(model, 0)["down"].scale.dtype == torch.float64
    assert torch.isfinite(logits(model)).all()


def test_conv1d_dense_spec_rebuilds_conv1d():
    model = make("gpt2")
    build_from_spec(model, 0, layer_spec(model, 0))
    assert type(model.transformer.h[0].mlp.c_fc) is Conv1D and not model.transformer.h[0].mlp.c_fc.weight.any()
