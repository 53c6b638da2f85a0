"""Structured width pruning: remove whole MLP units and whole attention heads (KV groups in grouped-query
attention) from every block of a BERT-family encoder or a LLaMA-family decoder, so the saved model is smaller.

Every block keeps the same number of units and heads (configs hold one width for all layers); which ones a
block keeps is decided per block, by importance:
  - magnitude:  MLP unit j: ||rows of j in the input projections|| x ||column j of the output projection||;
                head: the norms of its rows in q/k/v and of its columns in the output projection;
  - activation: the same output-side norms times the mean activation measured on training batches (the MLP
                hidden unit's |value|, the head's context-vector norm), as Wanda-style criteria do.

LLaMA configs state head_dim apart from the head count, so a pruned LLaMA loads in plain transformers. BERT
derives head width from hidden_size / num_attention_heads, so a BERT with pruned heads cannot be stated in its
config (transformers 5 dropped BERT's pruned_heads): taoke records the kept head count in taoke.json and its
loader resizes the attention before loading; MLP-only pruning keeps BERT loadable by plain transformers.
"""

from __future__ import annotations

import torch
from torch import nn

from taoke.errors import RecipeError
from taoke.models.parts import unwrap
from taoke.models.widths import Block, blocks, family, head_shape, set_bert_heads

def _slice(linear: nn.Linear, keep: torch.Tensor, dim: int) -> nn.Linear:
    """A smaller Linear holding the kept output rows (dim 0) or input columns (dim 1)."""
    w = linear.weight.detach().index_select(dim, keep.to(linear.weight.device))
    new = nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if linear.bias is not None:
            new.bias.copy_(linear.bias.detach() if dim == 1 else linear.bias.detach()[keep.to(w.device)])
    new.weight.requires_grad_(linear.weight.requires_grad)
    if new.bias is not None:
        new.bias.requires_grad_(linear.bias.requires_grad)
    return new


def _group_rows(groups: torch.Tensor, per_group: int, head_dim: int) -> torch.Tensor:
    """Row indices of the given head groups (each `per_group` heads of `head_dim` rows)."""
    width = per_group * head_dim
    return torch.cat([torch.arange(int(g) * width, (int(g) + 1) * width) for g in groups])


@torch.no_grad()
def magnitude_scores(b: Block, heads: int, groups: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    units = sum(b.get(p).weight.float().norm(dim=1) for p in b.mlp_in) * b.get(b.mlp_out).weight.float().norm(dim=0)
    r = heads // groups
    q = b.get(b.q).weight.float().view(groups, r * head_dim, -1).flatten(1).norm(dim=1)
    k = b.get(b.k).weight.float().view(groups, head_dim, -1).flatten(1).norm(dim=1)
    v = b.get(b.v).weight.float().view(groups, head_dim, -1).flatten(1).norm(dim=1)
    o = b.get(b.o).weight.float().view(-1, groups, r * head_dim).transpose(0, 1).flatten(1).norm(dim=1)
    return units, q * k + v * o


@torch.no_grad()
def activation_scores(model: nn.Module, bs: list[Block], heads: int, groups: int, head_dim: int,
                      batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Mean |activation| of each MLP unit and mean context norm of each head group, over the batches, times the
    output-side weight norms."""
    sums = [[None, None] for _ in bs]
    count = [0]

    def hook(i: int, which: int):
        def record(_module, args):
            x = args[0].detach().float().flatten(0, -2)       # [tokens, width]
            if which == 0:
                val = x.abs().sum(0)
            else:
                val = x.view(x.shape[0], groups, -1).norm(dim=2).sum(0)
            sums[i][which] = val if sums[i][which] is None else sums[i][which] + val
            if i == 0 and which == 0:
                count[0] += x.shape[0]
        return record

    handles = []
    for i, b in enumerate(bs):
        handles.append(b.get(b.mlp_out).register_forward_pre_hook(hook(i, 0)))
        handles.append(b.get(b.o).register_forward_pre_hook(hook(i, 1)))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for batch in batches():
            model(**{k: v.to(device) for k, v in batch.items() if k != "labels"})
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if count[0] == 0:
        raise RecipeError("edits.prune.by=activation: no training batches to measure activations on")
    r = heads // groups
    out = []
    for b, (u, h) in zip(bs, sums):
        o = b.get(b.o).weight.float().view(-1, groups, r * head_dim).transpose(0, 1).flatten(1).norm(dim=1)
        out.append((u.cpu() / count[0] * b.get(b.mlp_out).weight.float().norm(dim=0).cpu(), h.cpu() / count[0] * o.cpu()))
    return out


def kept_counts(n_units: int, groups: int, mlp: float, heads: float) -> tuple[int, int]:
    keep_units = n_units - round(mlp * n_units)
    keep_groups = groups - round(heads * groups)
    if keep_units < 1:
        raise RecipeError(f"edits.prune.mlp={mlp}: would leave no MLP units of {n_units}; choose a ratio below "
                          f"{1 - 0.5 / n_units:.3f}.")
    if keep_groups < 1:
        raise RecipeError(f"edits.prune.heads={heads}: would leave no attention heads (of {groups} "
                          f"{'KV groups' if groups else 'heads'}); choose a smaller ratio.")
    return keep_units, keep_groups


@torch.no_grad()
def prune(model: nn.Module, mlp: float, heads: float, by: str, batches=None) -> dict:
    """Prune every block in place; returns the record for lineage (widths before/after, how chosen)."""
    kind = family(model)
    bs = blocks(model)
    n_heads, groups, head_dim = head_shape(model)
    n_units = bs[0].get(bs[0].mlp_out).in_features
    keep_units, keep_groups = kept_counts(n_units, groups, mlp, heads)
    if by == "activation":
        if batches is None:
            raise RecipeError("edits.prune.by=activation needs training data to measure on")
        scores = activation_scores(model, bs, n_heads, groups, head_dim, batches)
    else:
        scores = [magnitude_scores(b, n_heads, groups, head_dim) for b in bs]
    r = n_heads // groups
    for b, (unit_score, group_score) in zip(bs, scores):
        units = unit_score.topk(keep_units).indices.sort().values
        kept_groups = group_score.topk(keep_groups).indices.sort().values
        for p in b.mlp_in:
            b.set(p, _slice(b.get(p), units, 0))
        b.set(b.mlp_out, _slice(b.get(b.mlp_out), units, 1))
        q_rows = _group_rows(kept_groups, r, head_dim)
        kv_rows = _group_rows(kept_groups, 1, head_dim)
        b.set(b.q, _slice(b.get(b.q), q_rows, 0))
        b.set(b.k, _slice(b.get(b.k), kv_rows if kind == "llama" else q_rows, 0))
        b.set(b.v, _slice(b.get(b.v), kv_rows if kind == "llama" else q_rows, 0))
        b.set(b.o, _slice(b.get(b.o), q_rows, 1))
        if kind == "bert":
            set_bert_heads(b.module, keep_groups * r, head_dim)
    config = unwrap(model).config
    config.intermediate_size = keep_units
    if kind == "llama":
        config.head_dim = head_dim
        config.num_attention_heads = keep_groups * r
        config.num_key_value_heads = keep_groups
        for b in bs:
            attn = b.module.self_attn
            attn.num_key_value_groups = r
    return {"family": kind, "by": by, "mlp_units": [n_units, keep_units], "heads": [n_heads, keep_groups * r],
            "kv_groups": [groups, keep_groups] if kind == "llama" else None, "head_dim": head_dim,
            "plain_transformers": kind == "llama" or keep_groups == groups}
