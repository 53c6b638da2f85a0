"""Adaptation of causal LMs: which parameters train. full | freeze (embeddings + bottom N layers) | lora | dora.

LoRA/DoRA wrap the model with PEFT (every attention and MLP projection by default, from the one target
table); rows that vocabulary expansion added train in full beside the adapter (PEFT trainable tokens).
LLaMA-Pro's `train_only_new` leaves only the inserted blocks trainable.
"""

from __future__ import annotations

from peft import LoraConfig, get_peft_model
from torch import nn

from taoke.adapt.targets import check_targets, default_targets
from taoke.errors import RecipeError
from taoke.models.parts import count_parameters, find_stack, unwrap
from taoke.recipe import AdaptConfig


def adapt_lm(model: nn.Module, cfg: AdaptConfig, train_only: list[str] | None = None,
             trainable_tokens: list[int] | None = None) -> tuple[nn.Module, dict]:
    """Set which parameters train; returns (model, record). lora/dora return the PEFT-wrapped model."""
    if hasattr(model, "peft_config"):   # already adapted (e.g. resumed): leave as is
        return model, {"method": cfg.method, **_counts(model)}
    if cfg.method in ("lora", "dora"):
        head = unwrap(model).get_output_embeddings()
        exclude = tuple(n for n, m in model.named_modules() if m is head)
        targets = check_targets(model, cfg.target_modules, exclude) if cfg.target_modules is not None else \
            default_targets(model, "all", exclude)
        config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                            use_dora=cfg.method == "dora", task_type="CAUSAL_LM", bias="none",
                            trainable_token_indices=trainable_tokens or None)
        model = get_peft_model(model, config)
        tokens = {"trainable_tokens": len(trainable_tokens)} if trainable_tokens else {}
        return model, {"method": cfg.method, "r": cfg.r, "alpha": cfg.alpha, "dropout": cfg.dropout,
                       "target_modules": targets, **tokens, **_counts(model)}
    if cfg.method not in ("full", "freeze"):
        raise RecipeError(f"adapt.method '{cfg.method}' does not apply to a causal LM; use full, freeze, lora or dora")
    for p in model.parameters():
        p.requires_grad = True
    record: dict = {"method": cfg.method}
    if cfg.method == "freeze":
        layers = find_stack(model).blocks
        n = cfg.layers if cfg.layers is not None else len(layers) // 2
        if not 0 <= n <= len(layers):
            raise RecipeError(f"adapt.layers={n} but the model has {len(layers)} layers")
        frozen = [unwrap(model).get_input_embeddings(), *layers[:n]]
        if unwrap(model).config.tie_word_embeddings:
            frozen = frozen[1:]  # the tied embedding is also the lm_head: it stays trainable
        for m in frozen:
            for p in m.parameters():
                p.requires_grad = False
        record["frozen_layers"] = n
    if train_only:  # LLaMA-Pro: the rest of the model keeps its base weights
        for name, p in model.named_parameters():
            p.requires_grad = any(part in name for part in train_only)
        record["train_only"] = list(train_only)
    return model, {**record, **_counts(model)}


def _counts(model: nn.Module) -> dict:
    total, trainable = count_parameters(model)
    if trainable == 0:
        raise RecipeError("the adaptation leaves no trainable parameters")
    return {"trainable_params": trainable, "total_params": total}
