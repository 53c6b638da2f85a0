"""Find the parts of a model that edits, adaptation and training act on, whatever wraps it.

The one layer finder: classifiers (HFClassifier), causal LMs, PEFT-wrapped models and scratch
transformers all give their main stack of blocks through `find_stack`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from taoke.errors import RecipeError

# Where transformers and taoke keep the main block stack, by attribute path under the model's body.
STACK_PATHS = ("encoder.layer", "layers", "h", "transformer.layer", "encoder.layers", "model.layers",
               "transformer.h", "encoder.encoder.layers")


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper and under taoke's HFClassifier (or the model itself)."""
    model = getattr(model, "hf", model)  # HFClassifier keeps its transformers model as .hf
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@dataclass
class Stack:
    owner: nn.Module        # the module holding the ModuleList
    attr: str               # its attribute name there
    blocks: nn.ModuleList

    def __len__(self) -> int:
        return len(self.blocks)

    def replace(self, blocks: list[nn.Module]) -> None:
        self.blocks = nn.ModuleList(blocks)
        setattr(self.owner, self.attr, self.blocks)


def find_stack(model: nn.Module) -> Stack:
    """The main layer stack (bottom first) of a transformer; RecipeError when the model has none."""
    inner = unwrap(model)
    root = getattr(inner, "base_model", inner)  # a *ForX model's body (BertModel, LlamaModel, ...)
    for start in (root, inner):
        for path in STACK_PATHS:
            owner, parts = start, path.split(".")
            try:
                for part in parts[:-1]:
                    owner = getattr(owner, part)
                stack = getattr(owner, parts[-1])
            except AttributeError:
                continue
            if isinstance(stack, nn.ModuleList) and len(stack):
                return Stack(owner, parts[-1], stack)
    raise RecipeError(f"{type(inner).__name__} has no transformer layer stack "
                      "(layer edits and freezing by layer need a transformer: an HF model or scratch:transformer).")


def input_embeddings(model: nn.Module) -> nn.Module | None:
    inner = unwrap(model)
    if hasattr(inner, "get_input_embeddings"):
        return inner.get_input_embeddings()
    return getattr(inner, "embed", None)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def real_tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[tokens, dim] rows of [batch, seq, dim] activations, padding positions left out where the attention mask
    matches (statistics measured on a model's inputs count only tokens it is scored on)."""
    return x[mask.bool()] if mask is not None and mask.shape == x.shape[:2] else x.flatten(0, -2)
