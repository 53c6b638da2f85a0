"""The header of a GGUF file (metadata and tensor records), parsed in one pass over its bytes.

Hand-parsed instead of with gguf-py's GGUFReader: the reader builds numpy views for every element of every
metadata array, ~100k of them for a 49k-token vocabulary and its merges, which took 1.5 s of a 3-5 s
`taoke verify`. The header is a flat, documented layout (ggml's docs/gguf.md, versions 2 and 3) read here with
`struct`; the value-type codes and quant block sizes come from gguf-py, which still decodes the tensors.
Every length and count is checked against the file's size before it is used: the file is untrusted.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import gguf
import numpy as np

from taoke.errors import FormatError

V = gguf.GGUFValueType
_SCALARS = {V.UINT8: "B", V.INT8: "b", V.UINT16: "H", V.INT16: "h", V.UINT32: "I", V.INT32: "i",
            V.FLOAT32: "f", V.BOOL: "?", V.UINT64: "Q", V.INT64: "q", V.FLOAT64: "d"}
_NUMPY = {V.UINT8: "u1", V.INT8: "i1", V.UINT16: "u2", V.INT16: "i2", V.UINT32: "u4", V.INT32: "i4",
          V.FLOAT32: "f4", V.BOOL: "?", V.UINT64: "u8", V.INT64: "i8", V.FLOAT64: "f8"}
MAX_DIMS = 4   # GGML_MAX_DIMS
# Smallest encodings of a metadata entry (key length, type, 1-byte value) and of a tensor record (name length,
# dim count, type, offset): a header claiming more entries than the file could hold is refused before parsing.
MIN_KV_BYTES = 8 + 4 + 1
MIN_TENSOR_BYTES = 8 + 4 + 4 + 8
MAX_NESTING = 8   # arrays of arrays: deeper than any writer makes, shallow enough for Python's stack


@dataclass
class TensorRecord:
    name: str
    shape: tuple[int, ...]          # row-major, as numpy and PyTorch see it (GGUF stores dims innermost first)
    qtype: gguf.GGMLQuantizationType
    data: np.ndarray                # the tensor's bytes: (rows, bytes per row) uint8, a view of the file
    byte_order: str = "<"


class _Cursor:
    def __init__(self, buf: memoryview, order: str, path):
        self.buf, self.order, self.path, self.at = buf, order, path, 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.at + n > len(self.buf):
            raise FormatError(f"{self.path}: truncated or malformed GGUF header: {what} at byte {self.at} runs past "
                              f"the end of the file ({len(self.buf)} bytes)")

    def scalar(self, fmt: str, what: str):
        size = struct.calcsize(fmt)
        self.need(size, what)
        value = struct.unpack_from(self.order + fmt, self.buf, self.at)[0]
        self.at += size
        return value

    def string(self, what: str) -> str:
        n = self.scalar("Q", what)
        self.need(n, what)
        raw = bytes(self.buf[self.at:self.at + n])
        self.at += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, what: str, depth: int = 0):
        if vtype == V.STRING:
            return self.string(what)
        if vtype == V.ARRAY:
            if depth >= MAX_NESTING:
                raise FormatError(f"{self.path}: malformed GGUF header: {what} nests arrays {depth} deep")
            item, count = self.scalar("I", what), self.scalar("Q", what)
            if item in _NUMPY:
                size = np.dtype(_NUMPY[item]).itemsize
                self.need(count * size, what)
                values = np.frombuffer(self.buf, dtype=np.dtype(_NUMPY[item]).newbyteorder(self.order), count=count,
                                       offset=self.at)
                self.at += count * size
                return values.tolist()
            self.need(count * 8, what)   # every string or nested array takes at least 8 bytes
            return [self.value(item, what, depth + 1) for _ in range(count)]
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], what)
        raise FormatError(f"{self.path}: malformed GGUF header: {what} has value type {vtype}, which GGUF does not "
                          "define")


def read_header(path, buf: np.ndarray) -> tuple[dict, list[TensorRecord]]:
    """(metadata key -> value, tensor records) of the GGUF file whose bytes are `buf` (uint8, e.g. a mapping)."""
    view = memoryview(buf)
    if len(view) < 24 or bytes(view[:4]) != b"GGUF":
        raise FormatError(f"{path}: not a GGUF file ({'too short' if len(view) < 24 else 'no GGUF magic'})")
    order = "<" if struct.unpack_from("<I", view, 4)[0] & 0xFFFF else ">"   # big-endian files exist (s390x)
    cur = _Cursor(view, order, path)
    cur.at = 4
    version = cur.scalar("I", "version")
    if version not in (2, 3):
        raise FormatError(f"{path}: GGUF version {version}; taoke reads versions 2 and 3")
    n_tensors, n_kv = cur.scalar("Q", "tensor count"), cur.scalar("Q", "metadata count")
    if n_tensors * MIN_TENSOR_BYTES + n_kv * MIN_KV_BYTES > len(view) - cur.at:
        raise FormatError(f"{path}: header claims {n_tensors} tensors and {n_kv} metadata entries; a file of "
                          f"{len(view)} bytes cannot hold them")
    meta = {}
    for _ in range(n_kv):
        key = cur.string("a metadata key")
        meta[key] = cur.value(cur.scalar("I", f"metadata '{key[:60]}'"), f"metadata '{key[:60]}'")
    infos, seen = [], set()
    for _ in range(n_tensors):
        name = cur.string("a tensor name")
        what = f"tensor '{name[:60]}'"
        if name in seen:
            raise FormatError(f"{path}: {what} is listed twice in the header; which one holds the weights is unknown")
        seen.add(name)
        n_dims = cur.scalar("I", what)
        if n_dims > MAX_DIMS:
            raise FormatError(f"{path}: {what} has {n_dims} dims; GGUF allows at most {MAX_DIMS}")
        dims = [cur.scalar("Q", what) for _ in range(n_dims)]
        code, offset = cur.scalar("I", what), cur.scalar("Q", what)
        try:
            qtype = gguf.GGMLQuantizationType(code)
            block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise FormatError(f"{path}: {what} has tensor type {code}, which this gguf-py does not know") from None
        infos.append((name, dims, qtype, offset, block, block_bytes))
    align = meta.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(align, int) or isinstance(align, bool) or align <= 0:
        raise FormatError(f"{path}: metadata 'general.alignment' is {str(align)[:40]!r}; expected a positive integer")
    start = -(-cur.at // align) * align
    tensors = []
    for name, dims, qtype, offset, block, block_bytes in infos:
        row = dims[0] if dims else 1
        rows = math.prod(dims[1:])
        if row % block:
            raise FormatError(f"{path}: tensor '{name[:60]}' has rows of {row} values, not whole {qtype.name} "
                              f"blocks of {block}")
        row_bytes = row // block * block_bytes
        begin, nbytes = start + offset, rows * row_bytes
        if begin + nbytes > len(view):
            raise FormatError(f"{path}: tensor '{name[:60]}' ({nbytes} bytes at {begin}) lies outside the file "
                              f"({len(view)} bytes)")
        data = buf[begin:begin + nbytes].reshape(rows, row_bytes)
        tensors.append(TensorRecord(name, tuple(int(d) for d in reversed(dims)), qtype, data, order))
    return meta, tensors
