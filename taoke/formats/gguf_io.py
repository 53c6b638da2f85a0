"""GGUF reader: the header parsed by gguf_header, each tensor dequantised by gguf-py on read, and llama.cpp's q/k
row permutation undone.

llama.cpp's converter interleaves the rotary halves of q/k rows for LLaMA-style models; undoing it makes a GGUF
and the HF safetensors of the same model identical tensor for tensor.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
from gguf.quants import dequantize

from taoke.errors import FormatError
from taoke.formats.base import TensorMeta, WeightReader
from taoke.formats.gguf_header import read_header

# Architectures whose HF->GGUF conversion permutes q/k rows (convert_hf_to_gguf.py LlamaModel and subclasses).
PERMUTED_QK_ARCHS = {"llama", "mistral", "granite", "deci"}
BIG_ENDIAN_FLOATS = {"F32": ">f4", "F16": ">f2"}


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute` (same formula as transformers' gguf integration `_reverse_permute_weights`)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _int_field(value, name: str, path: Path) -> int | None:
    """A metadata value used for arithmetic must be a positive integer (metadata is read from an untrusted file)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) <= 0:
        raise FormatError(f"{path}: metadata '{name}' is {str(value)[:40]!r}; expected a positive integer")
    return int(value)


class GGUFWeightReader(WeightReader):
    format = "gguf"

    def __init__(self, path: Path):
        super().__init__(path)
        path = Path(path)
        try:
            with open(path, "rb") as f:
                self._mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._bytes = np.frombuffer(self._mapping, dtype=np.uint8)
            meta, tensors = read_header(path, self._bytes)
        except FormatError:
            raise
        except OSError as e:
            raise FormatError(f"{path}: cannot be read ({e.strerror or e})") from None
        except ValueError:   # mmap refuses an empty file
            raise FormatError(f"{path}: not a GGUF file (too short)") from None
        self.arch = str(meta.get("general.architecture", "unknown"))
        a = self.arch
        self.config = {k: v for k, v in {
            "model_type": a,
            "hidden_size": meta.get(f"{a}.embedding_length"),
            "intermediate_size": meta.get(f"{a}.feed_forward_length"),
            "num_hidden_layers": meta.get(f"{a}.block_count"),
            "num_attention_heads": meta.get(f"{a}.attention.head_count"),
            "num_key_value_heads": meta.get(f"{a}.attention.head_count_kv"),
            "max_position_embeddings": meta.get(f"{a}.context_length"),
            "rms_norm_eps": meta.get(f"{a}.attention.layer_norm_rms_epsilon"),
            "rope_theta": meta.get(f"{a}.rope.freq_base"),
            "vocab_size": meta.get(f"{a}.vocab_size"),
            "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        }.items() if v is not None}
        for key in ("num_attention_heads", "num_key_value_heads"):
            self.config[key] = _int_field(self.config.get(key), key, path)
        self.config = {k: v for k, v in self.config.items() if v is not None}
        tokens = meta.get("tokenizer.ggml.tokens")
        self.tokens = [str(t) for t in tokens] if isinstance(tokens, list) and tokens else None
        self._by_name = {t.name: t for t in tensors}
        for t in tensors:
            self._meta[t.name] = TensorMeta(t.name, t.shape, t.qtype.name)
        if self.tokens and "vocab_size" not in self.config:
            self.config["vocab_size"] = len(self.tokens)
        self.config["tie_word_embeddings"] = "output.weight" not in self._meta

    def _read(self, name: str) -> np.ndarray:
        t = self._by_name[name]
        try:
            if t.byte_order == ">" and t.qtype.name in BIG_ENDIAN_FLOATS:   # gguf-py's dequantize assumes little
                w = t.data.view(BIG_ENDIAN_FLOATS[t.qtype.name]).astype(np.float32).reshape(self._meta[name].shape)
            else:
                w = np.asarray(dequantize(t.data, t.qtype), dtype=np.float32).reshape(self._meta[name].shape)
        except (ValueError, NotImplementedError, TypeError) as e:
            raise FormatError(f"{self.path}: tensor {name[:80]!r} ({t.qtype.name}, shape "
                              f"{self._meta[name].shape}) cannot be decoded ({str(e)[:100]})") from None
        if np.may_share_memory(w, t.data):  # float32 storage comes back as a view of the mapping
            w = w.copy()
        self._release(t.data)
        if self.arch in PERMUTED_QK_ARCHS and (".attn_q." in name or ".attn_k." in name):
            n_head = self.config.get("num_attention_heads")
            n = n_head if ".attn_q." in name else self.config.get("num_key_value_heads", n_head)
            if n:
                if w.ndim == 0 or w.shape[0] % (2 * n):
                    raise FormatError(f"{self.path}: tensor {name!r} has {w.shape[0] if w.ndim else 0} rows, which "
                                      f"{n} attention heads (from the metadata) do not divide")
                w = unpermute_qk(w, n)
        return w

    def _release(self, block: np.ndarray) -> None:
        """Unmap the pages of a tensor just read: touched pages of a mapping count in RSS until then, so a
        multi-GB file would grow RSS with the model. The file is mapped read-only; a later read faults them back."""
        mapping = self._mapping
        if not hasattr(mapping, "madvise") or block.nbytes == 0 or not np.may_share_memory(block, self._bytes):
            return
        page = mmap.PAGESIZE
        start = block.__array_interface__["data"][0] - self._bytes.__array_interface__["data"][0]
        first = start // page * page
        end = min(-(-(start + block.nbytes) // page) * page, len(mapping))
        mapping.madvise(mmap.MADV_DONTNEED, first, end - first)

    def close(self) -> None:
        self._by_name.clear()
