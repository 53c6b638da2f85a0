"""safetensors reader: one file or a sharded HF directory (model.safetensors.index.json).

Tensors are read with plain file reads at the header's offsets into a fresh buffer, not through a memory map:
pages of a mapping that were read stay in the process's RSS until unmapped, so streaming a multi-GB model through
mmap grows RSS with the model. With reads, the bytes pass through the page cache (the kernel's, reclaimable) and
the process holds one tensor at a time. The format is an 8-byte little-endian header length, a JSON header
(name -> dtype, shape, data_offsets relative to the end of the header), then the raw little-endian data.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch

from taoke.errors import ModelError
from taoke.files import atomic_path
from taoke.formats.base import TensorMeta, WeightReader

_NOT_WEIGHTS = {"I64", "I32", "I16", "BOOL", "U64", "U32", "U16"}
_MAX_HEADER = 100 * 2**20   # the format's own limit on the JSON header (safetensors rejects larger ones)


def _torch_dtype(name: str):
    """Storage dtype name -> torch dtype (torch knows bf16 and fp8, numpy does not); None when unsupported."""
    table = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I8": torch.int8, "U8": torch.uint8, "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
             "F8_E5M2": getattr(torch, "float8_e5m2", None)}
    return table.get(name)


def read_header(f: Path) -> tuple[int, dict]:
    """(offset of the data section, header entries without __metadata__). Raises ModelError when malformed."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ModelError(f"{f}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise ModelError(f"{f}: invalid safetensors header length {n}")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelError(f"{f}: safetensors header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise ModelError(f"{f}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    for name, e in header.items():
        begin, end = e.get("data_offsets", (0, -1))
        if not (0 <= begin <= end and 8 + n + end <= size):
            raise ModelError(f"{f}: tensor {name!r} lies outside the file (offsets {begin}..{end})")
    return 8 + n, header


def _check_size(f: Path, name: str, entry: dict, length: int) -> None:
    dtype = _torch_dtype(entry["dtype"])
    if dtype is None:
        return  # refused on read, with the dtype named
    numel = int(np.prod(entry["shape"], dtype=np.int64))
    if numel * dtype.itemsize != length:
        raise ModelError(f"{f}: tensor {name!r} of shape {entry['shape']} {entry['dtype']} needs "
                         f"{numel * dtype.itemsize} bytes, the header gives {length}")


class SafetensorsReader(WeightReader):
    format = "safetensors"

    def __init__(self, files: list[Path]):
        super().__init__(files[0])
        self._where: dict[str, tuple[Path, int, int]] = {}   # name -> (file, absolute offset, byte length)
        for f in files:
            start, header = read_header(Path(f))
            for name, e in sorted(header.items()):   # name order, as safetensors' own keys() gives
                if e["dtype"] in _NOT_WEIGHTS:  # position ids, masks: integer buffers, not weights
                    continue
                begin, end = e["data_offsets"]
                _check_size(Path(f), name, e, end - begin)
                self._meta[name] = TensorMeta(name, tuple(e["shape"]), str(e["dtype"]))
                self._where[name] = (Path(f), start + begin, end - begin)

    @classmethod
    def from_dir(cls, d: Path) -> "SafetensorsReader":
        index = d / "model.safetensors.index.json"
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return cls([d / s for s in shards])
        return cls(sorted(d.glob("*.safetensors")))

    def _read(self, name: str) -> np.ndarray:
        f, offset, length = self._where[name]
        meta = self._meta[name]
        dtype = _torch_dtype(meta.dtype)
        if dtype is None:
            raise ModelError(f"{f}: tensor {name!r} has unsupported dtype {meta.dtype}")
        buf = np.empty(length, dtype=np.uint8)   # uninitialised: readinto fills every byte
        with open(f, "rb") as fh:
            fh.seek(offset)
            if fh.readinto(buf) != length:
                raise ModelError(f"{f}: tensor {name!r} is truncated")
        t = torch.frombuffer(buf, dtype=dtype) if length else torch.empty(0, dtype=dtype)
        # float(): a no-op for F32 (the array shares `buf`), a widening copy for bf16/f16/int8.
        return t.reshape(meta.shape).float().numpy()


_DTYPE_NAME = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.float64): "F64",
               np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8"}


def save_streaming(path: Path, specs: list[tuple[str, tuple, np.dtype]], produce,
                   metadata: dict | None = None) -> None:
    """Write a safetensors file tensor by tensor: only one tensor is ever in memory.

    specs: (name, shape, numpy dtype) in file order; produce(name) returns that tensor. The header is written
    first from the shapes alone (padded to 8 bytes as the format asks), then each tensor's bytes in turn.
    """
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, shape, dtype in specs:
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _DTYPE_NAME[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:  # a failed write leaves no half-written file
        fh.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape, dtype in specs:
            t = np.ascontiguousarray(produce(name), dtype=dtype)
            if t.shape != tuple(shape):
                raise ValueError(f"{name}: produced shape {t.shape}, declared {tuple(shape)}")
            fh.write(t.reshape(-1).view(np.uint8))
