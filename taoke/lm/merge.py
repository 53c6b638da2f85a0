"""Save a trained causal LM as a plain HF model, merging LoRA/DoRA adapters tensor by tensor, and prove it.

`save_merged` walks the model module by module: for an adapted layer it asks PEFT for that layer's merged
weight (get_delta_weight / the DoRA variant's merge_safe), for any other module it takes its own
parameters, and it writes safetensors shards of at most `shard_mb` as it goes. So at most one shard
of merged tensors exists beside the in-memory model: never two full copies. The tokenizer (special
tokens, chat template) and generation config are written with it, and the directory appears atomically.

`parity_check` reloads the saved directory with plain transformers and compares tokenizer, logits and
greedy generations with the in-memory model; any mismatch raises ParityError.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from peft.tuners.lora import LoraLayer
from peft.utils.other import TrainableTokensWrapper
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from taoke.errors import ModelError
from taoke.models.parts import unwrap


class ParityError(ModelError):
    """The saved model does not behave like the in-memory one."""


def _merged_weight(layer) -> torch.Tensor:
    """Base weight of one PEFT LoRA layer with its active adapters merged, as a new tensor (base untouched)."""
    weight = layer.get_base_layer().weight.detach().clone()
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        if name in getattr(layer, "lora_variant", {}):  # DoRA and other variants: PEFT's own merge rule
            weight = layer.lora_variant[name].merge_safe(layer, name, weight)
            if hasattr(layer, "_cache_pop"):
                layer._cache_pop(f"{name}-weight_norm")
        else:
            weight = weight + layer.get_delta_weight(name).to(weight.dtype)
    return weight


def merged_state(model, dtype: torch.dtype | None = None):
    """(name, tensor) pairs of the plain transformers model, adapters merged, tied tensors once."""
    lora_types, token_types = (LoraLayer,), (TrainableTokensWrapper,)
    lm = unwrap(model)
    seen: set[int] = set()
    skip_prefixes: list[str] = []
    for prefix, module in lm.named_modules():
        if any(prefix.startswith(p) for p in skip_prefixes):
            continue
        if isinstance(module, lora_types):
            skip_prefixes.append(prefix + ".")
            base = module.get_base_layer()
            seen.add(id(base.weight))
            yield f"{prefix}.weight", _cast(_merged_weight(module), dtype)
            if getattr(base, "bias", None) is not None:
                yield f"{prefix}.bias", _cast(base.bias.detach(), dtype)
            continue
        if isinstance(module, token_types):  # trained rows of the embedding (PEFT trainable tokens)
            skip_prefixes.append(prefix + ".")
            layer = module.token_adapter
            base = layer.base_layer
            if id(base.weight) in seen:  # a head tied to that embedding: transformers re-ties on load
                continue
            seen.add(id(base.weight))
            yield f"{prefix}.weight", _cast(layer.get_merged_weights(layer.active_adapters).detach(), dtype)
            if getattr(base, "bias", None) is not None:
                yield f"{prefix}.bias", _cast(base.bias.detach(), dtype)
            continue
        items = list(module.named_parameters(recurse=False))
        items += [(n, b) for n, b in module.named_buffers(recurse=False)
                  if n not in module._non_persistent_buffers_set]
        for name, t in items:
            if id(t) in seen:   # tied (e.g. lm_head = embed_tokens): transformers re-ties on load
                continue
            seen.add(id(t))
            yield (f"{prefix}.{name}" if prefix else name), _cast(t.detach(), dtype)


def _cast(t: torch.Tensor, dtype) -> torch.Tensor:
    t = t.to("cpu")
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t.contiguous()


def save_merged(model, tokenizer, out_dir: str | Path, dtype: torch.dtype | None = None,
                shard_mb: int = 200) -> Path:
    """Write a merged, plain HF model directory (safetensors shards, config, tokenizer, generation config)."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        shard, shard_bytes, files, weight_map, total = {}, 0, [], {}, 0

        def flush():
            nonlocal shard, shard_bytes
            if shard:
                fname = f"shard-{len(files) + 1:05d}.safetensors"
                save_file(shard, tmp / fname, metadata={"format": "pt"})
                files.append(fname)
                weight_map.update({k: fname for k in shard})
                shard, shard_bytes = {}, 0

        saved_dtype = None
        for name, t in merged_state(model, dtype):
            shard[name] = t
            nbytes = t.numel() * t.element_size()
            shard_bytes += nbytes
            total += nbytes
            saved_dtype = saved_dtype or (t.dtype if t.is_floating_point() else None)
            if shard_bytes >= shard_mb * 2**20:
                flush()
        flush()
        _name_shards(tmp, files, weight_map, total)

        lm = unwrap(model)
        config = lm.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.architectures = [type(lm).__name__]
        config.dtype = saved_dtype or torch.float32
        config.save_pretrained(tmp)
        if getattr(lm, "generation_config", None) is not None:
            lm.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _swap_in(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _name_shards(tmp: Path, files: list[str], weight_map: dict, total: int) -> None:
    """HF naming: one file is model.safetensors; several are model-0000i-of-0000n + an index."""
    if len(files) == 1:
        os.replace(tmp / files[0], tmp / "model.safetensors")
        return
    names = {f: f"model-{i:05d}-of-{len(files):05d}.safetensors" for i, f in enumerate(files, 1)}
    for old, new in names.items():
        os.replace(tmp / old, tmp / new)
    index = {"metadata": {"total_size": total}, "weight_map": {k: names[v] for k, v in weight_map.items()}}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _swap_in(tmp: Path, out: Path) -> None:
    """Replace `out` by the finished temp directory; an old directory is removed only after the swap."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- parity

def _tolerance(dtype: torch.dtype, scale: float) -> float:
    rel = {torch.float32: 1e-4, torch.float64: 1e-6}.get(dtype, 2e-2)  # bf16/fp16 carry ~3 significant digits
    return 1e-3 + rel * scale


@torch.no_grad()
def parity_check(saved_dir: str | Path, model, tokenizer, prompts: list, max_new_tokens: int = 16,
                 load=None) -> dict:
    """Reload `saved_dir` with plain transformers (or `load(dir)`, e.g. base + adapter) and compare it with
    the in-memory model; raise ParityError."""
    saved_dir = Path(saved_dir)
    problems = []
    tok2 = AutoTokenizer.from_pretrained(saved_dir)
    if (tok2.chat_template or None) != (tokenizer.chat_template or None):
        problems.append("chat template differs (lost or changed on save)")
    if tok2.special_tokens_map != tokenizer.special_tokens_map or len(tok2) != len(tokenizer):
        problems.append(f"special tokens or vocabulary differ: {tok2.special_tokens_map} / {len(tok2)} vs "
                        f"{tokenizer.special_tokens_map} / {len(tokenizer)}")
    device = next(model.parameters()).device
    saved = (load or AutoModelForCausalLM.from_pretrained)(saved_dir).to(device).eval()
    saved_dtype = next(saved.parameters()).dtype
    g1, g2 = unwrap(model).generation_config, saved.generation_config
    if (g1.eos_token_id, g1.pad_token_id, g1.bos_token_id) != (g2.eos_token_id, g2.pad_token_id, g2.bos_token_id):
        problems.append(f"generation config special ids differ: eos {g2.eos_token_id} vs {g1.eos_token_id}")

    was_training = model.training
    model.eval()
    report = {"prompts": len(prompts), "max_logit_diff": 0.0, "tolerance": 0.0, "generations": []}
    try:
        for p in prompts:
            msgs = [{"role": "user", "content": p}] if isinstance(p, str) else p
            text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            text2 = tok2.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) \
                if tok2.chat_template else None
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
            if text2 is None or tok2(text2, add_special_tokens=False)["input_ids"] != ids[0].tolist():
                problems.append(f"prompt {p!r} tokenizes differently after reload")
            a = model(input_ids=ids).logits.float()
            b = saved(input_ids=ids).logits.float()
            if a.shape != b.shape:
                problems.append(f"logit shapes differ: {tuple(b.shape)} vs {tuple(a.shape)}")
                continue
            diff = float((a - b).abs().max())
            tol = _tolerance(saved_dtype, float(a.abs().max()))
            report["max_logit_diff"] = max(report["max_logit_diff"], diff)
            report["tolerance"] = max(report["tolerance"], tol)
            if diff > tol:
                problems.append(f"logits differ on {p!r}: max |diff| {diff:.3g} > {tol:.3g}")
            kw = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            ga = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)[0, ids.shape[1]:]
            gb = saved.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)[0, ids.shape[1]:]
            same = ga.tolist() == gb.tolist()
            if not same:
                k = next((i for i, (x, y) in enumerate(zip(ga.tolist(), gb.tolist())) if x != y),
                         min(len(ga), len(gb)))
                # a flip between two near-tied tokens is rounding, not a behaviour change
                ctx = torch.cat([ids[0], ga[:k]])[None]
                top = model(input_ids=ctx).logits[0, -1].float().topk(2).values
                if float(top[0] - top[1]) > tol:
                    problems.append(f"greedy generation differs on {p!r} at token {k}: "
                                    f"{tokenizer.decode(gb)!r} vs {tokenizer.decode(ga)!r}")
            report["generations"].append({"prompt": msgs[-1]["content"], "text": tokenizer.decode(
                ga, skip_special_tokens=True), "identical": same})
    finally:
        if was_training:
            model.train()
    if problems:
        raise ParityError(f"{saved_dir}: saved model does not match the trained model:\n  - " + "\n  - ".join(problems))
    return report
