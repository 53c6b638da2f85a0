"""GGUF reader through gguf-py: dequantises each tensor on read and undoes llama.cpp's q/k row permutation.

llama.cpp's converter interleaves the rotary halves of q/k rows for LLaMA-style models; undoing it makes a GGUF
and the HF safetensors of the same model identical tensor for tensor.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import gguf
import numpy as np
from gguf.quants import dequantize

from taoke.formats.base import TensorMeta, WeightReader

# Architectures whose HF->GGUF conversion permutes q/k rows (convert_hf_to_gguf.py LlamaModel and subclasses).
PERMUTED_QK_ARCHS = {"llama", "mistral", "granite", "deci"}


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute` (same formula as transformers' gguf integration `_reverse_permute_weights`)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except Exception:  # malformed or exotic field types: metadata is best effort
        return default


def _fast_reader_class():
    class _PlainArrayReader(gguf.GGUFReader):
        # gguf-py slices a np.memmap thousands of times; memmap's per-slice bookkeeping makes opening a 100 MB
        # file take seconds. A plain ndarray view of the same mapping reads the same bytes without it.
        @property
        def data(self):
            return self._data

        @data.setter
        def data(self, value):
            self.mapping = getattr(value, "_mmap", None)   # the mmap.mmap behind np.memmap, for madvise
            self._data = value.view(np.ndarray)

    return _PlainArrayReader


class GGUFWeightReader(WeightReader):
    format = "gguf"

    def __init__(self, path: Path):
        super().__init__(path)
        self._reader = _fast_reader_class()(str(path))
        r = self._reader
        self.arch = str(_field(r, "general.architecture", "unknown"))
        a = self.arch
        self.config = {k: v for k, v in {
            "model_type": a,
            "hidden_size": _field(r, f"{a}.embedding_length"),
            "intermediate_size": _field(r, f"{a}.feed_forward_length"),
            "num_hidden_layers": _field(r, f"{a}.block_count"),
            "num_attention_heads": _field(r, f"{a}.attention.head_count"),
            "num_key_value_heads": _field(r, f"{a}.attention.head_count_kv"),
            "max_position_embeddings": _field(r, f"{a}.context_length"),
            "rms_norm_eps": _field(r, f"{a}.attention.layer_norm_rms_epsilon"),
            "rope_theta": _field(r, f"{a}.rope.freq_base"),
            "vocab_size": _field(r, f"{a}.vocab_size"),
            "bos_token_id": _field(r, "tokenizer.ggml.bos_token_id"),
            "eos_token_id": _field(r, "tokenizer.ggml.eos_token_id"),
        }.items() if v is not None}
        tokens = _field(r, "tokenizer.ggml.tokens")
        self.tokens = [str(t) for t in tokens] if tokens else None
        self._by_name = {}
        for t in r.tensors:
            shape = tuple(int(x) for x in reversed(t.shape.tolist()))
            self._by_name[t.name] = t
            self._meta[t.name] = TensorMeta(t.name, shape, t.tensor_type.name)
        if self.tokens and "vocab_size" not in self.config:
            self.config["vocab_size"] = len(self.tokens)
        self.config["tie_word_embeddings"] = "output.weight" not in self._meta

    def _read(self, name: str) -> np.ndarray:
        t = self._by_name[name]
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(self._meta[name].shape)
        if np.may_share_memory(w, t.data):  # float32 storage comes back as a view of the mapping
            w = w.copy()
        self._release(t.data)
        if self.arch in PERMUTED_QK_ARCHS and (".attn_q." in name or ".attn_k." in name):
            n_head = self.config.get("num_attention_heads")
            n_kv = self.config.get("num_key_value_heads", n_head)
            if n_head:
                w = unpermute_qk(w, n_head if ".attn_q." in name else n_kv)
        return w

    def _release(self, block: np.ndarray) -> None:
        """Unmap the pages of a tensor just read: touched pages of a mapping count in RSS until then, so a
        multi-GB file would grow RSS with the model. The file is mapped read-only; a later read faults them back."""
        mapping = getattr(self._reader, "mapping", None)
        if mapping is None or not hasattr(mapping, "madvise") or block.nbytes == 0 \
                or not np.may_share_memory(block, self._reader.data):
            return
        page = mmap.PAGESIZE
        start = block.__array_interface__["data"][0] - self._reader.data.__array_interface__["data"][0]
        first = start // page * page
        end = min(-(-(start + block.nbytes) // page) * page, len(mapping))
        mapping.madvise(mmap.MADV_DONTNEED, first, end - first)

    def close(self) -> None:
        self._by_name.clear()
