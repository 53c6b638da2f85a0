"""Head edits: give a model a new head for a new label set, or insert hidden layers before it
(the classic "shell": keep the feature extractor, put a small MLP on top)."""

from __future__ import annotations

from torch import nn

from taoke.models.task_model import build_head, head_io, set_head
from taoke.recipe import InsertHidden


def replace_head(model: nn.Module, outputs: int) -> dict:
    in_f, _ = head_io(model)
    set_head(model, build_head(in_f, outputs))
    return {"outputs": outputs}


def insert_hidden(model: nn.Module, outputs: int, cfg: InsertHidden) -> dict:
    in_f, _ = head_io(model)
    set_head(model, build_head(in_f, outputs, cfg.units, cfg.dropout, cfg.activation))
    return {"outputs": outputs, "hidden": list(cfg.units), "dropout": cfg.dropout, "activation": cfg.activation}
