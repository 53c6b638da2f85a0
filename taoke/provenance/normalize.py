"""`normalize SRC DST`: rewrite a (renamed) checkpoint under its family's canonical HF names and config.

Supported family: llama (what the renamed-LLaMA case needs; GGUF LLaMA files normalise too). The output is
checked by loading it with plain transformers and comparing logits on a probe with the source tensors placed
in the canonical model in memory, i.e. the check covers file writing, naming and config.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from taoke.errors import ModelError
from taoke.files import atomic_dir, write_json_atomic
from taoke.formats import open_weights
from taoke.formats.base import WeightReader
from taoke.provenance.canonical import CanonicalView, canonical_view

LLAMA_NAMES = {
    "embed": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "head": "lm_head.weight",
    "attn_norm": "model.layers.{i}.input_layernorm.weight",
    "ffn_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "attn_q": "model.layers.{i}.self_attn.q_proj.weight",
    "attn_k": "model.layers.{i}.self_attn.k_proj.weight",
    "attn_v": "model.layers.{i}.self_attn.v_proj.weight",
    "attn_o": "model.layers.{i}.self_attn.o_proj.weight",
    "ffn_gate": "model.layers.{i}.mlp.gate_proj.weight",
    "ffn_up": "model.layers.{i}.mlp.up_proj.weight",
    "ffn_down": "model.layers.{i}.mlp.down_proj.weight",
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                    "tokenizer.model", "merges.txt", "vocab.json", "generation_config.json")


def _cfg_int(cfg: dict, *keys):
    for k in keys:
        if isinstance(cfg.get(k), int):
            return cfg[k]
    return None


def llama_config(reader: WeightReader, view: CanonicalView) -> dict:
    """A LlamaConfig dict from the source config where it says so, else from tensor shapes."""
    if view.family != "llama":
        raise ModelError(f"normalize supports the llama family; this checkpoint looks like '{view.family}'")
    cfg = reader.config or {}
    hidden = view.hidden
    layer0 = view.layers[view.layer_ids[0]]
    n_heads = _cfg_int(cfg, "num_attention_heads", "n_head", "num_heads", "n_heads") or max(1, hidden // 64)
    head_dim = _cfg_int(cfg, "head_dim") or layer0["attn_q"].shape[0] // n_heads
    n_kv = layer0["attn_k"].shape[0] // head_dim
    out = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "intermediate_size": layer0["ffn_gate"].shape[0],
        "num_hidden_layers": len(view.layers), "num_attention_heads": n_heads, "num_key_value_heads": n_kv,
        "head_dim": head_dim, "vocab_size": view.globals["embed"].shape[0],
        "rms_norm_eps": float(cfg.get("rms_norm_eps", cfg.get("layer_norm_epsilon", 1e-5))),
        "rope_theta": float(cfg.get("rope_theta", 10000.0)),
        "max_position_embeddings": _cfg_int(cfg, "max_position_embeddings", "n_positions") or 2048,
        "tie_word_embeddings": "head" not in view.globals,
        "hidden_act": cfg.get("hidden_act", "silu"),
        "attention_bias": False, "mlp_bias": False,
    }
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if cfg.get(k) is not None:
            out[k] = cfg[k]
    return out


def llama_state_dict(reader: WeightReader, view: CanonicalView) -> dict[str, np.ndarray]:
    sd = {}
    if view.unknown:
        raise ModelError(f"cannot place {len(view.unknown)} tensor(s) in the llama layout: {view.unknown[:5]}")
    for slot in view.slots():
        template = LLAMA_NAMES.get(slot.role)
        if template is None:
            raise ModelError(f"tensor '{slot.name}' (role {slot.role}) has no place in the llama layout")
        sd[template.format(i=slot.layer)] = reader.get(slot.name)
    return sd


def _probe_ids(vocab: int, n: int = 24) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).integers(0, vocab, size=(1, n)))


def reference_logits(cfg: dict, sd: dict) -> torch.Tensor:
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and cfg["tie_word_embeddings"])]
    if missing or unexpected:
        raise ModelError(f"state dict does not fit the llama model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        return model(_probe_ids(cfg["vocab_size"])).logits


def normalize(src, dst: str | Path) -> dict:
    """Write DST (model.safetensors + config.json + tokenizer files) and check its logits; return a report.

    Everything is written into a temporary directory beside DST and renamed to DST only once the logits check
    passed: a failure at any point leaves no directory that looks like a checkpoint."""
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ModelError(f"{dst} exists and is not empty; choose a new output directory")
    reader = open_weights(src)
    view = canonical_view(reader)
    cfg = llama_config(reader, view)
    sd = llama_state_dict(reader, view)
    renamed = {slot.name: LLAMA_NAMES[slot.role].format(i=slot.layer) for slot in view.slots()}
    src_dir = reader.path if reader.path.is_dir() else reader.path.parent
    reader.close()
    with atomic_dir(dst) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        write_json_atomic(tmp / "config.json", cfg)
        for name in _TOKENIZER_FILES:
            if (src_dir / name).exists():
                shutil.copyfile(src_dir / name, tmp / name)
        expected = reference_logits(cfg, sd)
        del sd
        model = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32).eval()
        with torch.no_grad():
            got = model(_probe_ids(cfg["vocab_size"])).logits
        diff = float((got - expected).abs().max())
        if diff != 0.0:
            raise ModelError(f"normalized model's logits differ from the source by up to {diff:.3g}; nothing was "
                             f"written to {dst}")
        report = {"source": str(src), "output": str(dst), "family": view.family, "config": cfg,
                  "renamed": {k: v for k, v in renamed.items() if k != v}, "tensors": len(renamed),
                  "probe_tokens": int(_probe_ids(cfg["vocab_size"]).shape[1]), "max_abs_logit_diff": diff,
                  "identical_logits": diff == 0.0}
        write_json_atomic(tmp / "normalize_report.json", report)
    return report
