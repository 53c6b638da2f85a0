"""PyTorch checkpoint reader (.bin/.pt/.pth): torch.load(weights_only=True, mmap=True), never full unpickling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from taoke.errors import FormatError
from taoke.formats.base import TensorMeta, WeightReader


_MAX_DEPTH = 16   # state dicts nest a few levels (state_dict, module, ...); a deeper file is not a checkpoint


def _flatten(obj, prefix: str = "", depth: int = 0) -> dict:
    out = {}
    if isinstance(obj, torch.Tensor):
        out[prefix.rstrip(".")] = obj
    elif isinstance(obj, dict):
        if depth > _MAX_DEPTH:
            raise ValueError(f"dicts nested deeper than {_MAX_DEPTH} levels")
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}.", depth + 1))
    return out


class TorchReader(WeightReader):
    format = "torch"

    def __init__(self, files: list[Path]):
        super().__init__(files[0])
        self._tensors: dict[str, torch.Tensor] = {}
        for f in files:
            try:
                # mmap keeps tensors on disk until read; weights_only refuses arbitrary pickled code.
                state = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
                if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                    state = state["state_dict"]
                tensors = _flatten(state)
            except MemoryError:
                raise
            except Exception as e:  # noqa: BLE001 - torch reports bad zips, pickles and storages with many types
                first = (str(e).splitlines() or [""])[0]
                raise FormatError(f"{f}: cannot be read as a weights-only PyTorch checkpoint ({e.__class__.__name__}: "
                                  f"{first[:200]}). taoke never unpickles arbitrary objects.") from None
            for name, t in tensors.items():
                if t.is_floating_point() or t.dtype in (torch.int8, torch.uint8):
                    self._tensors[name] = t
                    self._meta[name] = TensorMeta(name, tuple(t.shape), str(t.dtype).replace("torch.", ""))

    def _read(self, name: str) -> np.ndarray:
        return self._tensors[name].float().numpy()

    def close(self) -> None:
        self._tensors.clear()
