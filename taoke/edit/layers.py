"""Depth edits on transformer stacks: drop layers (as MiniLM-L6 was cut from MiniLM-L12) and insert
new blocks initialised as identity (LLaMA-Pro block expansion) that can be trained alone."""

from __future__ import annotations

import copy
import re

from torch import nn

from taoke.errors import RecipeError
from taoke.models.parts import find_stack, unwrap

# Output projections of a residual block: zeroing them makes a pre-norm block the identity.
OUTPUT_PROJECTIONS = re.compile(r"(^|\.)(o_proj|down_proj|out_proj|linear2|c_proj|attention\.output\.dense|"
                                r"output\.dense|dense_4h_to_h|fc2|wo)$")


def check_indices(indices: list[int], n: int, key: str) -> None:
    bad = [i for i in indices if not 0 <= i < n]
    if bad:
        raise RecipeError(f"edits.{key}: layer index {bad[0]} is out of range; the model has {n} layers (0..{n - 1}).")


def _sync_config(model: nn.Module, origin: list[int], arch_config: dict) -> None:
    """Tell the config about the new depth; origin[i] is the old index that new layer i came from."""
    n = len(origin)
    config = getattr(unwrap(model), "config", None)
    if config is not None and hasattr(config, "num_hidden_layers"):  # any transformers model
        config.num_hidden_layers = n
        for i, block in enumerate(find_stack(model).blocks):  # KV caches index layers by position
            for m in block.modules():
                if hasattr(m, "layer_idx"):
                    m.layer_idx = i
        if getattr(config, "layer_types", None):  # per-layer attention kinds (sliding / full) follow their layer
            config.layer_types = [config.layer_types[j] for j in origin]
    elif "layers" in arch_config or hasattr(model, "encoder"):
        arch_config["layers"] = n


def kept_layers(keep: list[int] | None, every: int | None, n: int) -> list[int]:
    """The layer indices drop_layers keeps out of n, checked."""
    if keep is None:
        if not every or every < 2:
            raise RecipeError("edits.drop_layers: give keep: [indices] or every: k (k >= 2)")
        keep = list(range(every - 1, n, every))  # keep every k-th layer, as MiniLM-L6 keeps 1,3,5,... of L12
    check_indices(keep, n, "drop_layers.keep")
    if not keep:
        raise RecipeError("edits.drop_layers: no layer would remain")
    return sorted(set(keep))


def drop_layers(model: nn.Module, keep: list[int] | None, every: int | None, arch_config: dict) -> dict:
    stack = find_stack(model)
    n = len(stack)
    keep = kept_layers(keep, every, n)
    stack.replace([stack.blocks[i] for i in keep])
    _sync_config(model, keep, arch_config)
    return {"layers_before": n, "kept": keep, "layers_after": len(keep)}


def expand_layers(model: nn.Module, after: list[int], arch_config: dict) -> tuple[dict, list[str]]:
    """Insert a copy of block i after block i, with its output projections zeroed.

    Returns the record and the parameter-name prefixes of the new blocks (for `train_only_new`)."""
    stack = find_stack(model)
    n = len(stack)
    check_indices(after, n, "expand_layers.after")
    blocks, new_positions, origin = [], [], []
    for i, block in enumerate(stack.blocks):
        blocks.append(block)
        origin.append(i)
        if i in after:
            new = copy.deepcopy(block)
            zeroed = 0
            for name, m in new.named_modules():
                if OUTPUT_PROJECTIONS.search(name) and hasattr(m, "weight"):
                    nn.init.zeros_(m.weight)
                    if getattr(m, "bias", None) is not None:
                        nn.init.zeros_(m.bias)
                    zeroed += 1
            if zeroed == 0:
                raise RecipeError(f"edits.expand_layers: cannot find the output projections of "
                                  f"{type(block).__name__} to initialise a new block as identity.")
            new_positions.append(len(blocks))
            blocks.append(new)
            origin.append(i)
    stack.replace(blocks)
    _sync_config(model, origin, arch_config)
    prefixes = [f"{stack.attr}.{p}." for p in new_positions]
    return {"layers_before": n, "inserted_after": sorted(after), "new_positions": new_positions,
            "layers_after": len(blocks)}, prefixes
