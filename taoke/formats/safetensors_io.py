"""safetensors reader: one file or a sharded HF directory (model.safetensors.index.json).

Tensors are read with plain file reads at the header's offsets into a fresh buffer, not through a memory map:
pages of a mapping that were read stay in the process's RSS until unmapped, so streaming a multi-GB model through
mmap grows RSS with the model. With reads, the bytes pass through the page cache (the kernel's, reclaimable) and
the process holds one tensor at a time. The format is an 8-byte little-endian header length, a JSON header
(name -> dtype, shape, data_offsets relative to the end of the header), then the raw little-endian data.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import torch

from taoke.errors import FormatError
from taoke.files import atomic_path
from taoke.formats.base import TensorMeta, WeightReader
from taoke.formats.hf_dir import index_shards

_NOT_WEIGHTS = {"I64", "I32", "I16", "BOOL", "U64", "U32", "U16"}
_MAX_HEADER = 100 * 2**20   # the format's own limit on the JSON header (safetensors rejects larger ones)
# bytes per element of every dtype the format defines (what a header entry's data_offsets must span)
_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
             "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}


def _torch_dtype(name: str):
    """Storage dtype name -> torch dtype (torch knows bf16 and fp8, numpy does not); None when unsupported."""
    table = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I8": torch.int8, "U8": torch.uint8, "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
             "F8_E5M2": getattr(torch, "float8_e5m2", None)}
    return table.get(name)


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_entry(f: Path, name: str, e, data_size: int) -> tuple[int, int]:
    """(begin, end) of a header entry after checking its types, its shape against its byte span, and that the
    span lies inside the data section."""
    if not isinstance(e, dict):
        raise FormatError(f"{f}: header entry {name[:80]!r} is a {type(e).__name__}, not an object")
    dtype, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
    if not isinstance(dtype, str):
        raise FormatError(f"{f}: tensor {name[:80]!r} has no dtype string (got {str(dtype)[:40]!r})")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise FormatError(f"{f}: tensor {name[:80]!r} has shape {str(shape)[:80]}; a shape is a list of "
                          "non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1] <= data_size):
        raise FormatError(f"{f}: tensor {name[:80]!r} lies outside the file (data_offsets {str(offsets)[:80]}, "
                          f"data section of {data_size} bytes)")
    size = _ITEMSIZE.get(dtype)
    if size is not None:
        need = math.prod(shape) * size   # Python ints: no overflow, whatever the header claims
        if need != offsets[1] - offsets[0]:
            raise FormatError(f"{f}: tensor {name[:80]!r} of shape {shape} {dtype} needs {need} bytes, the header "
                              f"gives {offsets[1] - offsets[0]}")
    return offsets[0], offsets[1]


def read_header(f: Path) -> tuple[int, dict]:
    """(offset of the data section, header entries without __metadata__), every entry checked against the file:
    types, shapes that match their byte spans, spans inside the file and not overlapping. FormatError otherwise."""
    try:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise FormatError(f"{f}: too short to be a safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):
                # the length itself is not shown: from a file that is not safetensors it is 8 of its bytes
                raise FormatError(f"{f}: not a safetensors file (its header length field exceeds the file's "
                                  f"{size} bytes or the format's 100 MB limit)")
            raw = fh.read(n)
    except OSError as e:
        raise FormatError(f"{f}: cannot be read ({e.strerror or e})") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise FormatError(f"{f}: safetensors header is not valid JSON ({str(e)[:120]})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{f}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    spans = sorted((*_check_entry(f, name, e, size - 8 - n), name) for name, e in header.items())
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
        if begin < end:
            raise FormatError(f"{f}: tensors {a[:80]!r} and {b[:80]!r} overlap in the file")
    return 8 + n, header


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
                self._meta[name] = TensorMeta(name, tuple(e["shape"]), str(e["dtype"]))
                self._where[name] = (Path(f), start + begin, end - begin)

    @classmethod
    def from_dir(cls, d: Path) -> "SafetensorsReader":
        """The shards the index names (each inside `d`), else every .safetensors file in `d`."""
        shards = index_shards(d)
        return cls(shards if shards is not None else sorted(d.glob("*.safetensors")))

    def _read(self, name: str) -> np.ndarray:
        f, offset, length = self._where[name]
        meta = self._meta[name]
        dtype = _torch_dtype(meta.dtype)
        if dtype is None:
            raise FormatError(f"{f}: tensor {name!r} has unsupported dtype {meta.dtype[:20]!r}")
        buf = np.empty(length, dtype=np.uint8)   # uninitialised: readinto fills every byte; length <= file size
        try:
            with open(f, "rb") as fh:
                fh.seek(offset)
                got = fh.readinto(buf)
        except OSError as e:
            raise FormatError(f"{f}: cannot be read ({e.strerror or e})") from None
        if got != length:
            raise FormatError(f"{f}: tensor {name!r} is truncated (the file changed after it was opened)")
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
