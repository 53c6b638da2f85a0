"""Hold frozen matmul weights in bf16 while training under bf16 autocast, then put the fp32 ones back.

Under bf16 autocast every nn.Linear casts its fp32 weight to bf16 on each forward and keeps that copy for
the backward. For a frozen weight (the base of a LoRA, a frozen layer) the fp32 master is never updated,
so storing it in bf16 for the length of training gives the same matmul inputs bit for bit, while the
model's memory shrinks by 2 bytes per frozen parameter, the per-step copies disappear, and so does the
cast time. The fp32 weights wait in a temporary safetensors file (mmap, not RAM) and are copied back when
training ends, so merging, saving and the parity check see the exact base weights. (torch.save writes each
storage straight from memory; safetensors' save_file would first copy them all into bytes.) The file is our
own and is read back with weights_only=True and mmap.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn


def _frozen_linears(model: nn.Module) -> tuple[dict[str, nn.Linear], list[nn.Linear]]:
    """(frozen fp32 Linears, frozen fp32 Linears whose weight is tied to an embedding)."""
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    frozen = {name: m for name, m in model.named_modules()
              if isinstance(m, nn.Linear) and not m.weight.requires_grad and m.weight.dtype == torch.float32}
    tied = [m for m in frozen.values() if id(m.weight) in embedding_weights]
    return {n: m for n, m in frozen.items() if id(m.weight) not in embedding_weights}, tied


def _uses_dora(model: nn.Module) -> bool:
    return any(getattr(c, "use_dora", False) for c in getattr(model, "peft_config", {}).values())


class FrozenInLowPrecision:
    """Context manager: frozen Linear weights in `dtype` inside, their exact fp32 values again after. DoRA models
    keep theirs in fp32: DoRA's magnitude term reads the base weight's fp32 column norms."""

    def __init__(self, model: nn.Module, dtype: torch.dtype | None):
        self.model, self.dtype = model, dtype
        self.file: Path | None = None
        self.modules: dict[str, nn.Linear] = {}
        self.tied: dict[nn.Linear, nn.Parameter] = {}  # head -> the embedding's (shared) fp32 weight

    def __enter__(self) -> "FrozenInLowPrecision":
        if self.dtype is None or _uses_dora(self.model):
            return self
        self.modules, tied = _frozen_linears(self.model)
        # a tied head is also the fp32 embedding lookup: the head gets its own low-precision copy for the
        # duration (the lm_head cast is otherwise redone on every step) and the shared weight is re-tied after
        for head in tied:
            self.tied[head] = head.weight
            head.weight = nn.Parameter(head.weight.detach().to(self.dtype), requires_grad=False)
        if not self.modules:
            return self
        fd, path = tempfile.mkstemp(prefix="taoke-frozen-", suffix=".pt")
        self.file = Path(path)
        with open(fd, "wb") as f:
            torch.save({name: m.weight.detach() for name, m in self.modules.items()}, f)
        for m in self.modules.values():
            m.weight.data = m.weight.data.to(self.dtype)
        # from_pretrained may leave tensors on a mmap of the checkpoint: the mapping (and its resident
        # pages) lives while any tensor uses it, so give the remaining ones their own memory to let it go
        converted = {id(m.weight) for m in self.modules.values()}
        for t in [*self.model.parameters(), *self.model.buffers()]:
            if id(t) not in converted and t.device.type == "cpu" and not t.untyped_storage().resizable():
                t.data = t.data.clone()
        return self

    def __exit__(self, *exc) -> None:
        for head, shared in self.tied.items():
            head.weight = shared
        self.tied = {}
        if self.file is None:
            return
        try:
            # mmap: pages come in as they are used, and on Linux the mapping outlives the unlink below
            saved = torch.load(self.file, weights_only=True, mmap=True, map_location="cpu")
            for name, m in self.modules.items():
                m.weight.data = saved[name].to(m.weight.device)
        finally:
            try:
                self.file.unlink(missing_ok=True)
            except OSError:  # Windows will not delete a mapped file; it is in the temp dir
                pass
            self.file = None
