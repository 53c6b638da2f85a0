"""Head edits: give a model a new head for a new label set, or insert hidden layers before it
(the classic "shell": keep the feature extractor, put a small MLP on top)."""

from __future__ import annotations

from torch import nn

from taoke.errors import RecipeError
from taoke.models.task_model import build_head, head_io, set_head
from taoke.recipe import InsertHidden


def replace_head(model: nn.Module, outputs: int) -> dict:
    in_f, _ = head_io(model)
    set_head(model, build_head(in_f, outputs))
    return {"outputs": outputs}


def insert_hidden(model: nn.Module, outputs: int, cfg: InsertHidden) -> dict:
    if any(u <= 0 for u in cfg.units):
        raise RecipeError("edits.insert_hidden.units must be positive integers")
    in_f, _ = head_io(model)
    set_head(model, build_head(in_f, outputs, cfg.units, cfg.dropout, cfg.activation))
    return {"outputs": outputs, "hidden": list(cfg.units), "dropout": cfg.dropout, "activation": cfg.activation}


def apply_edits(model: nn.Module, edits: list[tuple[str, object]], outputs: int, labels_changed: bool,
                head_spec: dict | None) -> tuple[dict | None, list[dict]]:
    """Apply recipe edits in order. Returns the head spec to save and the edit records for lineage."""
    records = []
    ops = [op for op, _ in edits]
    if labels_changed and "replace_head" not in ops and "insert_hidden" not in ops:
        head_spec = replace_head(model, outputs)
        records.append({"op": "replace_head", "automatic": True, "reason": "label set differs from the base's",
                        "outputs": outputs})
    for op, cfg in edits:
        before = sum(p.numel() for p in model.parameters())
        if op == "replace_head":
            head_spec = replace_head(model, outputs)
        elif op == "insert_hidden":
            head_spec = insert_hidden(model, outputs, cfg)
        after = sum(p.numel() for p in model.parameters())
        records.append({"op": op, **cfg.model_dump(), "params_before": before, "params_after": after})
    return head_spec, records
