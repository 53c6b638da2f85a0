"""The one LoRA target table: which Linear modules are a model's attention and MLP projections.

Leaf module names per naming family, as transformers names them. Classifiers adapt the attention query and
value projections by default (the LoRA paper's choice and PEFT's default for encoders); causal LMs adapt
every attention and MLP projection (QLoRA found that adapting all of them matters for instruction tuning).
A name matches a module whose dotted path equals it or ends with '.' + it, as PEFT matches target_modules.
"""

from __future__ import annotations

from torch import nn

from taoke.errors import RecipeError

# family: (attention query/value leaves, every projection leaf)
LORA_TARGETS: dict[str, tuple[list[str], list[str]]] = {
    "llama": (["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "bert": (["query", "value"], ["query", "key", "value", "dense"]),
    "distilbert": (["q_lin", "v_lin"], ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"]),
    "gpt2": (["c_attn"], ["c_attn", "c_proj", "c_fc"]),
    "phi3": (["qkv_proj"], ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
    "fused-qkv": (["qkv"], ["qkv", "proj", "fc1", "fc2"]),
}


def linear_names(module: nn.Module, exclude: tuple[str, ...] = ()) -> list[str]:
    """Dotted names of the Linear (and GPT-2 Conv1D) modules, minus those under an excluded prefix."""
    return [n for n, m in module.named_modules()
            if (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D") and not n.startswith(exclude)]


def _matches(names: list[str], target: str) -> bool:
    return any(n == target or n.endswith("." + target) for n in names)


def default_targets(module: nn.Module, scope: str, exclude: tuple[str, ...] = ()) -> list[str] | str:
    """The table's targets for this model: 'attention' (query/value) or 'all' projections.

    A model of no known family gets PEFT's 'all-linear' for scope 'all', and an error for 'attention'."""
    names = linear_names(module, exclude)
    for attention, every in LORA_TARGETS.values():
        if all(_matches(names, t) for t in attention):
            return attention if scope == "attention" else [t for t in every if _matches(names, t)]
    if scope == "all":
        return "all-linear"
    raise RecipeError("adapt.target_modules: cannot tell the attention projections of this model; name them "
                      f"(Linear modules here look like {names[:3]}).")


def check_targets(module: nn.Module, targets: list[str] | str, exclude: tuple[str, ...] = ()) -> list[str] | str:
    """Refuse a target that matches no Linear module, naming the leaves that exist."""
    if targets == "all-linear":
        return targets
    wanted = [targets] if isinstance(targets, str) else list(targets)
    names = linear_names(module, exclude)
    missing = [t for t in wanted if not _matches(names, t)]
    if missing:
        leaves = sorted({n.split(".")[-1] for n in names})
        raise RecipeError(f"adapt.target_modules {missing} match no Linear module; leaf names here: "
                          f"{', '.join(leaves[:16])}")
    return wanted
