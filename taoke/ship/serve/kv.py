"""The KV cache the serving engine decodes with: one preallocated row ("slot") per running request.

Every decoding step runs all running requests through one forward pass. Each request keeps its keys and
values in its own row of a per-layer buffer [slots, kv_heads, capacity, head_dim], written in place at its
own position; the step attends over the longest row with a mask that hides each shorter row's unused tail.
A request that joins is prefilled (alone as `model.generate` does it, or packed with other new prompts, each
attending only to itself) and its cache copied into a free row; one that leaves gives its row to the last
running request, so running rows stay 0..n-1 and the batch is a plain slice. No per-step concatenation (transformers' DynamicCache copies the whole cache every step).

transformers' own continuous batching uses a paged cache with its own attention kernels; this cache keeps
the model's stock attention (sdpa/eager) and only supplies the keys/values, so it works for any
full-attention decoder that takes a `Cache` object.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from taoke.errors import ModelError


def prompt_span(states: torch.Tensor, length: int, offset: int = 0, shared: int = 0) -> torch.Tensor:
    """One prompt's [kv_heads, length, head_dim] keys or values, a new tensor, out of a batch-1 prefill cache
    [1, kv_heads, positions, head_dim] that packed several prompts after a prefix they share: positions 0..shared
    hold that prefix, the prompt's own tokens sit at shared + offset.. (offset 0, shared 0: a lone prompt)."""
    return torch.cat([states[0, :, :shared], states[0, :, shared + offset:offset + length]], dim=1)


class SlotLayer(CacheLayerMixin):
    """One decoder layer's view of the slot buffers (transformers calls `update` from its attention)."""

    is_sliding = False

    def __init__(self, pool: "SlotCache", index: int):
        super().__init__()
        self.pool, self.index = pool, index

    def lazy_initialization(self, key_states, value_states) -> None:
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return self.pool.write(self.index, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.pool.kv_length, 0

    def get_seq_length(self) -> int:
        return self.pool.kv_length - 1

    def get_max_length(self) -> int:
        return -1


class SlotCache(Cache):
    """Per-layer key/value buffers with one row per running request; see the module docstring."""

    def __init__(self, num_layers: int, slots: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, capacity: int = 256):
        super().__init__(layers=[SlotLayer(self, i) for i in range(num_layers)])
        self.slots, self.kv_heads, self.head_dim = slots, kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.capacity = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.rows = 0                     # running rows in this step
        self.positions = torch.zeros(0, dtype=torch.long, device=device)
        self.kv_length = 0
        self.ensure_capacity(capacity)

    def ensure_capacity(self, tokens: int) -> None:
        """Grow every layer's buffer (doubling) so a row can hold `tokens` positions."""
        if tokens <= self.capacity:
            return
        new = max(tokens, 2 * self.capacity)
        shape = (self.slots, self.kv_heads, new, self.head_dim)
        for store in (self.keys, self.values):
            for i in range(len(self.layers)):
                buf = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if i < len(store):
                    buf[:, :, :self.capacity] = store[i]
                    store[i] = buf
                else:
                    store.append(buf)
        self.capacity = new

    # ----------------------------------------------------------------------------------------- rows

    def adopt_layout(self, prefill: Cache) -> None:
        """Lay the buffers out as the model's real keys/values are (a no-op once they match, from the first
        prefill on): a config's head counts can mislead, e.g. Falcon's multi-query flag overrides its kv heads."""
        layouts = {(layer.keys.shape[1], layer.keys.shape[3], layer.keys.dtype) for layer in prefill.layers}
        if len(layouts) != 1 or len(prefill.layers) != len(self.layers):
            raise ModelError(f"the model's layers cache keys/values in {len(layouts)} layouts over "
                             f"{len(prefill.layers)} layers; taoke's engine needs one layout per layer of "
                             f"{len(self.layers)}. Serve it with --engine vllm.")
        layout = layouts.pop()
        if layout != (self.kv_heads, self.head_dim, self.dtype):
            self.kv_heads, self.head_dim, self.dtype = layout
            capacity, self.capacity = self.capacity, 0
            self.keys, self.values = [], []
            self.ensure_capacity(capacity)

    def load_row(self, row: int, prefill: Cache, length: int, offset: int = 0, shared: int = 0) -> None:
        """Copy a request's prefilled cache into `row` (where it sits in the prefill cache: prompt_span)."""
        self.adopt_layout(prefill)
        self.ensure_capacity(length + 1)
        for i, layer in enumerate(prefill.layers):
            self.keys[i][row, :, :length] = prompt_span(layer.keys, length, offset, shared)
            self.values[i][row, :, :length] = prompt_span(layer.values, length, offset, shared)

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Give row `dst` the contents of row `src` (a leaving request's row goes to the last running one)."""
        for store in (self.keys, self.values):
            for buf in store:
                buf[dst, :, :length] = buf[src, :, :length]

    # ----------------------------------------------------------------------------------------- step

    def begin_step(self, positions: torch.Tensor) -> torch.Tensor:
        """Prepare a decoding step for rows 0..n-1 writing at `positions`; returns the 4D attention mask."""
        self.rows = positions.numel()
        self.positions = positions.to(self.device)
        self.kv_length = int(positions.max()) + 1
        self.ensure_capacity(self.kv_length)
        columns = torch.arange(self.kv_length, device=self.device)
        return (columns[None, :] <= self.positions[:, None])[:, None, None, :]   # [rows, 1, 1, kv]

    def write(self, layer: int, key_states: torch.Tensor, value_states: torch.Tensor):
        rows = torch.arange(self.rows, device=self.device)
        k, v = self.keys[layer], self.values[layer]
        k[rows, :, self.positions] = key_states[:, :, 0].to(k.dtype)
        v[rows, :, self.positions] = value_states[:, :, 0].to(v.dtype)
        return k[:self.rows, :, :self.kv_length], v[:self.rows, :, :self.kv_length]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(self.kv_length - 1, 0)

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
