"""A LLaMA-family causal LM as a GGUF file, written with gguf-py the way llama.cpp's own converter
(convert_hf_to_gguf.py, LlamaModel) writes one: the same key/value metadata, tensor names (gguf-py's
TensorNameMap), q/k rows permuted into llama.cpp's rotary layout, a GPT-2-style BPE vocabulary with added
tokens typed CONTROL (special) or USER_DEFINED, merges, special token ids and the chat template
(gguf-py's SpecialVocab).

Quantisation uses gguf-py's quantizers. As in the converter, 1-D tensors and norms stay F32 and a tensor whose
rows do not split into whole quant blocks falls back to F16. For the 4/5-bit types, llama-quantize keeps the
output (or tied token embedding) at Q6_K, which gguf-py cannot write; taoke keeps it at Q8_0 instead.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf.quants import dequantize, quantize

from taoke.errors import FormatError, ModelError
from taoke.formats.gguf_io import GGUFWeightReader

Q = gguf.GGMLQuantizationType
# --quant name -> (tensor type of the 2-D weights, general.file_type)
QUANTS = {
    "F32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "F16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "BF16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "Q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "Q5_1": (Q.Q5_1, gguf.LlamaFileType.MOSTLY_Q5_1),
    "Q5_0": (Q.Q5_0, gguf.LlamaFileType.MOSTLY_Q5_0),
    "Q4_1": (Q.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1),
    "Q4_0": (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
LOW_BIT = {"Q4_0", "Q4_1", "Q5_0", "Q5_1"}
LLAMA_FAMILY = ("llama", "mistral")   # llama.cpp's converter writes both as arch "llama"

# llama.cpp's BPE pre-tokenizer names, by the HF pre-tokenizer they reproduce. llama.cpp's converter picks the
# name from a hash of a probe string's tokens; taoke reads the tokenizer.json configuration instead, and the
# export check then compares llama.cpp's tokenization with the HF tokenizer on the run's held-out text.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


def check_config(config) -> None:
    """Refuse, by name, what this writer cannot reproduce."""
    if config.model_type not in LLAMA_FAMILY:
        raise ModelError(f"GGUF export takes LLaMA-family causal LMs ({', '.join(LLAMA_FAMILY)}); this model is "
                         f"'{config.model_type}'.")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind not in ("default", "linear"):
        raise ModelError(f"GGUF export: rope scaling '{kind}' is not supported yet (default and linear are).")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ModelError("GGUF export: LLaMA variants with attention/MLP biases are not supported yet.")


def bpe_pre_name(tokenizer_json: dict) -> str:
    """llama.cpp's pre-tokenizer name for an HF byte-level BPE tokenizer; ModelError for anything else."""
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ModelError("GGUF export: only byte-level BPE tokenizers (GPT-2 / SmolLM / Llama-3 style) are "
                         f"supported; this one is {model.get('type')} with byte_fallback={model.get('byte_fallback')}.")
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and (parts[0].get("pattern") or {}).get("Regex") == LLAMA3_SPLIT:
        return "llama-bpe"
    raise ModelError(f"GGUF export: the tokenizer's pre-tokenizer ({json.dumps(pre)[:200]}) has no known llama.cpp "
                     "counterpart; supported: GPT-2 byte-level, SmolLM digits + byte-level, Llama-3 split.")


def looks_special(token: str) -> bool:
    """Added tokens that are control tokens even when not flagged special (llama.cpp's converter rule)."""
    return token in ("<pad>", "<mask>") or (token.startswith("<|") and token.endswith("|>")) or \
        (token.startswith("<unused") and token.endswith(">"))


