"""Hugging Face folders of compressed models: write (with scales folded) and load back.

When every layer's MLP is a plain MLP with the stock model's parameters (no bias the stock MLP
lacks) and each of the config's width attributes takes one value across the layers
(``mlp_io.stock_widths``), the folder is a stock transformers model with those widths in its config
and loads with ``AutoModelFor*.from_pretrained``. Otherwise ``config.json`` also records the
per-layer structure under ``mlp_fusion`` (a bias per layer and projection: a compensated down bias
in a bias-free Llama stays on its layer's down projection alone) and :func:`load_exported` rebuilds
it. :func:`export_onnx` writes the folded model as ONNX, whatever its per-layer widths, and checks
it with ONNX Runtime (sequence classifiers and causal LMs: :func:`onnx_unsupported`).
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from src.models import mlp_io
from src.models.build import load_exported  # noqa: F401  (the loader of what this module writes; it lives with the other loaders)

ONNX_RTOL = 1e-4  # ONNX Runtime's logits against PyTorch's: relative Frobenius error allowed
# the heads (src.models.build.HEADS) export_onnx traces: one stack whose logits follow from
# input_ids and attention_mask alone; an encoder-decoder model also takes decoder inputs and
# generates by calling its decoder in a loop, which this single-graph export does not cover
ONNX_HEADS = ("classification", "generation")


def onnx_unsupported(head: str) -> str | None:
    """Why a model with task head ``head`` gets no ONNX export (one clause), or None when it does."""
    if head in ONNX_HEADS:
        return None
    return f"ONNX export covers sequence classifiers and causal LMs, not encoder-decoder ({head}) models"


def prepare_for_export(model: PreTrainedModel) -> dict[str, int] | None:
    """Fold count scales into the down projections (exact) and describe the structure in the config:
    the widths of a stock model (``mlp_io.stock_widths``), else the per-layer structure.

    Returns those stock widths ({config attribute: width}, the folder loads with plain
    ``from_pretrained``), or None when the folder needs :func:`load_exported`."""
    mlp_io.fold_scales(model)
    widths = mlp_io.stock_widths(model)
    if widths is not None:
        mlp_io.set_config_widths(model.config, widths)
        if hasattr(model.config, "mlp_fusion"):
            del model.config.mlp_fusion
    else:
        model.config.mlp_fusion = {"layer_specs": {str(i): mlp_io.layer_spec(model, i).as_dict() for i in range(mlp_io.num_layers(model))}}
    return widths


class _Logits(nn.Module):
    """``model(**inputs).logits`` with positional inputs, no KV cache: the graph ``torch.onnx`` traces."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model
        self.kwargs = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **extra, **self.kwargs).logits


@torch.no_grad()
def export_onnx(model: PreTrainedModel, path: Path, samples: dict[str, Tensor]) -> tuple[list[str], float]:
    """Write ``model`` (scales folded) to ``path`` with dynamic batch and sequence axes; check ONNX
    Runtime's logits on ``samples`` (real tokenized inputs) against PyTorch's.

    Returns (input names, relative error); ValueError naming the numbers if the error exceeds ``ONNX_RTOL``.
    """
    import onnxruntime as ort

    params = inspect.signature(model.forward).parameters
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if "token_type_ids" in samples and "token_type_ids" in params else [])
    wrapper = _Logits(model.eval()).eval()
    example = tuple(samples[n] for n in names)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    with warnings.catch_warnings():  # the exporter's notes (renamed axes, deprecations) and progress lines are not the user's
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, example, str(path), input_names=names, output_names=["logits"], dynamo=True, verbose=False,
                          dynamic_shapes={n: {0: batch, 1: seq} for n in names}, external_data=False)
    # the check runs other shapes than the traced ones: the axes must really be dynamic
    check = {n: torch.cat([samples[n], samples[n][:1]]) for n in names}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(["logits"], {n: t.numpy() for n, t in check.items()})[0])
    ref = wrapper(*check.values())
    err = (torch.linalg.norm(got.double() - ref.double()) / torch.linalg.norm(ref.double())).item()
    if not err <= ONNX_RTOL:
        raise ValueError(f"the ONNX export's logits differ from PyTorch's by {err:.2e} (relative; allowed {ONNX_RTOL:.0e}) on {len(got)} inputs")
    return names, err
