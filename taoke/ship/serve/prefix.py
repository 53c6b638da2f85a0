"""Prompt-prefix reuse: the keys and values of recent prompts, so that a prompt which starts like one already
seen (a shared system prompt, a conversation that resends its whole history every turn) prefills only what is new.

vLLM (automatic prefix caching) and SGLang (RadixAttention) do this over paged blocks. The engine's cache is one
row per request, so this store keeps whole prompts in an LRU bounded by bytes and matches the longest common token
prefix. The keys and values of a prefix depend only on its own tokens (causal attention, absolute positions), so
reusing them gives the same numbers a full prefill would, up to floating-point summation order.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from taoke.ship.serve.kv import prompt_span

# Prompts that reuse one stored prefix are packed into one pass after it, so even a chat template's system line is
# worth reusing; below this many tokens a match is left alone (one ~16-token block, as vLLM's prefix cache keeps).
MIN_REUSE_TOKENS = 16


@dataclass
class Prefix:
    ids: np.ndarray                  # the prompt's token ids
    keys: list[torch.Tensor]         # per layer [kv_heads, tokens, head_dim]
    values: list[torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading tokens a and b share."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


class PrefixStore:
    """Recent prompts' keys/values, least recently used dropped first once `max_bytes` would be passed."""

    def __init__(self, max_bytes: int, min_tokens: int = MIN_REUSE_TOKENS):
        self.max_bytes, self.min_tokens = max_bytes, min_tokens
        self.entries: OrderedDict[bytes, Prefix] = OrderedDict()
        self.bytes = 0

    def match(self, prompt_ids: list[int]) -> tuple[Prefix | None, int]:
        """The stored prompt sharing the longest prefix with this one, and how many tokens of it to reuse (never
        the prompt's last token: its logits give the first new token). (None, 0) below `min_tokens`."""
        ids = np.asarray(prompt_ids)
        best, best_n = None, 0
        for key, entry in self.entries.items():
            n = min(common_prefix(entry.ids, ids), len(ids) - 1)
            if n > best_n:
                best, best_n = key, n
        if best is None or best_n < self.min_tokens:
            return None, 0
        self.entries.move_to_end(best)
        return self.entries[best], best_n

    def add(self, prompt_ids: list[int], cache, offset: int = 0, shared: int = 0) -> None:
        """Keep the keys/values of a prompt just prefilled: in a batch-1 transformers cache, its first `shared`
        positions at 0.. (a prefix its pack reused) and the rest at shared + offset.."""
        if self.max_bytes <= 0 or len(prompt_ids) < self.min_tokens:
            return
        ids = np.asarray(prompt_ids)
        key = ids.tobytes()
        if key in self.entries:
            self.entries.move_to_end(key)
            return
        entry = Prefix(ids, [prompt_span(layer.keys, len(ids), offset, shared) for layer in cache.layers],
                       [prompt_span(layer.values, len(ids), offset, shared) for layer in cache.layers])
        if entry.nbytes > self.max_bytes:
            return
        while self.entries and self.bytes + entry.nbytes > self.max_bytes:
            self.bytes -= self.entries.popitem(last=False)[1].nbytes
        self.entries[key] = entry
        self.bytes += entry.nbytes

    def shares_prefix(self, a: list[int], b: list[int]) -> bool:
        """Whether two prompts share enough leading tokens for one to reuse the other's (never when disabled)."""
        return self.max_bytes > 0 and common_prefix(np.asarray(a), np.asarray(b)) >= self.min_tokens