def vocabulary(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and llama.cpp token types for every embedding row (rows without a token are [PAD<i>])."""
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    if max(by_id) >= vocab_size:
        raise ModelError(f"GGUF export: the tokenizer has id {max(by_id)} but the embedding only {vocab_size} rows.")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = by_id[i]
        if i in added:
            if not added[i].normalized:  # llama.cpp expects added tokens pre-normalised
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if added[i].special or looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotate-half q/k rows -> llama.cpp's interleaved pairs (the converter's LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensor_type(gguf_name: str, shape: tuple[int, ...], quant: str) -> Q:
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight"):
        return Q.F32
    qtype = QUANTS[quant][0]
    if quant in LOW_BIT and gguf_name in ("output.weight", "token_embd.weight"):
        qtype = Q.Q8_0
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return qtype if shape[-1] % block == 0 else Q.F16


def stored_quant(path: Path) -> str | None:
    """The type most 2-D tensors of a GGUF file are stored in (header only; None when unreadable)."""
    try:
        reader = GGUFWeightReader(path)
    except FormatError:
        return None
    kinds = Counter(t.dtype for t in reader.tensors() if len(t.shape) == 2)
    return kinds.most_common(1)[0][0] if kinds else None


# base's stored type -> export types whose grid holds every point of the base's grid (a 5-bit step is half the
# 4-bit step of the same block scale, and the affine types share the block minimum)
GRID_HOLDS_BASE = {"Q4_0": {"Q4_0", "Q5_0"}, "Q4_1": {"Q4_1", "Q5_1"}, "Q5_0": {"Q5_0"}, "Q5_1": {"Q5_1"}}


def same_grid_note(base: dict | None, quant: str) -> str | None:
    """A warning when the run's base was itself read from a GGUF whose grid the export's type holds: quantising the
    derived weights puts them back on the base's own grid points, so every change smaller than half a step (most
    LoRA updates) rounds back to the base. Measured on SmolLM2-135M (a Q4_1 base), an SFT exported at Q4_1 kept 22%
    of its held-out perplexity gain over the base, at Q5_1 92%, at Q4_0 84% (bench/gguf_quant_error.py)."""
    if quant not in LOW_BIT or not base or base.get("format") != "gguf":
        return None
    for f in base.get("weights") or []:
        path = Path(f.get("path", ""))
        stored = stored_quant(path) if path.is_file() else None
        if quant in GRID_HOLDS_BASE.get(stored, ()):
            other = ", ".join(sorted(LOW_BIT - GRID_HOLDS_BASE[stored]))
            return (f"the base ({base.get('name')}) was read from a GGUF stored at {stored}, and {quant} rounds the "
                    "derived weights back onto that grid, undoing fine-tuning changes smaller than half a step; "
                    f"export at a type whose grid is not the base's ({other}, or Q8_0) instead.")
    return None


def _rope_theta(config) -> float:
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return float(theta)


def write_gguf(model, tokenizer, tokenizer_dir: Path, path: Path, quant: str, *, name: str,
               license: str | None = None, base: dict | None = None, on_tensor=None,
               q4_0_blocks: dict[str, np.ndarray] | None = None,
               replaced: dict[str, torch.Tensor] | None = None) -> dict:
    """Write `model` (a plain transformers LLaMA-family model) to `path`; returns {tensor type: count}.
    `q4_0_blocks` (HF tensor name -> Q4_0 bytes, rows in HF order) are written as given where the tensor's type is
    Q4_0, instead of gguf-py's rounding (GPTQ's codes: ship/gptq.py); `replaced` (HF name -> tensor) are written
    instead of the model's own (norm gains tuned to those codes: ship/norm_tweak.py)."""
    config = model.config
    check_config(config)
    tokenizer_json = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    pre = bpe_pre_name(tokenizer_json)
    vocab_rows = model.get_input_embeddings().weight.shape[0]
    tokens, types = vocabulary(tokenizer, vocab_rows)
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head

    w = gguf.GGUFWriter(path, arch="llama")
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    if license:
        w.add_license(license)
    if base and base.get("name"):
        w.add_base_model_count(1)
        w.add_base_model_name(0, str(base["name"]))
        if base.get("hub_id"):
            w.add_base_model_repo_url(0, f"https://huggingface.co/{base['hub_id']}")
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(_rope_theta(config))
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_file_type(QUANTS[quant][1])
    w.add_vocab_size(vocab_rows)
    w.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if (rope.get("rope_type") or rope.get("type")) == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=len(tokens))
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]   # what the HF tokenizer adds around text
    special.add_special_token = {"bos": bool(tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]),
                                 "eos": bool(tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id])}
    special.chat_template = tokenizer.chat_template or special.chat_template
    special.add_to_gguf(w, quiet=True)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    counts: dict[str, int] = {}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, t in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue   # llama.cpp reads the token embedding when output.weight is absent
        new = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ModelError(f"GGUF export: no llama.cpp name for tensor '{hf_name}'.")
        t = (replaced or {}).get(hf_name, t).detach().to("cpu", torch.float32)
        qtype = tensor_type(new, tuple(t.shape), quant)
        given = (q4_0_blocks or {}).get(hf_name) if qtype == Q.Q4_0 else None
        if given is not None:
            t = torch.from_numpy(given)   # whole rows of blocks: the q/k row permutation below applies to them too
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            t = permute_qk(t, n_head)
        elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            t = permute_qk(t, n_kv)
        data = t.numpy()
        w.add_tensor(new, data if given is not None else quantize(data, qtype), raw_dtype=qtype)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
        if on_tensor:
            on_tensor()
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    return counts


def stored_weights(model, quant: str, q4_0_blocks: dict[str, np.ndarray] | None = None) -> dict[str, torch.Tensor]:
    """Every 2-D weight of `model` as llama.cpp will multiply with it once write_gguf has stored it at `quant`
    (gguf-py's quantize then dequantize, or the given Q4_0 blocks), by HF name; F32 tensors are left out."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    out = {}
    for hf_name, t in model.state_dict().items():
        new = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        qtype = tensor_type(new or hf_name, tuple(t.shape), quant)
        if qtype == Q.F32:
            continue
        given = (q4_0_blocks or {}).get(hf_name) if qtype == Q.Q4_0 else None
        data = given if given is not None else quantize(t.detach().to("cpu", torch.float32).numpy(), qtype)
        out[hf_name] = torch.from_numpy(np.ascontiguousarray(dequantize(data, qtype))).reshape(t.shape)
    return out


def gguf_tensor_count(model) -> int:
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    return sum(1 for n in model.state_dict() if not (tied and n == "lm_head.weight"))

