"""Train only the embedding rows the training data uses, with exactly the result of training them all.

Fine-tuning an encoder end to end updates its whole input embedding (30k rows x 384 for MiniLM: half of
its parameters) every step, though a small text dataset touches a few thousand rows. Under AdamW a row
that no training batch ever contains has zero gradient at every step, so its moments stay zero and its
only change is the decoupled weight decay p *= (1 - lr*wd). So we train a compact table of the rows
the data uses, keep the rest frozen, multiply the frozen rows by the product of those decay factors, and
write everything back into the ordinary embedding at the end: the same weights as dense AdamW (up to
float rounding), a quarter less time per step for MiniLM on a CPU (bench/textcls_vs_hf.py).

torch.optim.SparseAdam would need a second optimizer and drops weight decay; this keeps one AdamW.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Below this fraction of used rows the compact table pays; above it the extra gather costs more.
MAX_USED_FRACTION = 0.5


class UsedRowsEmbedding(nn.Module):
    """Drop-in for nn.Embedding whose trainable part is only `rows` (the used token ids)."""

    def __init__(self, embedding: nn.Embedding, used: torch.Tensor):
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.weight.shape
        self.padding_idx = embedding.padding_idx
        weight = embedding.weight.detach()
        self.register_buffer("frozen", weight.clone())
        self.register_buffer("row_ids", used)
        slot = torch.full((self.num_embeddings,), -1, dtype=torch.long, device=weight.device)
        slot[used] = torch.arange(len(used), device=weight.device)
        self.register_buffer("slot", slot)
        # float64 so a few thousand steps of (1 - lr*wd) factors do not drift
        self.register_buffer("decay", torch.ones((), dtype=torch.float64, device=weight.device))
        self.rows = nn.Parameter(weight[used].clone())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        slot = self.slot[ids]
        trained = F.embedding(slot.clamp_min(0), self.rows)
        unused = F.embedding(ids, self.frozen) * self.decay.to(self.frozen.dtype)
        return torch.where((slot >= 0).unsqueeze(-1), trained, unused)

    def merged_weight(self) -> torch.Tensor:
        weight = self.frozen * self.decay.to(self.frozen.dtype)
        weight[self.row_ids] = self.rows.detach()
        return weight


def input_embedding_slot(model: nn.Module) -> tuple[nn.Module, str] | None:
    """(owner, attribute) of the embedding that input ids index, for HF-wrapped and scratch text models."""
    hf = getattr(model, "hf", None)
    if hf is not None and hasattr(hf, "get_input_embeddings"):
        emb = hf.get_input_embeddings()
        for owner in hf.modules():
            for name, child in owner.named_children():
                if child is emb:
                    return owner, name
        return None
    if isinstance(getattr(model, "embed", None), nn.Embedding):
        return model, "embed"
    return None


def _tied_elsewhere(model: nn.Module, weight: torch.Tensor) -> bool:
    """True when another module also uses this weight (e.g. a tied LM head), which we must not split."""
    users = sum(1 for m in model.modules() for p in m.parameters(recurse=False) if p is weight)
    return users > 1


def compact_input_embedding(model: nn.Module, token_ids: list[list[int]], optimizer_name: str,
                            weight_decay: float) -> "EmbeddingRowsHandle | None":
    """Swap the model's input embedding for a UsedRowsEmbedding over the ids in `token_ids` when that is
    exact for the optimizer and saves work; returns a handle to undo it, or None when left as is."""
    # AdamW: unused rows only decay (handled). SGD's weight decay is an L2 gradient that moves them.
    if optimizer_name != "adamw" and weight_decay:
        return None
    slot = input_embedding_slot(model)
    if slot is None:
        return None
    owner, attr = slot
    emb = getattr(owner, attr)
    if not isinstance(emb, nn.Embedding) or not emb.weight.requires_grad or emb.max_norm is not None \
            or emb.sparse or _tied_elsewhere(model, emb.weight):
        return None
    used = torch.unique(torch.tensor([i for row in token_ids for i in row] or [0], dtype=torch.long))
    if emb.padding_idx is not None:  # the padding row never gets a gradient: leave it frozen (it still decays)
        used = used[used != emb.padding_idx]
    if len(used) == 0 or len(used) > MAX_USED_FRACTION * emb.num_embeddings or int(used.max()) >= emb.num_embeddings:
        return None
    compact = UsedRowsEmbedding(emb, used.to(emb.weight.device))
    setattr(owner, attr, compact)
    return EmbeddingRowsHandle(owner, attr, emb, compact)


class EmbeddingRowsHandle:
    def __init__(self, owner: nn.Module, attr: str, original: nn.Embedding, compact: UsedRowsEmbedding):
        self.owner, self.attr, self.original, self.compact = owner, attr, original, compact

    def track_decay(self, optimizer: torch.optim.Optimizer) -> None:
        """After each optimizer step, fold that step's decoupled weight decay into the frozen rows' factor."""
        group = next(g for g in optimizer.param_groups if any(p is self.compact.rows for p in g["params"]))

        def after_step(opt, args, kwargs):
            if group.get("weight_decay", 0.0):
                self.compact.decay.mul_(1.0 - float(group["lr"]) * float(group["weight_decay"]))

        optimizer.register_step_post_hook(after_step)

    def restore(self) -> None:
        """Put the ordinary embedding back, holding the trained and the decayed rows."""
        with torch.no_grad():
            self.original.weight.copy_(self.compact.merged_weight())
        setattr(self.owner, self.attr, self.original)
