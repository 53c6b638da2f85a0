"""GGUF reader through gguf-py: dequantises each tensor on read and undoes llama.cpp's q/k row permutation.

llama.cpp's converter interleaves the rotary halves of q/k rows for LLaMA-style models; undoing it makes a GGUF
and the HF safetensors of the same model identical tensor for tensor.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

import gguf
import numpy as np
from gguf.quants import dequantize

from taoke.errors import FormatError
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


# Smallest encodings of a metadata entry (key length, type, 1-byte value) and of a tensor record (name length,
# dim count, type, offset): a header claiming more entries than the file could hold is refused before parsing.
_MIN_KV_BYTES = 8 + 4 + 1
_MIN_TENSOR_BYTES = 8 + 4 + 4 + 8
_MAX_DIMS = 4   # GGML_MAX_DIMS


def check_counts(path: Path) -> None:
    """Read the fixed GGUF preamble (magic, version, tensor count, kv count) and refuse counts the file cannot hold.

    Hand-read because gguf-py loops over the claimed counts itself; 24 bytes of preamble is all this reads."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:4] != b"GGUF":
        raise FormatError(f"{path}: not a GGUF file ({'too short' if len(head) < 24 else 'no GGUF magic'})")
    order = "<" if struct.unpack("<I", head[4:8])[0] & 0xFFFF else ">"   # big-endian files exist (s390x)
    _, n_tensors, n_kv = struct.unpack(order + "IQQ", head[4:24])
    if n_tensors * _MIN_TENSOR_BYTES + n_kv * _MIN_KV_BYTES > size - 24:
        raise FormatError(f"{path}: header claims {n_tensors} tensors and {n_kv} metadata entries; a file of "
                          f"{size} bytes cannot hold them")


def _int_field(value, name: str, path: Path) -> int | None:
    """A metadata value used for arithmetic must be a positive integer (metadata is read from an untrusted file)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) <= 0:
        raise FormatError(f"{path}: metadata '{name}' is {str(value)[:40]!r}; expected a positive integer")
    return int(value)


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
        path = Path(path)
        try:
            check_counts(path)
            self._reader = _fast_reader_class()(str(path))
        except FormatError:
            raise
        except OSError as e:
            raise FormatError(f"{path}: cannot be read ({e.strerror or e})") from None
        except MemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - gguf-py reports malformed bytes as Value/Index/Key/Unicode errors
            raise FormatError(f"{path}: malformed GGUF ({e.__class__.__name__}: {str(e)[:120]})") from None
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
        for key in ("num_attention_heads", "num_key_value_heads"):
            self.config[key] = _int_field(self.config.get(key), key, path)
        self.config = {k: v for k, v in self.config.items() if v is not None}
        tokens = _field(r, "tokenizer.ggml.tokens")
        self.tokens = [str(t) for t in tokens] if isinstance(tokens, list) and tokens else None
        self._by_name = {}
        size = path.stat().st_size
        for t in r.tensors:
            if len(t.shape) > _MAX_DIMS or t.data_offset + t.data.nbytes > size:
                raise FormatError(f"{path}: tensor {t.name[:80]!r} has {len(t.shape)} dims or lies outside the file")
            shape = tuple(int(x) for x in reversed(t.shape.tolist()))
            self._by_name[t.name] = t
            self._meta[t.name] = TensorMeta(t.name, shape, t.tensor_type.name)
        if self.tokens and "vocab_size" not in self.config:
            self.config["vocab_size"] = len(self.tokens)
        self.config["tie_word_embeddings"] = "output.weight" not in self._meta

    def _read(self, name: str) -> np.ndarray:
        t = self._by_name[name]
        try:
            w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(self._meta[name].shape)
        except (ValueError, NotImplementedError, TypeError) as e:
            raise FormatError(f"{self.path}: tensor {name[:80]!r} ({t.tensor_type.name}, shape "
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
