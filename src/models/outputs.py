"""Hidden states of a model's forward, per stack: what distillation and the approximation metrics compare.

A decoder-only or encoder-only model has one stack (``hidden_states``, masked by ``attention_mask``);
an encoder-decoder model two, the encoder's (``encoder_hidden_states``, ``attention_mask``) and the
decoder's (``decoder_hidden_states``, ``decoder_attention_mask``). Each stack's tuple holds the
embedding output first, then one [B, T, h] tensor per block (the last after the final norm).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor


def stack_hidden_states(out: Any, inputs: dict[str, Tensor]) -> list[tuple[tuple[Tensor, ...], Tensor]]:
    """[(hidden states, mask [B, T])] per stack, from a forward run with ``output_hidden_states=True``."""
    if getattr(out, "decoder_hidden_states", None) is not None:
        return [(out.encoder_hidden_states, inputs["attention_mask"]), (out.decoder_hidden_states, inputs["decoder_attention_mask"])]
    mask = inputs.get("attention_mask")
    return [(out.hidden_states, mask if mask is not None else inputs["input_ids"].new_ones(inputs["input_ids"].shape))]
