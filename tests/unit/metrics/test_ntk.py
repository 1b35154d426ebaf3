"""Empirical NTK kernels: the vmap path against the loop, kernel properties, and docs/methods.md §4 in miniature."""

import copy
import gc

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from bench.finetune import _peak_live_bytes
from src.metrics import ntk as ntk_module
from src.metrics.ntk import (
    _passes,
    _sample_bytes,
    class0_prob,
    output_rel_err,
    per_sample_kernels,
    per_sample_kernels_loop,
    regression_pred,
    rel_err,
    sum_kernels,
    target_loglik,
    true_label_logprob,
)

H, D, V, N, T = 16, 32, 40, 5, 9  # hidden, intermediate, vocab, samples, padded length
LENGTHS = [9, 6, 4, 9, 2]  # right padding below these lengths


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops: a second intra-op thread only adds contention (100x slower on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def bert(num_labels: int = 2) -> BertForSequenceClassification:
    cfg = BertConfig(
        vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=2, intermediate_size=D,
        max_position_embeddings=32, num_labels=num_labels,
    )
    return BertForSequenceClassification(cfg)


def gpt2() -> GPT2LMHeadModel:
    cfg = GPT2Config(vocab_size=V, n_embd=H, n_layer=2, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def llama() -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=D, max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return LlamaForCausalLM(cfg)


MLP_NAMES = {
    "bert": "bert.encoder.layer.{i}.intermediate.dense.{p} bert.encoder.layer.{i}.output.dense.{p}",
    "gpt2": "transformer.h.{i}.mlp.c_fc.{p} transformer.h.{i}.mlp.c_proj.{p}",
    "llama": "model.layers.{i}.mlp.gate_proj.{p} model.layers.{i}.mlp.up_proj.{p} model.layers.{i}.mlp.down_proj.{p}",
}


def mlp_params(model: nn.Module, family: str, layer: int) -> list[str]:
    names = [t.format(i=layer, p=p) for t in MLP_NAMES[family].split() for p in ("weight", "bias")]
    params = dict(model.named_parameters())
    return [n for n in names if n in params]


def layer_groups(model: nn.Module, family: str) -> dict[str, list[str]]:
    return {f"layer_{i}": mlp_params(model, family, i) for i in range(2)}


def make_batch(causal: bool, length: int = T, seed: int = 0) -> dict[str, Tensor]:
    """Right-padded batch; LM labels mask the padding and a 1-token prompt with -100."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (N, T), generator=g)
    mask = (torch.arange(T) < torch.tensor(LENGTHS)[:, None]).long()
    ids = ids * mask
    if causal:
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, 0] = -100
    else:
        labels = torch.randint(0, 2, (N,), generator=g)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if length > T:  # more padding, same content
        pad = length - T
        batch = {
            "input_ids": F.pad(ids, (0, pad)),
            "attention_mask": F.pad(mask, (0, pad)),
            "labels": F.pad(labels, (0, pad), value=-100) if causal else labels,
        }
    return batch


def assert_kernels_close(got: dict, ref: dict, tol: float = 1e-5) -> None:
    assert got.keys() == ref.keys()
    for g in ref:
        for k_got, k_ref in zip(got[g], ref[g]):
            assert rel_err(k_got, k_ref) < tol, (g, rel_err(k_got, k_ref))


@pytest.mark.parametrize(
    ("family", "probe"),
    [("bert", class0_prob), ("bert", true_label_logprob), ("gpt2", target_loglik), ("llama", target_loglik)],
)
def test_vmap_matches_loop(family: str, probe) -> None:
    torch.manual_seed(0)
    model = {"bert": bert, "gpt2": gpt2, "llama": llama}[family]()
    model.train()
    attn = model.config._attn_implementation
    batch = make_batch(causal=family != "bert")
    groups = layer_groups(model, family)
    got = per_sample_kernels(model, groups, batch, probe, chunk_size=2)
    assert model.training and model.config._attn_implementation == attn  # both restored
    assert_kernels_close(got, per_sample_kernels_loop(model, groups, batch, probe))
    for k_std, k_sign in got.values():
        assert k_std.shape == k_sign.shape == (N, N) and k_std.dtype == torch.float64
        assert k_std.abs().sum() > 0


def test_regression_probe() -> None:
    torch.manual_seed(0)
    model = bert(num_labels=1)
    batch = make_batch(causal=False)
    groups = layer_groups(model, "bert")
    got = per_sample_kernels(model, groups, batch, regression_pred)
    assert_kernels_close(got, per_sample_kernels_loop(model, groups, batch, regression_pred))


def test_kernel_properties() -> None:
    torch.manual_seed(0)
    model = bert().eval()
    batch = make_batch(causal=False)
    groups = layer_groups(model, "bert")
    kernels = per_sample_kernels(model, groups | {"both": groups["layer_0"] + groups["layer_1"]}, batch, class0_prob)

    k_std, k_sign = kernels["layer_0"]
    assert torch.allclose(k_std, k_std.T)
    # diag(K_sign)[i] = g_i · sign(g_i) = ‖g_i‖_1, with g_i from plain autograd on sample i alone
    params = [model.get_parameter(n) for n in groups["layer_0"]]
    for i, length in enumerate(LENGTHS):
        logits = model(input_ids=batch["input_ids"][i : i + 1, :length]).logits
        g = torch.cat([p.flatten() for p in torch.autograd.grad(class0_prob(logits, {}), params)]).double()
        assert torch.allclose(k_sign[i, i], g.abs().sum(), rtol=1e-5)
        assert torch.allclose(k_std[i, i], g @ g, rtol=1e-5)

    # both kernels are sums over parameters: the union's kernel is the sum of the groups'
    for k_sum, k_union in zip(sum_kernels(kernels, ["layer_0", "layer_1"]), kernels["both"]):
        assert rel_err(k_sum, k_union) < 1e-12


def test_padding_invariance_and_passes() -> None:
    torch.manual_seed(0)
    model = gpt2()
    groups = layer_groups(model, "gpt2")
    ref = per_sample_kernels(model, groups, make_batch(causal=True), target_loglik)
    assert_kernels_close(per_sample_kernels(model, groups, make_batch(causal=True, length=T + 4), target_loglik), ref)
    # a gradient budget too small for both groups at once: one pass per group, same kernels
    assert_kernels_close(per_sample_kernels(model, groups, make_batch(causal=True), target_loglik, max_bytes=1), ref)


def test_passes_and_chunks_fit_the_memory_budget(caplog: pytest.LogCaptureFixture) -> None:
    """Each pass's G plus its chunk's working memory stays under the budget: groups share a pass while
    a one-sample chunk fits, the chunk takes what is left (up to chunk_size); a group too large alone
    runs with one-sample chunks and a warning."""
    model = gpt2()
    groups = layer_groups(model, "gpt2")
    p = sum(model.get_parameter(n).numel() * 4 for n in groups["layer_0"])  # one sample's gradient of one group, bytes
    a = 1000  # one sample's working memory

    def passes(budget: int) -> list[tuple[list[str], int]]:
        return list(_passes(model, groups, N, 8, a, budget))

    assert passes(N * 2 * p + 8 * (2 * p + a)) == [(["layer_0", "layer_1"], 8)]
    assert passes(N * 2 * p + 3 * (2 * p + a)) == [(["layer_0", "layer_1"], 3)]
    # both groups with a one-sample chunk: a byte short; each alone: (budget - N·p) // (p + a) = 6 samples
    assert passes((N + 1) * 2 * p + a - 1) == [(["layer_0"], 6), (["layer_1"], 6)]
    with caplog.at_level("WARNING", logger="src.metrics.ntk"):
        assert passes(N * p) == [(["layer_0"], 1), (["layer_1"], 1)]
    assert "over the memory budget" in caplog.text


def test_sample_working_memory_counts_the_log_probabilities() -> None:
    """A causal LM's estimate holds at least the three [T, V] gradients alive where the backward starts."""
    model = gpt2()
    batch = make_batch(causal=True)
    names = layer_groups(model, "gpt2")["layer_0"]

    def f(theta: dict[str, Tensor], sample: dict[str, Tensor]) -> Tensor:
        inputs = {k: sample[k].unsqueeze(0) for k in ("input_ids", "attention_mask")}
        return target_loglik(torch.func.functional_call(model, theta, args=(), kwargs=inputs).logits, sample)

    def live_tensors() -> int:
        gc.collect()
        return sum(isinstance(o, Tensor) for o in gc.get_objects())

    before = live_tensors()
    with torch.no_grad():
        estimate = _sample_bytes(model, f, names, {k: v[0] for k, v in batch.items()})
    assert 3 * T * V * 4 < estimate < 100 * T * V * 4
    assert all(p.grad is None for p in model.parameters())  # a forward only: nothing accumulated
    # the recorded graph is freed with its output: nothing it saved stays alive (a saved-tensor hook
    # that hands back the tensor itself leaks the graph through a cycle gc cannot see)
    assert live_tensors() == before


def test_sample_working_memory_counts_activations_freed_during_the_forward() -> None:
    """Every activation saved along a deep chain counts, though nothing keeps them alive once saved
    (keyed by storage address, a freed one's address handed to the next would count once)."""
    depth, width = 12, 256
    model = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.SiLU()) for _ in range(depth)])

    def f(theta: dict[str, Tensor], sample: dict[str, Tensor]) -> Tensor:
        return torch.func.functional_call(model, theta, (sample["x"],)).sum()

    x = torch.randn(T, width)
    with torch.no_grad():
        estimate = _sample_bytes(model, f, ["0.0.weight"], {"x": x})
    # saved: x (for the first Linear's weight) and each SiLU's input, [T, width] each, each storage
    # once, plus three times the largest (see ``_sample_bytes``); the Linears above the first save
    # only their (not differentiated) weights
    assert estimate == (1 + depth + 3) * T * width * 4


