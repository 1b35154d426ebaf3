"""Empirical NTK of a scalar probe output, and the relative errors that compare models (docs/methods.md §4).

For probe samples x_1..x_n and a parameter set θ, ``G`` is the ``[n, |θ|]`` matrix of per-sample
gradients ∂f(x_i)/∂θ. The standard (SGD) kernel is ``G Gᵀ`` and the sign (Adam) kernel
``G sign(G)ᵀ``; both are ``[n, n]`` whatever θ is, so models whose parameters differ in shape can be
compared. Both are sums over parameters, so the kernel of a union of groups is the sum of theirs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from src.models.inputs import MODEL_INPUTS  # every tensor in the batch (labels included) reaches the probe

log = logging.getLogger(__name__)

ProbeFn = Callable[[Tensor, dict[str, Tensor]], Tensor]
Kernels = tuple[Tensor, Tensor]  # (K_std, K_sign), each [n, n] float64

# transformers 5.x decides, per batch, whether a mask can be skipped (no padding -> `is_causal` or
# no mask) by reading the mask's values (`padding_mask.all()`): data-dependent control flow that
# vmap refuses. This attention implementation always materialises the boolean mask (the sample's
# padding, plus causality for decoders) and runs SDPA's math backend, which decomposes into
# matmul/softmax and so batches under vmap (the fused CPU kernel has no batching rule: vmap would
# fall back to a per-sample loop, with a warning).
_VMAP_ATTN = "ntk_vmap_sdpa"


def _vmap_mask(*args, **kwargs) -> Tensor:
    kwargs.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
    return sdpa_mask(*args, **kwargs)


def _vmap_attention(*args, **kwargs) -> tuple[Tensor, None]:
    with sdpa_kernel(SDPBackend.MATH):
        return sdpa_attention_forward(*args, **kwargs)


AttentionInterface.register(_VMAP_ATTN, _vmap_attention)
AttentionMaskInterface.register(_VMAP_ATTN, _vmap_mask)


# ---------------------------------------------------------------------------------------------
# Probe outputs f(x): (logits of one sample [1, ...], that sample's batch row) -> scalar
# ---------------------------------------------------------------------------------------------


def class0_prob(logits: Tensor, sample: dict[str, Tensor]) -> Tensor:
    """Softmax probability of class 0 (the research code's probe); logits [1, C]."""
    return logits[0].float().softmax(-1)[0]


def true_label_logprob(logits: Tensor, sample: dict[str, Tensor]) -> Tensor:
    """Log-probability of ``sample["labels"]`` (a 0-dim class index); logits [1, C]."""
    logp = logits[0].float().log_softmax(-1)  # [C]
    return logp.gather(0, sample["labels"].reshape(1)).squeeze(0)


def regression_pred(logits: Tensor, sample: dict[str, Tensor]) -> Tensor:
    """The single regression output (STS-B); logits [1, 1]."""
    return logits.float().reshape(())


def target_loglik(logits: Tensor, sample: dict[str, Tensor]) -> Tensor:
    """Mean next-token log-likelihood of the target tokens of a causal LM; logits [1, T, V].

    Position t predicts ``labels[t + 1]`` (HF's causal-LM shift); only targets with
    ``labels != -100`` count, and, where the sample has an attention mask, only non-padding ones.
    """
    logp = logits[0, :-1].float().log_softmax(-1)  # [T-1, V]
    target = sample["labels"][1:]  # [T-1]
    valid = target != -100
    if "attention_mask" in sample:
        valid = valid & sample["attention_mask"][1:].bool()
    tok = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [T-1]
    return (tok * valid).sum() / valid.sum()


def seq2seq_target_loglik(logits: Tensor, sample: dict[str, Tensor]) -> Tensor:
    """Mean log-likelihood of the target tokens of an encoder-decoder model; logits [1, T, V].

    The decoder's inputs are the labels shifted right, so position t predicts ``labels[t]`` (no shift
    here); only targets with ``labels != -100`` count.
    """
    logp = logits[0].float().log_softmax(-1)  # [T, V]
    target = sample["labels"]  # [T]
    valid = target != -100
    tok = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [T]
    return (tok * valid).sum() / valid.sum()


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


def per_sample_kernels(
    model: nn.Module,
    param_groups: dict[str, list[str]],
    batch: dict[str, Tensor],
    probe_fn: ProbeFn,
    chunk_size: int = 8,
    max_bytes: int = 2 << 30,
) -> dict[str, Kernels]:
    """(K_std, K_sign), each [n, n] float64, for every named group of parameters (vectorised).

    Per-sample gradients come from ``vmap`` of a ``vjp`` over chunks of at most ``chunk_size`` samples,
    each sample run alone (``unsqueeze(0)``) with its own attention mask, the model in eval mode.

    Memory, kept under ``max_bytes`` (an estimate, not a measurement of the process): a pass over the
    probe set holds G of its groups, n·P bytes (P: one sample's gradient of the pass's parameters),
    and while a chunk of c samples runs, c·(P + A): the chunk's gradients as the backward builds them
    (counted again though they become G's rows: the accumulation buffers of a parameter used more
    than once, an MoE expert's, are as large) and each sample's activations and their gradients, A,
    estimated once on the first sample (``_sample_bytes``). Groups are packed into a pass while it
    fits with a one-sample chunk, then the chunk takes what is left, up to ``chunk_size``: fewer
    passes save whole forwards, a larger chunk only per-sample dispatch. A group that does not fit
    alone runs with one-sample chunks, over the budget (a warning says by how much). The kernel
    products' column blocks (``_kernels``: n x 65536 floats) and the model itself are not counted.
    """
    tensors = _tensors(batch)
    n_samples = _n_samples(tensors)

    def f(theta: dict[str, Tensor], sample: dict[str, Tensor]) -> Tensor:
        inputs = {k: sample[k].unsqueeze(0) for k in MODEL_INPUTS if k in sample}
        return probe_fn(functional_call(model, theta, args=(), kwargs=inputs).logits, sample)

    def sample_grad(theta: dict[str, Tensor], sample: dict[str, Tensor]) -> dict[str, Tensor]:
        # `vjp` rather than `grad`: `grad` runs its backward with create_graph=True, which keeps every
        # saved activation, and records the backward's own intermediates, until it returns (SmolLM2,
        # θ at layer 0: 3.9 GB against this vjp's 1.8 GB). Called under no_grad, the vjp
        # builds no graph and frees each node's saved tensors as the backward passes it.
        out, vjp_fn = vjp(lambda th: f(th, sample), theta)
        with torch.no_grad():
            return vjp_fn(torch.ones_like(out))[0]

    # only θ is differentiated; no_grad keeps the other (captured) parameters from recording a graph.
    per_sample_grad = vmap(sample_grad, in_dims=(None, 0))
    kernels = {}
    with _eval_mode(model), _attn_implementation(model, _VMAP_ATTN), torch.no_grad():
        # every group's parameters differentiated at once: the most a pass can save (from the earliest group's layer up)
        every = list(dict.fromkeys(n for names in param_groups.values() for n in names))
        sample_bytes = _sample_bytes(model, f, every, {k: v[0] for k, v in tensors.items()})
        # One forward/backward per chunk yields every group's gradients at once, far cheaper than a
        # pass per group (each would repeat the forward); the price is holding G for all groups of
        # a pass, n·|θ| values.
        for groups, chunk in _passes(model, param_groups, n_samples, chunk_size, sample_bytes, max_bytes):
            names = list(dict.fromkeys(n for g in groups for n in param_groups[g]))
            theta = {n: model.get_parameter(n).detach() for n in names}
            grads = {n: [] for n in names}  # name -> chunks of G, each [chunk, numel]
            for start in range(0, n_samples, chunk):
                rows = {k: v[start : start + chunk] for k, v in tensors.items()}
                for n, g in per_sample_grad(theta, rows).items():
                    grads[n].append(g.flatten(1))
            kernels |= {g: _kernels([grads[n] for n in param_groups[g]]) for g in groups}
    return kernels


def per_sample_kernels_loop(
    model: nn.Module,
    param_groups: dict[str, list[str]],
    batch: dict[str, Tensor],
    probe_fn: ProbeFn,
) -> dict[str, Kernels]:
    """Reference for :func:`per_sample_kernels`: a Python loop of ``torch.autograd.grad`` per sample.

    Runs the model with its own attention implementation, so it also checks the vmap path's; and
    it is the path for models whose forward does not batch under vmap (``mlp_io.vmappable``).
    """
    tensors = _tensors(batch)
    n_samples = _n_samples(tensors)
    names = list(dict.fromkeys(n for group in param_groups.values() for n in group))
    # Fresh leaves, so that frozen parameters get gradients too.
    theta = {n: model.get_parameter(n).detach().requires_grad_() for n in names}
    grads = {n: [] for n in names}  # name -> rows of G, each [1, numel]
    with _eval_mode(model), torch.enable_grad():
        for i in range(n_samples):
            sample = {k: v[i] for k, v in tensors.items()}
            inputs = {k: sample[k].unsqueeze(0) for k in MODEL_INPUTS if k in sample}
            out = probe_fn(functional_call(model, theta, args=(), kwargs=inputs).logits, sample)
            # an expert the sample's tokens never reach has a zero gradient, not none
            for n, g in zip(names, torch.autograd.grad(out, list(theta.values()), allow_unused=True, materialize_grads=True)):
                grads[n].append(g.reshape(1, -1))
    return {g: _kernels([grads[n] for n in group]) for g, group in param_groups.items()}


def sum_kernels(kernels: dict[str, Kernels], groups: Iterable[str] | None = None) -> Kernels:
    """Kernels of the union of ``groups`` (default: all) = the sum of the groups' kernels.

    Exact only where the groups share no parameter.
    """
    keys = list(kernels if groups is None else groups)
    return sum(kernels[k][0] for k in keys), sum(kernels[k][1] for k in keys)


def rel_err(k_new: Tensor, k_ref: Tensor) -> float:
    """Relative Frobenius error ‖k_new − k_ref‖_F / ‖k_ref‖_F."""
    k_new, k_ref = k_new.double(), k_ref.double()
    return (torch.linalg.norm(k_new - k_ref) / torch.linalg.norm(k_ref)).item()


def output_rel_err(y_new: Tensor, y_ref: Tensor, mask: Tensor | None = None) -> float:
    """Relative L2 error ‖y_new − y_ref‖ / ‖y_ref‖; ``mask`` [B, T] bool keeps the non-padding positions
    of outputs [B, T, ...]."""
    if mask is not None:
        y_new, y_ref = y_new[mask], y_ref[mask]  # [B, T, ...] -> [N, ...]
    return rel_err(y_new, y_ref)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _kernels(grads: list[list[Tensor]], block: int = 1 << 16) -> Kernels:
    """Sum over parameters p of G_p G_pᵀ and G_p sign(G_p)ᵀ; G_p [n, numel] given as row chunks.

    Products over ``block`` columns at a time (gathering the chunks' columns there, rather than
    copying whole chunks into one G, keeps the copies in cache), summed in float64. On CPU the blocks
    multiply in float32 (float64 GEMM there is ~3x slower; the error stays ~1e-7 relative);
    elsewhere in float64, which also keeps TF32 (``set_float32_matmul_precision("high")``) out.
    """
    first = grads[0][0]
    n = sum(len(c) for c in grads[0])
    dtype = torch.float32 if first.device.type == "cpu" else torch.float64
    k = torch.zeros(n, 2 * n, dtype=torch.float64, device=first.device)  # [K_std | K_sign]
    for chunks in grads:
        for start in range(0, chunks[0].shape[1], block):
            g = torch.cat([c[:, start : start + block] for c in chunks]).to(dtype)  # [n, block]
            k += (g @ torch.cat([g, g.sign()]).T).double()
    return k[:, :n].contiguous(), k[:, n:].contiguous()


def _passes(
    model: nn.Module, param_groups: dict[str, list[str]], n_samples: int, chunk_size: int, sample_bytes: int, max_bytes: int,
) -> Iterator[tuple[list[str], int]]:
    """Greedily pack groups into passes, each with its chunk size, that fit in ``max_bytes``: G
    (n_samples·P) plus a chunk's working memory (chunk·(P + sample_bytes)), P the bytes of one
    sample's gradient of the pass's parameters (see ``per_sample_kernels``)."""

    def grad_bytes(names: set[str]) -> int:
        return sum(model.get_parameter(n).numel() * model.get_parameter(n).element_size() for n in names)

    def chunk_for(size: int) -> int:
        return max(1, min(chunk_size, (max_bytes - n_samples * size) // (size + sample_bytes)))

    def fits(size: int) -> bool:
        return (n_samples + 1) * size + sample_bytes <= max_bytes  # with a one-sample chunk

    current, names = [], set()
    for group, group_names in param_groups.items():
        more = names | set(group_names)
        if current and not fits(grad_bytes(more)):
            yield current, chunk_for(grad_bytes(names))
            current, more = [], set(group_names)
        current.append(group)
        names = more
        size = grad_bytes(names)
        if len(current) == 1 and not fits(size):
            log.warning("NTK kernels of %s: its per-sample gradients and one sample's working memory need an estimated %.2f GB, "
                        "over the memory budget of %.2f GB", group, ((n_samples + 1) * size + sample_bytes) / 2**30, max_bytes / 2**30)
    if current:
        yield current, chunk_for(grad_bytes(names))


def _sample_bytes(model: nn.Module, f: Callable[[dict[str, Tensor], dict[str, Tensor]], Tensor], names: list[str], sample: dict[str, Tensor]) -> int:
    """One sample's working memory in the vmap'd backward, in bytes (an estimate).

    The activations autograd saves in one plain forward of ``f`` with the parameters ``names``
    differentiated (each storage once; the model's own parameters and buffers not counted), plus
    three times the largest of them: the gradients alive together where the backward starts (a
    causal LM: its [T, V] log-probabilities', the logits' and their slice's). SmolLM2 (T 104, 16
    samples, chunks of 8, θ one layer's MLP): 177 MB a sample for a θ at layer 0, and a pass peaked
    1,805 MB above its start in RSS against 1,660 MB counted by ``per_sample_kernels``; at layer 15
    1,204 against 1,259, at layer 29 680 against 884.
    """
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, int] = {}
    # Held until the forward ends: a storage freed meanwhile would hand its address to a later one,
    # which the data_ptr key would then count once (SmolLM2, θ at layer 0: 81-140 MB against 177).
    alive: list[Tensor] = []

    def pack(t: Tensor) -> None:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            saved[storage.data_ptr()] = storage.nbytes()
            alive.append(t)
        # nothing runs the backward, so the graph needs no tensor back; returning ``t`` itself would
        # make a cycle through C++ (an op's saved output -> its grad_fn -> the saved output) that
        # Python's gc cannot see: the whole graph, one sample's activations (SmolLM2: ~350 MB), leaked
        return None

    # every other parameter passed detached, so that only `names` record a graph (as under `grad`,
    # which refuses saved-tensor hooks)
    theta = {n: p.detach() for n, p in model.named_parameters()} | {n: model.get_parameter(n).detach().requires_grad_() for n in names}
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda _: None):
        f(theta, sample)
    alive.clear()
    return sum(saved.values()) + 3 * max(saved.values(), default=0)


def _tensors(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v for k, v in batch.items() if isinstance(v, Tensor)}


def _n_samples(tensors: dict[str, Tensor]) -> int:
    return len(tensors["input_ids"])


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """No dropout during the computation; every module's train/eval flag is restored after."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


@contextmanager
def _attn_implementation(model: nn.Module, name: str) -> Iterator[None]:
    original = model.config._attn_implementation
    if not getattr(model, "_supports_sdpa", False):  # eager only (Switch Transformers): plain matmul/softmax, batches under vmap
        yield
        return
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(original)
