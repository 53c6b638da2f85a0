"""Structured width pruning: remove whole MLP units and whole attention heads (KV groups in grouped-query
attention) from every block of a BERT-family encoder or a LLaMA-family decoder, so the saved model is smaller.

Every block keeps the same number of units and heads (configs hold one width for all layers); which ones a
block keeps is decided per block, by importance:
  - magnitude:  MLP unit j: ||rows of j in the input projections|| x ||column j of the output projection||;
                head: the norms of its rows in q/k/v and of its columns in the output projection;
  - activation: the same output-side norms times the mean activation measured on training batches (the MLP
                hidden unit's |value|, the head's context-vector norm), as Wanda-style criteria do. What a removed
                unit or head added on average is folded into the output projection's bias where it has one
                (BERT; FLAP's bias compensation), so healing starts from a model nearer the unpruned one.

LLaMA configs state head_dim apart from the head count, so a pruned LLaMA loads in plain transformers. BERT
derives head width from hidden_size / num_attention_heads, so a BERT with pruned heads cannot be stated in its
config (transformers 5 dropped BERT's pruned_heads): taoke records the kept head count in taoke.json and its
loader resizes the attention before loading; MLP-only pruning keeps BERT loadable by plain transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from taoke.errors import RecipeError
from taoke.models.parts import real_tokens, unwrap
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


@dataclass
class Activations:
    """What `by: activation` measured in one block, over the real (unpadded) tokens of the batches."""
    unit_scores: torch.Tensor    # [units]   mean |activation| x output-column norm
    group_scores: torch.Tensor   # [groups]  mean context norm x output-column norm
    unit_means: torch.Tensor     # [units]   mean signed activation entering the MLP's output projection
    context_means: torch.Tensor  # [heads * head_dim]  mean signed context entering the attention output


@torch.no_grad()
def activation_scores(model: nn.Module, bs: list[Block], heads: int, groups: int, head_dim: int,
                      batches) -> list[Activations]:
    """Mean |activation| of each MLP unit and mean context norm of each head group, over the batches' real tokens,
    times the output-side weight norms; plus the signed means a removed unit or head leaves in the output."""
    sums = [{} for _ in bs]
    state = {"mask": None, "tokens": 0}

    def hook(i: int, which: str):
        def record(_module, args):
            x = real_tokens(args[0].detach().float(), state["mask"])
            if which == "mlp":
                add = {"mlp_abs": x.abs().sum(0), "mlp_mean": x.sum(0)}
                if i == 0:
                    state["tokens"] += x.shape[0]
            else:
                add = {"ctx_norm": x.view(x.shape[0], groups, -1).norm(dim=2).sum(0), "ctx_mean": x.sum(0)}
            for k, v in add.items():
                sums[i][k] = v if k not in sums[i] else sums[i][k] + v
        return record

    handles = []
    for i, b in enumerate(bs):
        handles.append(b.get(b.mlp_out).register_forward_pre_hook(hook(i, "mlp")))
        handles.append(b.get(b.o).register_forward_pre_hook(hook(i, "attn")))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for batch in batches():
            state["mask"] = batch.get("attention_mask")
            state["mask"] = state["mask"].to(device) if state["mask"] is not None else None
            model(**{k: v.to(device) for k, v in batch.items() if k != "labels"})
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    n = state["tokens"]
    if n == 0:
        raise RecipeError("edits.prune.by=activation: no training batches to measure activations on")
    r = heads // groups
    out = []
    for b, s in zip(bs, sums):
        o = b.get(b.o).weight.float().view(-1, groups, r * head_dim).transpose(0, 1).flatten(1).norm(dim=1)
        out.append(Activations(unit_scores=s["mlp_abs"].cpu() / n * b.get(b.mlp_out).weight.float().norm(dim=0).cpu(),
                               group_scores=s["ctx_norm"].cpu() / n * o.cpu(),
                               unit_means=s["mlp_mean"].cpu() / n, context_means=s["ctx_mean"].cpu() / n))
    return out


@torch.no_grad()
def compensate_bias(linear: nn.Linear, removed: torch.Tensor, means: torch.Tensor) -> bool:
    """Fold what the removed input columns contributed on average into the Linear's bias (FLAP's bias
    compensation), so the pruned model starts nearer the unpruned one. A Linear without bias is left as is."""
    if linear.bias is None or removed.numel() == 0:
        return False
    w = linear.weight.detach().float()[:, removed.to(linear.weight.device)]
    linear.bias.add_((w @ means[removed].to(w.device)).to(linear.bias.dtype))
    return True


def kept_counts(n_units: int, groups: int, mlp: float, heads: float, round_to: int = 1) -> tuple[int, int]:
    """Units and head groups each block keeps. Where MLP units are pruned, the kept count is rounded down to a
    multiple of `round_to` (at least the stated fraction goes), as Torch-Pruning's round_to does: CPU matrix kernels
    run slower on odd widths (MiniLM's 1536 units at 30% leave 1075; see bench/RESULTS.md, prune_speed). A block
    too narrow to hold one multiple keeps its exact count."""
    keep_units = n_units - round(mlp * n_units)
    if mlp > 0 and keep_units >= round_to:
        keep_units -= keep_units % round_to
    keep_groups = groups - round(heads * groups)
    if keep_units < 1:
        raise RecipeError(f"edits.prune.mlp={mlp}: would leave no MLP units of {n_units}; choose a ratio below "
                          f"{1 - 0.5 / n_units:.3f}.")
    if keep_groups < 1:
        raise RecipeError(f"edits.prune.heads={heads}: would leave no attention heads (of {groups} "
                          f"{'KV groups' if groups else 'heads'}); choose a smaller ratio.")
    return keep_units, keep_groups


@torch.no_grad()
def prune(model: nn.Module, mlp: float, heads: float, by: str, batches=None, compensate: bool = True,
          round_to: int = 1) -> dict:
    """Prune every block in place; returns the record for lineage (widths before/after, how chosen)."""
    kind = family(model)
    bs = blocks(model)
    n_heads, groups, head_dim = head_shape(model)
    n_units = bs[0].get(bs[0].mlp_out).in_features
    keep_units, keep_groups = kept_counts(n_units, groups, mlp, heads, round_to)
    if by == "activation":
        if batches is None:
            raise RecipeError("edits.prune.by=activation needs training data to measure on")
        measured = activation_scores(model, bs, n_heads, groups, head_dim, batches)
        scores = [(a.unit_scores, a.group_scores) for a in measured]
    else:
        measured, scores = [None] * len(bs), [magnitude_scores(b, n_heads, groups, head_dim) for b in bs]
    r = n_heads // groups
    compensated = False
    for b, (unit_score, group_score), act in zip(bs, scores, measured):
        units = unit_score.topk(keep_units).indices.sort().values
        kept_groups = group_score.topk(keep_groups).indices.sort().values
        q_rows = _group_rows(kept_groups, r, head_dim)
        if act is not None and compensate:   # before slicing: the removed columns are still there to fold in
            gone = torch.ones(n_units, dtype=torch.bool)
            gone[units] = False
            compensated |= compensate_bias(b.get(b.mlp_out), gone.nonzero().squeeze(1), act.unit_means)
            gone = torch.ones(n_heads * head_dim, dtype=torch.bool)
            gone[q_rows] = False
            compensated |= compensate_bias(b.get(b.o), gone.nonzero().squeeze(1), act.context_means)
        for p in b.mlp_in:
            b.set(p, _slice(b.get(p), units, 0))
        b.set(b.mlp_out, _slice(b.get(b.mlp_out), units, 1))
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
            "plain_transformers": kind == "llama" or keep_groups == groups, "bias_compensated": compensated}
