"""The one interface every weight reader honours: list tensors without loading, then read one at a time.

Tensors come back as float32 numpy arrays in PyTorch orientation ([out, in] for linear weights), whatever
the storage (bf16, GGUF quant blocks, ONNX int8 + scale, transposed MatMul weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np


@dataclass(frozen=True)
class TensorMeta:
    name: str
    shape: tuple[int, ...]       # PyTorch orientation, as `get` returns it
    dtype: str                   # storage type: F32, BF16, Q4_1, I8, ...

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def quantized(self) -> bool:
        return self.dtype.upper().startswith(("Q", "I8", "U8", "IQ", "INT", "UINT"))


class WeightReader:
    """Base class: subclasses fill `_meta` (name -> TensorMeta) and implement `_read`."""

    format = "unknown"

    def __init__(self, path: Path):
        self.path = Path(path)
        self._meta: dict[str, TensorMeta] = {}
        self.config: dict = {}              # HF-style config (from config.json or file metadata)
        self.tokens: list[str] | None = None  # vocabulary, token id -> string, when known

    def tensors(self) -> list[TensorMeta]:
        return list(self._meta.values())

    def names(self) -> list[str]:
        return list(self._meta)

    def meta(self, name: str) -> TensorMeta:
        return self._meta[name]

    def get(self, name: str) -> np.ndarray:
        if name not in self._meta:
            raise KeyError(name)
        return np.asarray(self._read(name), dtype=np.float32)

    def _read(self, name: str) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self._meta:
            yield name, self.get(name)

    def __len__(self) -> int:
        return len(self._meta)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def quantized(self) -> bool:
        """True when the large tensors are stored in a quantized type."""
        big = [m for m in self._meta.values() if len(m.shape) == 2]
        return bool(big) and sum(m.quantized for m in big) > len(big) / 2
