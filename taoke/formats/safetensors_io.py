"""safetensors reader: one file or a sharded HF directory (model.safetensors.index.json); mmap via safe_open."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import safe_open

from taoke.formats.base import TensorMeta, WeightReader


_NOT_WEIGHTS = {"I64", "I32", "I16", "BOOL", "U64", "U32", "U16"}


class SafetensorsReader(WeightReader):
    format = "safetensors"

    def __init__(self, files: list[Path]):
        super().__init__(files[0])
        self._where: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        for f in files:
            h = self._open(f)
            for name in h.keys():
                sl = h.get_slice(name)
                if sl.get_dtype() in _NOT_WEIGHTS:  # position ids, masks: integer buffers, not weights
                    continue
                self._meta[name] = TensorMeta(name, tuple(sl.get_shape()), str(sl.get_dtype()))
                self._where[name] = f

    @classmethod
    def from_dir(cls, d: Path) -> "SafetensorsReader":
        index = d / "model.safetensors.index.json"
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return cls([d / s for s in shards])
        return cls(sorted(d.glob("*.safetensors")))

    def _open(self, f: Path):
        if f not in self._handles:
            # framework="pt": numpy has no bfloat16, torch converts it losslessly to float32.
            self._handles[f] = safe_open(str(f), framework="pt")
        return self._handles[f]

    def _read(self, name: str) -> np.ndarray:
        t = self._open(self._where[name]).get_tensor(name)
        return t.float().numpy()

    def close(self) -> None:
        self._handles.clear()
