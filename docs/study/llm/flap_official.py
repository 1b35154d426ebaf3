"""FLAP's official code (CASIA-LMC-Lab/FLAP, lib/) on SmolLM2's MLPs, beside ``ffn_mode=flap`` in the quality study.

    git clone https://github.com/CASIA-LMC-Lab/FLAP /tmp/FLAP      # commit 3bb57db was read
    PYTHONPATH=/tmp/FLAP python docs/study/llm/flap_official.py                 # every size and layout
    PYTHONPATH=/tmp/FLAP python docs/study/llm/flap_official.py --reference tests/data/flap_reference_tiny.json \
        --model tiny_smollm2 --layers 1 2 3 --mid-dim 48                        # a test's reference values

What runs is FLAP's own: ``lib.layerwrapper.BiasGPT`` collects each down projection's statistics
(``add_batch`` on its input, sequence by sequence, the original model's states passed on), ``lib.prune.metrics
["WIFV"]`` scores, and ``lib.prune.compress`` prunes and adds the bias. The glue is this file's: the MLPs
only (FLAP also prunes attention heads; ``remove_heads`` has no MLP-only setting), the calibration
sequences of the quality study (the first 128 rt_review training inputs drawn with seed 0, unpadded, one
at a time, as FLAP feeds its windows) instead of WikiText-2, which is not offline, and float32 on the CPU
(FLAP runs float16 on a GPU; its baseline is still rounded to float16 before the bias, as FLAP does).
The two structures are FLAP's UL-UM (the same fraction removed in each chosen layer: ``uniform``) and
AL-MM (scores standardised per layer, the globally lowest removed: ``budget``), their threshold lines
transcribed from ``prune_flap``. Results go to ``quality/flap_official.jsonl`` in the quality study's format.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import torch
from lib.layerwrapper import BiasGPT  # FLAP's (PYTHONPATH=<FLAP checkout>)
from lib.prune import compress, metrics  # FLAP's
from quality import HERE, SIZES, PeakRSS, config, evaluate
from torch import nn

from src.builders import build_data_and_module
from src.pipeline.fuse import count_params
from src.preflight import preflight


def statistics(model: nn.Module, sequences: list[torch.Tensor], layers: list[int]) -> dict[int, BiasGPT]:
    """FLAP's BiasGPT of each layer's down projection, fed every calibration sequence [1, L] through the original model."""
    blocks = model.model.layers
    wrapped = {i: BiasGPT(blocks[i].mlp.down_proj, "WIFV") for i in layers}
    hooks = [blocks[i].mlp.down_proj.register_forward_hook(lambda _, inp, out, i=i: wrapped[i].add_batch(inp[0].data, out.data))
             for i in layers]
    with torch.no_grad():
        for ids in sequences:
            model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    return wrapped


def masks(model: nn.Module, wrapped: dict[int, BiasGPT], kind: str, removed: int) -> dict[int, torch.Tensor]:
    """Kept-neuron masks: UL-UM (``removed`` per layer) or AL-MM (``removed`` over all layers), as prune_flap thresholds."""
    blocks = model.model.layers
    metric = {i: metrics["WIFV"](wrapped, {i: blocks[i].mlp.down_proj}, i) for i in wrapped}
    if kind == "uniform":  # prune_flap, UL-UM: thresh = sort(W_metric)[int(numel * ratio)]; W_mask = W_metric >= thresh
        return {i: m >= torch.sort(m)[0][removed] for i, m in metric.items()}
    standarlization = lambda x: (x - torch.mean(x, axis=1, keepdim=True)) / torch.std(x, axis=1, keepdim=True)  # noqa: E731  (prune_flap's)
    stacked = standarlization(torch.stack(list(metric.values())))
    thres = torch.sort(stacked.view(-1), descending=True)[0][-removed]  # prune_flap, AL-MM: mlp_thres = sorted_mlp[-cal_remove_neuron]
    return {i: row > thres for i, row in zip(metric, stacked)}


def prune(model: nn.Module, wrapped: dict[int, BiasGPT], keep: dict[int, torch.Tensor]) -> None:
    """FLAP's ``compress`` on each layer's MLP, with its bias (a zero bias first: SmolLM2's down projections have none)."""
    for i, mask in keep.items():
        down = model.model.layers[i].mlp.down_proj
        down.bias = nn.Parameter(torch.zeros(down.out_features))
        baseline = wrapped[i].baseline_inp.type(torch.half).float()  # FLAP keeps it in float16; float32 for our float32 weights
        compress(model.model.layers[i], None, mask, None, baseline, "cpu", bias=True, unstr=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(HERE / "quality" / "flap_official.jsonl"))
    parser.add_argument("--reference", help="write the kept neurons and biases of --layers at --mid-dim (UL-UM) to this JSON")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--layers", type=int, nargs="*", default=None)
    parser.add_argument("--mid-dim", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = config(["ffn_mode=flap", f"model={args.model}"])
    _, splits, _ = preflight(cfg)
    torch.manual_seed(0)  # a tiny model's random weights, as tests/unit/methods/test_flap.py draws them
    datamodule, original = build_data_and_module(cfg, splits)
    datamodule.setup()
    c = cfg.ffn_mode.calib
    sequences = [ids[mask.bool()][None] for b in datamodule.calib_batches(c.size, c.seed, c.batch_size, c.source)
                 for ids, mask in zip(b["input_ids"], b["attention_mask"])]
    width = original.model.config.intermediate_size
    if args.reference:
        model = copy.deepcopy(original.model)
        wrapped = statistics(model, sequences, args.layers)
        keep = masks(model, wrapped, "uniform", width - args.mid_dim)
        prune(model, wrapped, keep)
        ref = {"model": args.model, "calib": dict(c), "mid_dim": args.mid_dim,
               "layers": {str(i): {"kept": keep[i].nonzero().flatten().tolist(), "bias": model.model.layers[i].mlp.down_proj.bias.tolist()}
                          for i in args.layers}}
        Path(args.reference).write_text(json.dumps(ref))
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    n_layers = original.model.config.num_hidden_layers
    for kind in ("uniform", "budget"):
        for size, (mid_dim, budget) in SIZES.items():
            layers = list(range(10, 30)) if kind == "uniform" else list(range(n_layers))
            removed = width - mid_dim if kind == "uniform" else round((1 - budget) * width * n_layers)
            module = copy.deepcopy(original)
            start = time.perf_counter()
            with PeakRSS() as rss:
                wrapped = statistics(module.model, sequences, layers)
                keep = masks(module.model, wrapped, kind, removed)
                prune(module.model, wrapped, keep)
            row = {"setting": f"flap_official/bias/{kind}/{size}", "compress_s": time.perf_counter() - start, "compress_peak_mb": rss.mb,
                   "params_after": count_params(module.model), "widths": {str(i): int(m.sum()) for i, m in keep.items()}}
            row.update(evaluate(module, datamodule))
            logging.info("%s: %s", row["setting"], {k: row[k] for k in ("val_ppl", "hamlet_ppl", "params_after")})
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
