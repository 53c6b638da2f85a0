"""ONNX reader: float initialisers, int8/uint8 weights behind DequantizeLinear (scale, zero point), and MatMul
weights stored [in, out] (returned transposed to PyTorch's [out, in]). External data is read lazily."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

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
        model = onnx.load(str(path), load_external_data=False)
        g = model.graph
        self._inits = {t.name: t for t in g.initializer}
        self._base_dir = str(Path(path).parent)
        dq_out: dict[str, _Source] = {}
        hidden: set[str] = set()
        sources: dict[str, _Source] = {}
        order: list[str] = []
        for node in g.node:
            ins = list(node.input)
            if node.op_type == "DequantizeLinear" and ins and ins[0] in self._inits:
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
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
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
        return numpy_helper.to_array(self._inits[name], base_dir=self._base_dir)

    def _read(self, name: str) -> np.ndarray:
        src = self._sources[name]
        w = self._array(src.init).astype(np.float32)
        if src.scale is not None:
            scale = self._array(src.scale).astype(np.float32)
            zp = self._array(src.zero_point).astype(np.float32) if src.zero_point else np.zeros_like(scale)
            if scale.ndim == 1 and scale.size > 1:  # per-axis quantisation
                shape = [1] * w.ndim
                shape[src.axis] = -1
                scale, zp = scale.reshape(shape), zp.reshape(shape)
            w = (w - zp) * scale
        return w.T if src.transpose and w.ndim == 2 else w

    def close(self) -> None:
        self._inits.clear()
