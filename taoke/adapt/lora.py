"""LoRA and DoRA through PEFT on a transformers classifier; the head is trained in full (modules_to_save)."""

from __future__ import annotations

from peft import LoraConfig, get_peft_model
from torch import nn

from taoke.adapt.targets import check_targets, default_targets
from taoke.errors import RecipeError
from taoke.models.task_model import HFClassifier, head_owner
from taoke.recipe import AdaptConfig


def apply_lora(model: nn.Module, cfg: AdaptConfig) -> dict:
    if not isinstance(model, HFClassifier):
        raise RecipeError(f"adapt.method '{cfg.method}' needs a pretrained transformers base; "
                          "from-scratch models train in full.")
    _, head_attr = head_owner(model)
    exclude = (head_attr,)
    targets = check_targets(model.hf, cfg.target_modules, exclude) if cfg.target_modules is not None else \
        default_targets(model.hf, "attention", exclude)
    # BERT-style heads read a pooler (dense + tanh on [CLS]) that sentence encoders never trained: train it too.
    pooler = ["pooler"] if getattr(model.hf.base_model, "pooler", None) is not None else []
    config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                        use_dora=cfg.method == "dora", modules_to_save=[head_attr] + pooler)
    model.hf = get_peft_model(model.hf, config)
    return {"target_modules": targets}


def is_peft(model: nn.Module) -> bool:
    return isinstance(model, HFClassifier) and type(model.hf).__name__.startswith("Peft")
