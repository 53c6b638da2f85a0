"""Attention over packed rows, one example at a time: causal SDPA per segment instead of a dense block mask.

With a [seq x seq] block-diagonal mask SDPA still computes every query-key block of the row and masks
most of them away; a row of 256 tokens holding five 50-token dialogs does 256^2 work for 5 * 50^2 that
counts. Given the segment bounds, each example runs its own `is_causal` SDPA (the kernel skips the upper
triangle), which is the varlen idea of flash-attn (GPU-only) done with a loop over segments. Registered as a
transformers attention implementation, so the model code is unchanged; without segments it is plain SDPA.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

NAME = "taoke_varlen"
SEGMENTS_KEY = "taoke_segments"   # forward kwarg: per row, the (start, end) of each packed example


def segments_from_positions(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the (start, end) spans where position_ids restart at 0 (one span per packed example)."""
    out = []
    for row in position_ids.cpu():
        starts = (row == 0).nonzero().flatten().tolist() or [0]
        if starts[0] != 0:
            starts = [0] + starts
        out.append(list(zip(starts, starts[1:] + [row.numel()])))
    return out


def _varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    segments = kwargs.pop(SEGMENTS_KEY, None)
    if segments is None or query.shape[2] != key.shape[2]:  # no packing info, or decoding with a cache
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    p = dropout if module.training else 0.0
    rows = []
    # the math kernel: for examples of tens to hundreds of tokens its backward is faster on a CPU than the
    # flash kernel's, whose fixed cost per call (blocked buffers) dominates such short spans
    with sdpa_kernel(SDPBackend.MATH):
        for r, spans in enumerate(segments):
            q, k, v = query[r:r + 1], key[r:r + 1], value[r:r + 1]
            rows.append(torch.cat([F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e],
                                                                  dropout_p=p, is_causal=True, scale=scaling)
                                   for s, e in spans], dim=2))
    return torch.cat(rows).transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, _varlen_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # the fallback path keeps SDPA's masks


@contextmanager
def varlen_attention(model):
    """Inside, a transformers model whose attention is SDPA runs packed batches segment by segment."""
    config = getattr(model, "config", None)
    on_cpu = next(model.parameters()).device.type == "cpu"  # GPUs have flash-attn's own varlen kernels
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa" or not on_cpu:
        yield False
        return
    _register()
    config._attn_implementation = NAME  # sub-configs share it for LLaMA-like decoders
    try:
        yield True
    finally:
        config._attn_implementation = "sdpa"
