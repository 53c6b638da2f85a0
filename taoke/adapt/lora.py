"""LoRA and DoRA through PEFT on a transformers classifier; the head is trained in full (modules_to_save)."""

from __future__ import annotations

from torch import nn

from taoke.errors import RecipeError
from taoke.models.task_model import HFClassifier, _head_owner
from taoke.recipe import AdaptConfig

# Attention projections LoRA targets by default, per naming family.
DEFAULT_TARGETS = (["query", "value"], ["q_proj", "v_proj"], ["q_lin", "v_lin"], ["c_attn"], ["qkv"])


def linear_names(module: nn.Module) -> list[str]:
    return [n for n, m in module.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]


def resolve_targets(inner: nn.Module, targets: list[str] | str | None, head_attr: str) -> list[str]:
    names = [n for n in linear_names(inner) if not n.startswith(head_attr)]
    if targets is None:
        for family in DEFAULT_TARGETS:
            if all(any(n.split(".")[-1] == t for n in names) for t in family):
                return family
        raise RecipeError("adapt.target_modules: cannot guess the attention projections of this model; name them "
                          f"(module names look like {names[:3]}).")
    wanted = [targets] if isinstance(targets, str) else list(targets)
    for t in wanted:
        if t == "all-linear":
            continue
        if not any(n == t or n.endswith("." + t) for n in names):
            examples = sorted({n.split(".")[-1] for n in names})
            raise RecipeError(f"adapt.target_modules: '{t}' matches no Linear module. Leaf names here: "
                              f"{', '.join(examples[:12])}.")
    return wanted


def apply_lora(model: nn.Module, cfg: AdaptConfig) -> dict:
    if not isinstance(model, HFClassifier):
        raise RecipeError(f"adapt.method '{cfg.method}' needs a pretrained transformers base; "
                          "from-scratch models train in full.")
    from peft import LoraConfig, get_peft_model

    _, head_attr = _head_owner(model)
    targets = resolve_targets(model.hf, cfg.target_modules, head_attr)
    # BERT-style heads read a pooler (dense + tanh on [CLS]) that sentence encoders never trained: train it too.
    pooler = ["pooler"] if getattr(model.hf.base_model, "pooler", None) is not None else []
    config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                        target_modules=targets if targets != ["all-linear"] else "all-linear",
                        use_dora=cfg.method == "dora", modules_to_save=[head_attr] + pooler)
    model.hf = get_peft_model(model.hf, config)
    return {"target_modules": targets}


def is_peft(model: nn.Module) -> bool:
    return isinstance(model, HFClassifier) and type(model.hf).__name__.startswith("Peft")
