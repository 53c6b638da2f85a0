"""Adaptation of classifiers: which parameters train. full | freeze (bottom N layers) | head | lora | dora."""

from __future__ import annotations

from torch import nn

from taoke.adapt.lora import apply_lora
from taoke.errors import RecipeError
from taoke.models.parts import count_parameters, find_stack, input_embeddings, unwrap
from taoke.models.task_model import HFClassifier, get_head
from taoke.recipe import AdaptConfig


def bottom_up_blocks(model: nn.Module) -> tuple[list[nn.Module], nn.Module | None]:
    """(blocks bottom first, input embeddings) for freezing by depth: the layer stack of a transformer, the
    trainable children of a scratch model's body otherwise."""
    if isinstance(model, HFClassifier):
        # a BERT body's embeddings module holds word, position and type embeddings (and their norm)
        emb = getattr(unwrap(model).base_model, "embeddings", None) or input_embeddings(model)
        return list(find_stack(model).blocks), emb
    body = getattr(model, "body", None)
    if body is not None:
        return [m for m in body.children() if any(p.requires_grad for p in m.parameters())], None
    return [m for name, m in model.named_children() if name != "head"], None


def adapt(model: nn.Module, cfg: AdaptConfig) -> dict:
    """Set requires_grad per the method; returns a record with trainable/total counts."""
    method = cfg.method
    if method in ("lora", "dora"):
        extra = apply_lora(model, cfg)
        total, trainable = count_parameters(model)
        return {**cfg.model_dump(exclude_none=True), **extra, "trainable_params": trainable, "total_params": total}
    for p in model.parameters():
        p.requires_grad = method != "head"
    if method == "head":
        for p in get_head(model).parameters():
            p.requires_grad = True
    elif method == "freeze":
        blocks, emb = bottom_up_blocks(model)
        n = cfg.layers if cfg.layers is not None else len(blocks) // 2
        if n > len(blocks):
            raise RecipeError(f"adapt.layers={n} but the model has {len(blocks)} layers; choose 0..{len(blocks)}.")
        for m in ([emb] if emb is not None else []) + blocks[:n]:
            for p in m.parameters():
                p.requires_grad = False
    total, trainable = count_parameters(model)
    if trainable == 0:
        raise RecipeError("adaptation leaves no trainable parameters; lower adapt.layers.")
    return {**cfg.model_dump(exclude_none=True), "trainable_params": trainable, "total_params": total}