def test_vmap_pass_stays_within_its_memory_estimate(monkeypatch: pytest.MonkeyPatch) -> None:
    """The live bytes a pass allocates (the profiler's allocation events, replayed) stay within what
    ``per_sample_kernels`` counts for it, n·P + chunk·(P + A), for θ at the bottom of an 8-layer
    Llama (the backward runs through every layer). torch.func.grad's backward, which keeps the graph,
    peaked at 4.6x the count here."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    n, length, chunk = 8, 48, 4
    ids = torch.randint(1, V, (n, length))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    groups = {"probe": mlp_params(model, "llama", 0)}
    estimates: list[int] = []
    monkeypatch.setattr(ntk_module, "_sample_bytes", lambda *a: estimates.append(_sample_bytes(*a)) or estimates[-1])
    per_sample_kernels(model, groups, batch, target_loglik, chunk, 1 << 30)  # warm-up: one-time allocations
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        per_sample_kernels(model, groups, batch, target_loglik, chunk, 1 << 30)
    p = sum(model.get_parameter(name).numel() * 4 for name in groups["probe"])
    assert _peak_live_bytes(prof) <= n * p + chunk * (p + estimates[-1])


def test_output_rel_err_ignores_padding() -> None:
    y_ref = torch.randn(2, 3, 4)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    y_new = y_ref.clone()
    y_new[~mask] = 100.0
    assert output_rel_err(y_new, y_ref, mask) == 0.0
    assert output_rel_err(2 * y_ref, y_ref) == pytest.approx(1.0)


class ScaledDown(nn.Module):
    """``F.linear(scale * x, W, b)``: MLP fusion's down projection with the frozen cluster counts."""

    def __init__(self, weight: Tensor, bias: Tensor, scale: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.clone())
        self.bias = nn.Parameter(bias.clone())
        self.register_buffer("scale", scale.clone())

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x * self.scale, self.weight, self.bias)


