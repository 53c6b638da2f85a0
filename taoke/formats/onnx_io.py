"""ONNX reader: float initialisers, int8/uint8 weights behind DequantizeLinear (scale, zero point), and MatMul
weights stored [in, out] (returned transposed to PyTorch's [out, in]). External data is read lazily, and only
from files inside the model's directory."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from taoke.errors import FormatError
from taoke.files import contained_path
from taoke.formats.base import TensorMeta, WeightReader


@dataclass
class _Source:
    init: str                      # initialiser holding the stored values
    transpose: bool = False
    scale: str | None = None       # DequantizeLinear inputs
    zero_point: str | None = None
    axis: int = 1


def _node_path_name(node_name: str) -> str | None:
    """'/model/layers.0/mlp/up_proj/MatMul' -> 'model.layers.0.mlp.up_proj.weight' (the torch exporter's scopes)."""
    parts = [p for p in node_name.split("/") if p]
    if len(parts) < 2:
        return None
    return ".".join(parts[:-1]) + ".weight"


class OnnxReader(WeightReader):
    format = "onnx"

    def __init__(self, path: Path):
        super().__init__(path)
        model = _load_model(Path(path))
        g = model.graph
        self._inits = {t.name: t for t in g.initializer}
        self._base_dir = str(Path(path).parent)
        for t in g.initializer:
            _check_initializer(Path(path), t)
        dq_out: dict[str, _Source] = {}
        hidden: set[str] = set()
        sources: dict[str, _Source] = {}
        order: list[str] = []
        for node in g.node:
            ins = list(node.input)
            if node.op_type == "DequantizeLinear" and ins and ins[0] in self._inits:
                missing = [i for i in ins[1:] if i and i not in self._inits]
                if missing:  # a dequantised weight needs its scale (and zero point) as initialisers
                    raise FormatError(f"{path}: DequantizeLinear of {ins[0][:80]!r} names {missing[0][:80]!r}, "
                                      "which is not an initialiser")
                axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
                dq_out[node.output[0]] = _Source(ins[0], scale=ins[1] if len(ins) > 1 else None,
                                                 zero_point=ins[2] if len(ins) > 2 and ins[2] else None, axis=axis)
                hidden.update(i for i in ins if i)
                continue
            if node.op_type == "MatMulInteger" and len(ins) > 1 and ins[1] in self._inits:
                # ONNX Runtime's dynamic quantisation: int8 weight W_quantized with W_scale / W_zero_point beside it
                stem = ins[1].removesuffix("_quantized")
                dq_out[ins[1]] = _Source(ins[1], scale=f"{stem}_scale" if f"{stem}_scale" in self._inits else None,
                                         zero_point=f"{stem}_zero_point" if f"{stem}_zero_point" in self._inits
                                         else None)
                hidden.update(i for i in ins[2:] if i)
            for pos, name in enumerate(ins):
                src = dq_out.get(name) or (_Source(name) if name in self._inits else None)
                if src is None or (src.scale is None and not self._inits[src.init].dims):
                    continue  # scalars (e.g. a quantisation scale fed to a Mul) are no weights and must not take a name
                trans = (node.op_type in ("MatMul", "MatMulInteger") and pos == 1) or (
                    node.op_type == "Gemm" and pos == 1 and not any(a.name == "transB" and a.i for a in node.attribute))
                src = _Source(src.init, trans, src.scale, src.zero_point, src.axis)
                key = name if name in self._inits else src.init
                if key.endswith("_quantized"):
                    key = key[: -len("_quantized")]
                if key.startswith("onnx::") and node.name:
                    key = _node_path_name(node.name) or key
                if key not in sources:
                    sources[key] = src
                    order.append(key)
        for name in self._inits:  # initialisers no node consumes as weights (unusual) still count
            if name not in hidden and name not in sources and not any(s.init == name for s in sources.values()):
                sources[name] = _Source(name)
                order.append(name)
        self._sources = {}
        for key in order:
            src = sources[key]
            t = self._inits[src.init]
            dtype = _np_dtype(Path(path), t)
            if not (np.issubdtype(dtype, np.floating) or src.scale is not None) or len(t.dims) == 0:
                continue
            shape = tuple(int(d) for d in t.dims)
            if src.transpose and len(shape) == 2:
                shape = shape[::-1]
            storage = "I8" if src.scale is not None and dtype == np.int8 else ("U8" if src.scale is not None else
                                                                            str(np.dtype(dtype)).upper())
            self._sources[key] = src
            self._meta[key] = TensorMeta(key, shape, storage)

    def _array(self, name: str) -> np.ndarray:
        try:
            return numpy_helper.to_array(self._inits[name], base_dir=self._base_dir)
        except (ValueError, TypeError, KeyError, OSError) as e:  # onnx's messages for inconsistent tensor data
            raise FormatError(f"{self.path}: initialiser {name[:80]!r} cannot be read ({str(e)[:120]})") from None

    def _read(self, name: str) -> np.ndarray:
        src = self._sources[name]
        w = self._array(src.init).astype(np.float32)
        if src.scale is not None:
            scale = self._array(src.scale).astype(np.float32)
            zp = self._array(src.zero_point).astype(np.float32) if src.zero_point else np.zeros_like(scale)
            try:
                if scale.ndim == 1 and scale.size > 1:  # per-axis quantisation
                    shape = [1] * w.ndim
                    shape[src.axis] = -1
                    scale, zp = scale.reshape(shape), zp.reshape(shape)
                w = (w - zp) * scale
            except (ValueError, IndexError) as e:
                raise FormatError(f"{self.path}: the scale of {name[:80]!r} does not fit its weight ({e})") from None
        return w.T if src.transpose and w.ndim == 2 else w

    def close(self) -> None:
        self._inits.clear()


def _load_model(path: Path) -> onnx.ModelProto:
    """The model proto without external data; FormatError for bytes that are not an ONNX model."""
    try:
        if path.stat().st_size == 0:
            raise FormatError(f"{path}: empty file, not an ONNX model")
        model = onnx.load(str(path), load_external_data=False)
    except OSError as e:
        raise FormatError(f"{path}: cannot be read ({e.strerror or e})") from None
    except (DecodeError, ValueError, RecursionError) as e:
        raise FormatError(f"{path}: not an ONNX model ({str(e)[:120]})") from None
    # protobuf parses many byte strings as *some* message: a model has an IR version and a graph with content
    if model.ir_version <= 0 or not model.HasField("graph") or not (model.graph.node or model.graph.initializer):
        raise FormatError(f"{path}: not an ONNX model (no IR version or an empty graph)")
    return model


def _np_dtype(path: Path, t) -> np.dtype:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
    except (KeyError, TypeError, ValueError):
        raise FormatError(f"{path}: initialiser {t.name[:80]!r} has unknown data type {t.data_type}") from None


def _check_initializer(path: Path, t) -> None:
    """Dims non-negative; external data inside the model's folder and within its file: checked before reading."""
    if any(d < 0 for d in t.dims):
        raise FormatError(f"{path}: initialiser {t.name[:80]!r} has negative dims {list(t.dims)}")
    if t.data_location != onnx.TensorProto.EXTERNAL:
        return
    info = {e.key: e.value for e in t.external_data}
    f = contained_path(path.parent, info.get("location"), path, f"external data of {t.name[:80]!r} at")
    try:
        offset, length = int(info.get("offset") or 0), info.get("length")
        length = int(length) if length is not None else None
    except ValueError:
        raise FormatError(f"{path}: external data of {t.name[:80]!r} has a non-numeric offset or length") from None
    if not f.is_file():
        raise FormatError(f"{path}: external data file {info['location']!r} of {t.name[:80]!r} is missing")
    size = f.stat().st_size
    itemsize = _np_dtype(path, t).itemsize
    need = math.prod(t.dims) * itemsize
    if offset < 0 or (length is not None and (length < 0 or offset + length > size)) or offset + need > size:
        raise FormatError(f"{path}: external data of {t.name[:80]!r} ({need} bytes at offset {offset}) lies outside "
                          f"{f.name} ({size} bytes)")
