"""`normalize SRC DST`: rewrite a (renamed) checkpoint under its family's canonical HF names and config.

Supported family: llama (what the renamed-LLaMA case needs; GGUF LLaMA files normalise too). The written
config keeps every field the source config states (rope_parameters / rope_theta / rope_scaling, norm eps,
activation, biases, token ids, ...) and takes only names and sizes from the tensors. The output is checked
against the source's own function: the reference model is built from the source config as transformers reads
it (its declared architecture when transformers knows it, every field read as a LlamaConfig when the name is
disguised; a GGUF file through transformers' GGUF config reader), with the source tensors placed by the
canonical view; the written directory, loaded by plain transformers, must give the same logits.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

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


# what only the tensors can say (sizes) or what names the architecture: never copied from the source config
_STRUCTURAL = {"architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings",
               "attention_bias", "mlp_bias", "auto_map", "quantization_config", "_name_or_path", "transformers_version"}


def llama_config(reader: WeightReader, view: CanonicalView) -> dict:
    """A LlamaConfig dict: every field the source config states (rope, eps, activation, token ids, ...), with the
    architecture's names and the sizes taken from the tensors."""
    if view.family != "llama":
        raise ModelError(f"normalize supports the llama family; this checkpoint looks like '{view.family}'")
    cfg = reader.config or {}
    hidden = view.hidden
    layer0 = view.layers[view.layer_ids[0]]
    n_heads = _cfg_int(cfg, "num_attention_heads", "n_head", "num_heads", "n_heads") or max(1, hidden // 64)
    head_dim = _cfg_int(cfg, "head_dim") or layer0["attn_q"].shape[0] // n_heads
    n_kv = layer0["attn_k"].shape[0] // head_dim
    structural = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "intermediate_size": layer0["ffn_gate"].shape[0],
        "num_hidden_layers": len(view.layers), "num_attention_heads": n_heads, "num_key_value_heads": n_kv,
        "head_dim": head_dim, "vocab_size": view.globals["embed"].shape[0],
        "tie_word_embeddings": "head" not in view.globals,
        "attention_bias": "attn_q_bias" in layer0, "mlp_bias": "ffn_up_bias" in layer0,
    }
    stated = {k: v for k, v in cfg.items() if k not in _STRUCTURAL}
    if "rms_norm_eps" not in stated and "layer_norm_epsilon" in stated:   # GPT-style spelling of the norm eps
        stated["rms_norm_eps"] = stated["layer_norm_epsilon"]
    if "max_position_embeddings" not in stated and _cfg_int(cfg, "n_positions"):
        stated["max_position_embeddings"] = cfg["n_positions"]
    out = {**stated, **structural}
    # transformers reads the config as LlamaConfig does (rope_theta folded into rope_parameters, defaults filled)
    return {k: v for k, v in LlamaConfig(**out).to_dict().items() if k not in ("transformers_version",)}


def source_config(reader: WeightReader, view: CanonicalView) -> LlamaConfig:
    """The source's own configuration as transformers reads it, for the reference model: a GGUF file through
    transformers' GGUF reader, a directory under its declared architecture when transformers knows it, else its
    config.json read whole as a LlamaConfig (a disguised architecture name). Sizes come from the tensors."""
    path = Path(reader.path)
    structural = {k: v for k, v in llama_config(reader, view).items() if k in _STRUCTURAL}
    stated: dict = dict(reader.config or {})
    try:
        if path.suffix == ".gguf":
            stated = AutoConfig.from_pretrained(path.parent, gguf_file=path.name).to_dict()
        elif (path if path.is_dir() else path.parent).joinpath("config.json").is_file():
            stated = AutoConfig.from_pretrained(path if path.is_dir() else path.parent).to_dict()
    except (ValueError, KeyError, OSError):   # an architecture name transformers does not know: read it as LLaMA
        pass
    return LlamaConfig(**{**{k: v for k, v in stated.items() if k not in _STRUCTURAL}, **structural})


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


def reference_logits(config: LlamaConfig, sd: dict) -> torch.Tensor:
    """Logits of the source tensors in a LLaMA built from `config` (the source's own, see source_config)."""
    model = LlamaForCausalLM(config).eval()
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelError(f"state dict does not fit the llama model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    with torch.no_grad():
        return model(_probe_ids(config.vocab_size)).logits


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
    reference = source_config(reader, view)
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
        expected = reference_logits(reference, sd)
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