def test_fusion_of_identical_pairs_keeps_sign_kernel() -> None:
    """docs/methods.md §4: fusing identical sub-MLP pairs at k = d/2 with frozen counts 2 keeps the outputs
    and the sign kernel exactly, while the standard kernel of the fused layer is off by ~1."""
    torch.manual_seed(0)
    original = bert().eval()
    mlp = original.bert.encoder.layer[1]
    half = D // 2
    with torch.no_grad():
        # O(1) activations (BERT's init, std 0.02, leaves b2's gradient dominating the kernel)
        for lin in (mlp.intermediate.dense, mlp.output.dense):
            nn.init.normal_(lin.weight, std=lin.in_features**-0.5)
        # second half of the sub-MLPs := a copy of the first half
        mlp.intermediate.dense.weight[half:] = mlp.intermediate.dense.weight[:half]
        mlp.intermediate.dense.bias[half:] = mlp.intermediate.dense.bias[:half]
        mlp.output.dense.weight[:, half:] = mlp.output.dense.weight[:, :half]

    fused = copy.deepcopy(original)
    layer = fused.bert.encoder.layer[1]
    up = nn.Linear(H, half)
    with torch.no_grad():
        up.weight.copy_(mlp.intermediate.dense.weight[:half])
        up.bias.copy_(mlp.intermediate.dense.bias[:half])
    layer.intermediate.dense = up
    layer.output.dense = ScaledDown(mlp.output.dense.weight[:, :half], mlp.output.dense.bias, torch.full((half,), 2.0))

    batch = make_batch(causal=False)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        out_o, out_f = original(**inputs, output_hidden_states=True), fused(**inputs, output_hidden_states=True)
    assert rel_err(out_f.logits, out_o.logits) < 1e-5
    assert output_rel_err(out_f.hidden_states[-1], out_o.hidden_states[-1], batch["attention_mask"].bool()) < 1e-5

    groups = layer_groups(original, "bert") | {"b2": ["bert.encoder.layer.1.output.dense.bias"]}
    k_orig = per_sample_kernels(original, groups, batch, class0_prob)
    k_fused = per_sample_kernels(fused, groups, batch, class0_prob)
    std_err, sign_err = (rel_err(a, b) for a, b in zip(k_fused["layer_1"], k_orig["layer_1"]))
    assert sign_err < 1e-5
    assert std_err > 0.75, std_err
    # exactly: the counts double the gradients of the pairs' parameters, so their G Gᵀ doubles (the
    # pair's 2 g gᵀ becomes (2g)(2g)ᵀ); only b2, shared as it is, keeps its share
    k_b2 = k_orig["b2"][0]
    assert rel_err(k_fused["layer_1"][0], 2 * k_orig["layer_1"][0] - k_b2) < 1e-5
    for a, b in zip(k_fused["layer_0"], k_orig["layer_0"]):  # uncompressed first layer
        assert rel_err(a, b) < 1e-5
