"""Check a merged LM's saved shards against references that do not share taoke's merge code.

1. PEFT's own merge: `merge_and_unload()` on a deep copy of the trained PEFT model gives every tensor the saved
   shards must hold (save_merged asks PEFT layer by layer and streams; this takes PEFT's whole-model path).
2. The base, edited by hand: for LoRA runs with depth or vocabulary edits, a state dict built straight from the
   base's weights the way the recorded edit says (keep these layers; insert a copy of layer i with its output
   projections zeroed; the first vocab_before embedding rows unchanged), plus scale * B @ A for each adapted
   weight, computed here from the adapter's own matrices. New vocabulary rows trained in full are left out.

A mismatch raises ParityError naming the first tensors that differ.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch
from peft import PeftModel
from safetensors import safe_open

from taoke.lm.merge import ParityError
from taoke.models.parts import unwrap

LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
ZEROED_IN_NEW_BLOCKS = ("self_attn.o_proj.weight", "mlp.down_proj.weight")   # LLaMA-Pro identity init


def saved_tensors(saved_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(saved_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                out[k] = sf.get_tensor(k)
    return out


def _tolerance(ref: torch.Tensor) -> float:
    return 1e-6 + 1e-5 * float(ref.abs().max()) if ref.numel() else 0.0


def _compare(saved: dict, reference: dict, names, what: str, tied_head: bool) -> dict:
    worst, bad, checked = 0.0, [], 0
    for name in names:
        if name not in saved:
            if tied_head and name == "lm_head.weight":
                continue
            bad.append(f"{name} missing from the saved model")
            continue
        a, b = saved[name].float(), reference[name].float()
        if a.shape != b.shape:
            bad.append(f"{name}: shape {tuple(a.shape)} vs {tuple(b.shape)} in {what}")
            continue
        diff = float((a - b).abs().max()) if a.numel() else 0.0
        worst = max(worst, diff)
        checked += 1
        if diff > _tolerance(b):
            bad.append(f"{name}: max |diff| {diff:.3g} vs {what}")
    if bad:
        raise ParityError(f"saved shards differ from {what}: " + "; ".join(bad[:4]) +
                          (f" (+{len(bad) - 4} more)" if len(bad) > 4 else ""))
    return {"reference": what, "tensors": checked, "max_abs_diff": worst}


@torch.no_grad()
def check_against_peft_merge(saved_dir: Path, model) -> dict | None:
    """Saved shards vs PEFT's merge_and_unload() on a copy; None when the model carries no adapter."""
    if not isinstance(model, PeftModel):
        return None
    merged = copy.deepcopy(model).merge_and_unload()
    reference = {k: v.detach().cpu() for k, v in merged.state_dict().items()}
    saved = saved_tensors(saved_dir)
    tied = bool(getattr(merged.config, "tie_word_embeddings", False))
    extra = sorted(set(saved) - set(reference))
    if extra:
        raise ParityError(f"saved shards hold tensors PEFT's merge does not have: {extra[:4]}")
    return _compare(saved, reference, sorted(reference), "PEFT's merge_and_unload() of the trained model", tied)


def edited_base(base_state: dict[str, torch.Tensor], edits: list[dict]) -> tuple[dict, int | None]:
    """The base's state dict with the recorded depth edits applied by hand; also the rows vocab edits kept."""
    layers = {}
    rest = {}
    for k, v in base_state.items():
        m = LAYER.match(k)
        if m:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = v
        else:
            rest[k] = v
    plan = [(i, False) for i in range(len(layers))]     # (base layer, zeroed copy?) per position
    vocab_rows = None
    for e in edits:
        if e["op"] == "drop_layers":
            plan = [plan[i] for i in e["kept"]]
        elif e["op"] == "expand_layers":
            new = []
            for i, src in enumerate(plan):
                new.append(src)
                if i in e["inserted_after"]:
                    new.append((src[0], True))
            plan = new
        elif e["op"] == "expand_vocab":
            vocab_rows = e["vocab_before"] if vocab_rows is None else vocab_rows
    out = dict(rest)
    for pos, (src, zeroed) in enumerate(plan):
        for part, v in layers[src].items():
            out[f"model.layers.{pos}.{part}"] = torch.zeros_like(v) if zeroed and part in ZEROED_IN_NEW_BLOCKS else v
    return out, vocab_rows


@torch.no_grad()
def check_against_edited_base(saved_dir: Path, model, base_state: dict[str, torch.Tensor], edits: list[dict]) -> dict:
    """LoRA runs: saved = hand-edited base + scale * B @ A (adapter matrices read here); new vocab rows excluded."""
    reference, vocab_rows = edited_base(base_state, edits)
    peft_cfg = model.peft_config[model.active_adapter]
    scale = peft_cfg.lora_alpha / peft_cfg.r
    for name, module in unwrap(model).named_modules():
        if hasattr(module, "lora_A") and model.active_adapter in getattr(module, "lora_A", {}):
            a = module.lora_A[model.active_adapter].weight.float().cpu()
            b = module.lora_B[model.active_adapter].weight.float().cpu()
            key = f"{name}.weight"
            reference[key] = reference[key].float() + scale * (b @ a)
    saved = saved_tensors(saved_dir)
    if vocab_rows is not None:
        for key in ("model.embed_tokens.weight", "lm_head.weight"):
            if key in saved and key in reference:
                saved[key], reference[key] = saved[key][:vocab_rows], reference[key][:vocab_rows]
    tied = bool(getattr(unwrap(model).config, "tie_word_embeddings", False))
    names = sorted(k for k in reference if k in saved or not (tied and k == "lm_head.weight"))
    what = "the base edited by hand (" + ", ".join(e["op"] for e in edits) + ") plus the adapter's scale * B @ A"
    return _compare(saved, reference, names, what, tied)
