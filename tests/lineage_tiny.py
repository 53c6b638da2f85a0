"""Tiny LLaMA checkpoints for fast lineage tests (random init; derived ones are exact edits of a parent)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
            tie_word_embeddings=True, architectures=["LlamaForCausalLM"], model_type="llama")


def tiny_llama(d: Path, seed: int, norm_noise: float = 0.02) -> Path:
    """Random-init tiny LLaMA; norm gains 1 + small noise, like trained models' gains near 1."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    rng = np.random.default_rng(seed)
    for k in sd:
        if "norm" in k:
            sd[k] = (1.0 + norm_noise * rng.standard_normal(sd[k].shape)).astype(np.float32)
    return save(d, sd, dict(TINY))


def save(d: Path, sd: dict, cfg: dict, card_base: str | None = None) -> Path:
    from safetensors.numpy import save_file

    d.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sd.items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(cfg))
    if card_base is not None:
        (d / "README.md").write_text(f"---\nbase_model: {card_base}\nlicense: apache-2.0\n---\n# model\n")
    return d


def load(d: Path) -> tuple[dict, dict]:
    from safetensors.numpy import load_file

    return load_file(str(d / "model.safetensors")), json.loads((d / "config.json").read_text())


def finetune_like(src: Path, d: Path, scale: float = 0.3, seed: int = 5, card_base: str | None = None) -> Path:
    """Parent + dense noise of `scale` x each tensor's std (a stand-in for heavy fine-tuning)."""
    sd, cfg = load(src)
    rng = np.random.default_rng(seed)
    sd = {k: v + scale * v.std() * rng.standard_normal(v.shape).astype(np.float32) if v.ndim == 2 else v
          for k, v in sd.items()}
    return save(d, sd, cfg, card_base)
