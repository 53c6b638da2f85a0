"""`normalize SRC DST`: rewrite a (renamed) checkpoint under its family's canonical HF names and config.

Families: every architecture transformers knows whose tensors the canonical view places one to one (tested:
LLaMA, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3, Phi-3, GPT-2, BERT, RoBERTa). When the source config names
such an architecture, the target names come from transformers itself: the architecture is built on the meta
device and its own tensor names are placed by the same canonical view, so source and target meet on
(layer, role). A config whose architecture name transformers does not know (a disguised LLaMA) is read as LLaMA:
every field it states is kept (rope_parameters / rope_theta / rope_scaling, norm eps, activation, biases, ...),
names and sizes come from the tensors. The output is checked against the source's own function: the reference
model is built from the source config as transformers reads it, with the source tensors placed by the canonical
view; the written directory, loaded by plain transformers, must give the same outputs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file
import transformers
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PretrainedConfig,
                          PreTrainedModel)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from taoke.errors import ModelError
from taoke.files import atomic_dir, write_json_atomic
from taoke.formats import open_weights
from taoke.formats.base import TensorMeta, WeightReader
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
        raise ModelError(f"this checkpoint looks like '{view.family}' and its config names no architecture "
                         "transformers knows; normalize reads such checkpoints as the llama family only")
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


class _ShapeReader(WeightReader):
    """Names and shapes only: lets the canonical view place an architecture's own (meta-device) tensor names."""

    def __init__(self, shapes: dict[str, tuple], config: dict):
        super().__init__(Path("."))
        self._shapes, self.config = shapes, config

    def tensors(self) -> list[TensorMeta]:
        return [TensorMeta(name, shape, "f32") for name, shape in self._shapes.items()]


def declared_config(reader: WeightReader) -> PretrainedConfig | None:
    """The source config under its declared architecture when transformers knows it and it is not LLaMA (LLaMA and
    disguised names take the LLaMA path, which keeps every stated field); else None."""
    path = Path(reader.path)
    folder = path if path.is_dir() else path.parent
    if path.suffix == ".gguf" or not (folder / "config.json").is_file():
        return None
    try:
        config = AutoConfig.from_pretrained(folder)
    except (ValueError, KeyError, OSError):   # an architecture name transformers does not know
        return None
    return None if config.model_type == "llama" else config


def _auto_class(config: PretrainedConfig):
    """The class the config declares (BertModel for an encoder saved as one), else the family's causal LM."""
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
            return cls
    return AutoModelForCausalLM if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else AutoModel


def _build(config: PretrainedConfig):
    cls = _auto_class(config)
    return cls.from_config(config) if cls in (AutoModelForCausalLM, AutoModel) else cls(config)


