"""Structure edits, applied in recipe order; each returns a record for lineage.json and the card."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from taoke.edit.freeze import freeze, train_only
from taoke.edit.head import insert_hidden, replace_head
from taoke.edit.layers import drop_layers, expand_layers
from taoke.edit.prune import prune
from taoke.edit.vocab import expand_vocab, read_tokens
from taoke.errors import RecipeError
from taoke.models.task_model import HFClassifier


@dataclass
class EditResult:
    head_spec: dict | None
    records: list[dict] = field(default_factory=list)
    freezes: list = field(default_factory=list)          # Freeze configs, applied after the adaptation method
    train_only_prefixes: list[str] | None = None         # expand_layers with train_only_new


def apply_edits(model: nn.Module, tokenizer, edits: list[tuple[str, object]], outputs: int, labels_changed: bool,
                head_spec: dict | None, arch_config: dict, calibration=None) -> EditResult:
    """`calibration(samples)` gives training batches for edits that measure activations (prune by activation)."""
    result = EditResult(head_spec)
    ops = [op for op, _ in edits]
    if labels_changed and "replace_head" not in ops and "insert_hidden" not in ops:
        result.head_spec = replace_head(model, outputs)
        result.records.append({"op": "replace_head", "automatic": True,
                               "reason": "label set differs from the base's", "outputs": outputs})
    for i, (op, cfg) in enumerate(edits):
        before = sum(p.numel() for p in model.parameters())
        detail: dict = {}
        if op == "replace_head":
            if cfg.outputs is not None and cfg.outputs != outputs:
                raise RecipeError(f"edits[{i}].replace_head.outputs={cfg.outputs} contradicts the data, which has "
                                  f"{outputs} {'outputs' if outputs == 1 else 'classes'}; remove outputs or fix it.")
            result.head_spec = replace_head(model, outputs)
        elif op == "insert_hidden":
            result.head_spec = insert_hidden(model, outputs, cfg)
        elif op == "drop_layers":
            detail = drop_layers(model, cfg.keep, cfg.every, arch_config)
        elif op == "expand_layers":
            detail, prefixes = expand_layers(model, cfg.after, arch_config)
            if cfg.train_only_new:
                result.train_only_prefixes = (result.train_only_prefixes or []) + prefixes
        elif op == "freeze":
            result.freezes.append(cfg)
        elif op == "expand_vocab":
            if not isinstance(model, HFClassifier):
                raise RecipeError(f"edits[{i}].expand_vocab needs a transformers base (tokenizer + embeddings).")
            detail = expand_vocab(model.hf, tokenizer, read_tokens(cfg.tokens, cfg.file), cfg.init)
        elif op == "prune":
            if not isinstance(model, HFClassifier):
                raise RecipeError(f"edits[{i}].prune needs a transformers encoder (BERT family), not a scratch model.")
            detail = prune(model, cfg.mlp, cfg.heads, cfg.by,
                           (lambda: calibration(cfg.samples)) if calibration is not None else None, cfg.compensate,
                           cfg.round_to)
        after = sum(p.numel() for p in model.parameters())
        result.records.append({"op": op, **cfg.model_dump(exclude_none=True), **detail,
                               "params_before": before, "params_after": after})
    return result


def apply_post_adapt(model: nn.Module, result: EditResult) -> None:
    """Edits that decide what trains run after the adaptation method has set requires_grad."""
    if result.train_only_prefixes:
        train_only(model, result.train_only_prefixes)
    for cfg in result.freezes:
        patterns = [cfg.pattern] if isinstance(cfg.pattern, str) else cfg.pattern
        rec = freeze(model, cfg.layers, patterns)
        for r in result.records:
            if r["op"] == "freeze" and "frozen_params" not in r:
                r.update(rec)
                break
