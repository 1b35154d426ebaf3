"""A model folder read one module at a time: the model as a skeleton on the meta device, each module's
tensors read lazily from the folder's safetensors shards when it is materialised, and dropped after.

This is how a model larger than memory is compressed (``src.pipeline.stream``): only the module being
worked on holds real tensors. Pickle checkpoints (``pytorch_model.bin``) are refused: unpickling runs
code from the file and cannot read one tensor without reading the whole file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import Tensor, nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from src.utils.errors import ConfigError

INDEX = "model.safetensors.index.json"
# safetensors' dtype names (a slice's get_dtype) as torch dtypes
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
           "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
SINGLE = "model.safetensors"


class ShardReader:
    """The tensors of a Hugging Face folder's safetensors shards by name, each read only when asked for."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.weight_map = shard_map(self.folder)  # {tensor name: shard file name}
        self._open: dict[str, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def names(self) -> list[str]:
        return list(self.weight_map)

    def get(self, name: str) -> Tensor:
        """One tensor in the file's dtype, on the CPU (memory-mapped until used)."""
        return self._shard(name).get_tensor(name)

    def dtype(self, name: str) -> torch.dtype:
        """A tensor's stored dtype, from its shard's header (nothing read)."""
        return _DTYPES[self._shard(name).get_slice(name).get_dtype()]

    def _shard(self, name: str):
        """The open shard holding ``name`` (opened once, until ``close``)."""
        shard = self.weight_map[name]
        if shard not in self._open:
            self._open[shard] = safe_open(str(self.folder / shard), framework="pt")
        return self._open[shard]

    def close(self) -> None:
        """Drop the open shards: their memory maps would otherwise keep every page read so far resident."""
        self._open.clear()

    def nbytes(self) -> int:
        """The stored tensors' size on disk."""
        return sum((self.folder / s).stat().st_size for s in set(self.weight_map.values()))


def shard_map(folder: Path) -> dict[str, str]:
    """{tensor name: shard file} of a folder's safetensors weights; ConfigError (one sentence) for a folder
    with only pickle weights, none at all, or an index naming a shard that is not there."""
    if (folder / INDEX).is_file():
        weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
    elif (folder / SINGLE).is_file():
        with safe_open(str(folder / SINGLE), framework="pt") as f:
            weight_map = dict.fromkeys(f.keys(), SINGLE)
    elif any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise ConfigError(f"{folder} holds its weights as pickle files (.bin/.pt): streaming reads safetensors only, which can be read one "
                          "tensor at a time without running code from the file; convert it once with save_pretrained(safe_serialization=True).")
    else:
        raise ConfigError(f"{folder} has no {SINGLE} or {INDEX}: it is not a Hugging Face model folder with safetensors weights.")
    missing = sorted({s for s in weight_map.values() if not (folder / s).is_file()})
    if missing:
        raise ConfigError(f"{folder}: the shard index names {len(missing)} file(s) that are not there ({', '.join(missing[:3])}); "
                          "the download or copy is incomplete.")
    return weight_map


def skeleton(auto_cls: type, config: PretrainedConfig | str | Path) -> PreTrainedModel:
    """The model with every parameter on the meta device (no memory); buffers computed from the config
    (rotary frequencies) are real, as ``init_empty_weights`` leaves them."""
    if not isinstance(config, PretrainedConfig):
        config = AutoConfig.from_pretrained(config)
    with init_empty_weights():
        model = auto_cls.from_config(config)
    model.tie_weights()  # a tied head is the embeddings' parameter (counted once, stored once)
    return model.eval()


def materialize(module: nn.Module, prefix: str, reader: ShardReader, device: torch.device, dtype: torch.dtype) -> None:
    """Give ``module``'s parameters and persistent buffers (named ``prefix`` + their name in the folder)
    real tensors read from ``reader``, in ``dtype`` on ``device``. A parameter the folder lacks is an
    error: a tied weight is materialised through the module that owns it."""
    state = {}
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        key = prefix + name
        if key in reader:
            state[name] = reader.get(key).to(device, dtype if t.is_floating_point() else t.dtype)
        elif t.is_meta:
            raise ConfigError(f"{reader.folder}: {key} is not in the folder's weights, which do not match its config.json.")
    module.load_state_dict(state, strict=False, assign=True)


def release(module: nn.Module) -> None:
    """Drop ``module``'s parameters back to the meta device: their memory goes once nothing else holds them."""
    module.to("meta")