def family_state_dict(reader: WeightReader, view: CanonicalView,
                      config: PretrainedConfig) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Source tensors under the names transformers gives this architecture, matched on (layer, role); and the
    renaming (source name -> target name)."""
    with torch.device("meta"):
        target = _build(config)
    shapes = {k: tuple(v.shape) for k, v in target.state_dict().items()}
    tview = canonical_view(_ShapeReader(shapes, config.to_dict()))
    if tview.unknown:
        raise ModelError(f"normalize cannot place {config.model_type}'s own tensors {tview.unknown[:3]}; this family "
                         "is not supported")
    source = {(s.layer, s.role): s for s in view.slots()}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    sd: dict[str, np.ndarray] = {}
    renamed: dict[str, str] = {}
    for slot in tview.slots():
        src = source.pop((slot.layer, slot.role), None)
        if src is None:
            if slot.role == "head" and tied:
                continue
            raise ModelError(f"{reader.path}: no tensor for {config.model_type}'s '{slot.name}' "
                             f"({slot.canonical}); the checkpoint does not fit its declared architecture")
        if tuple(src.shape) != slot.shape:
            raise ModelError(f"{reader.path}: tensor '{src.name}' has shape {tuple(src.shape)}, {config.model_type}'s "
                             f"'{slot.name}' needs {slot.shape}")
        sd[slot.name] = reader.get(src.name)
        renamed[src.name] = slot.name
    if source or view.unknown:
        left = [s.name for s in source.values()] + view.unknown
        raise ModelError(f"{reader.path}: {len(left)} tensor(s) have no place in {config.model_type}: {left[:5]}")
    return sd, renamed


def _outputs(model, vocab: int) -> torch.Tensor:
    with torch.no_grad():
        out = model(_probe_ids(vocab))
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _normalize_family(src, reader: WeightReader, view: CanonicalView, config: PretrainedConfig, dst: Path) -> dict:
    sd, names = family_state_dict(reader, view, config)
    src_dir = reader.path if reader.path.is_dir() else reader.path.parent
    reader.close()
    reference = _build(config).eval()
    missing, unexpected = reference.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=False)
    if unexpected or [m for m in missing if not m.endswith("lm_head.weight")]:
        raise ModelError(f"state dict does not fit {config.model_type}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if getattr(config, "tie_word_embeddings", False):
        reference.tie_weights()
    expected = _outputs(reference, config.vocab_size)
    cfg = {**config.to_dict(), "architectures": [type(reference).__name__]}
    report = {"source": str(src), "output": str(dst), "family": config.model_type, "config": cfg,
              "renamed": {k: v for k, v in names.items() if k != v}, "tensors": len(sd),
              "probe_tokens": int(_probe_ids(config.vocab_size).shape[1])}
    return _write_checked(dst, sd, cfg, src_dir, expected, type(reference), report, "outputs")


def _write_checked(dst: Path, sd: dict, cfg: dict, src_dir: Path, expected: torch.Tensor, model_cls, report: dict,
                   what: str) -> dict:
    """Write weights, config and tokenizer files into a temporary directory, load it back with `model_cls` and
    rename it to DST only when its outputs equal `expected`; the report (plus the difference) goes in too.
    Empties `sd` once it is written."""
    with atomic_dir(dst) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        sd.clear()   # the source tensors are on disk now: free them before the written model is loaded back
        write_json_atomic(tmp / "config.json", cfg)
        for name in _TOKENIZER_FILES:
            if (src_dir / name).exists():
                shutil.copyfile(src_dir / name, tmp / name)
        got = _outputs(model_cls.from_pretrained(str(tmp), dtype=torch.float32).eval(), cfg["vocab_size"])
        diff = float((got - expected).abs().max())
        if diff != 0.0:
            raise ModelError(f"normalized model's {what} differ from the source by up to {diff:.3g}; nothing was "
                             f"written to {dst}")
        report = {**report, "max_abs_logit_diff": diff, "identical_logits": True}
        write_json_atomic(tmp / "normalize_report.json", report)
    return report


def normalize(src, dst: str | Path) -> dict:
    """Write DST (model.safetensors + config.json + tokenizer files) and check its logits; return a report.

    Everything is written into a temporary directory beside DST and renamed to DST only once the logits check
    passed: a failure at any point leaves no directory that looks like a checkpoint."""
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ModelError(f"{dst} exists and is not empty; choose a new output directory")
    reader = open_weights(src)
    view = canonical_view(reader)
    declared = declared_config(reader)
    if declared is not None:
        return _normalize_family(src, reader, view, declared, dst)
    cfg = llama_config(reader, view)
    reference = source_config(reader, view)
    sd = llama_state_dict(reader, view)
    renamed = {slot.name: LLAMA_NAMES[slot.role].format(i=slot.layer) for slot in view.slots()}
    src_dir = reader.path if reader.path.is_dir() else reader.path.parent
    reader.close()
    expected = reference_logits(reference, sd)
    report = {"source": str(src), "output": str(dst), "family": view.family, "config": cfg,
              "renamed": {k: v for k, v in renamed.items() if k != v}, "tensors": len(renamed),
              "probe_tokens": int(_probe_ids(cfg["vocab_size"]).shape[1])}
    return _write_checked(dst, sd, cfg, src_dir, expected, AutoModelForCausalLM, report, "logits")
