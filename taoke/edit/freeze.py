"""Freeze parameters by layer index or by name pattern (applied after the adaptation method)."""

from __future__ import annotations

import fnmatch

from torch import nn

from taoke.errors import RecipeError
from taoke.models.parts import find_stack
from taoke.models.task_model import get_head


def freeze(model: nn.Module, layers: list[int] | None, patterns: list[str] | None) -> dict:
    frozen = 0
    if layers:
        stack = find_stack(model).blocks
        bad = [i for i in layers if not 0 <= i < len(stack)]
        if bad:
            raise RecipeError(f"edits.freeze.layers: index {bad[0]} is out of range; the model has "
                              f"{len(stack)} layers (0..{len(stack) - 1}).")
        for i in layers:
            for p in stack[i].parameters():
                frozen += p.numel() if p.requires_grad else 0
                p.requires_grad = False
    for pattern in patterns or []:
        hits = [(n, p) for n, p in model.named_parameters() if fnmatch.fnmatch(n, pattern) or pattern in n]
        if not hits:
            raise RecipeError(f"edits.freeze.pattern '{pattern}' matches no parameter; names look like "
                              f"{next(iter(dict(model.named_parameters())))!r}.")
        for _, p in hits:
            frozen += p.numel() if p.requires_grad else 0
            p.requires_grad = False
    return {"frozen_params": frozen}


def train_only(model: nn.Module, prefixes: list[str], keep_head: bool = True) -> int:
    """Leave trainable only parameters under the given module prefixes (and the head)."""
    head = {id(p) for p in get_head(model).parameters()} if keep_head else set()
    count = 0
    for name, p in model.named_parameters():
        p.requires_grad = any(pre in name for pre in prefixes) or id(p) in head
        count += p.numel() if p.requires_grad else 0
    return count
