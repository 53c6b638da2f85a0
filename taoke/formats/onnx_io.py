"""ONNX reader: float initialisers, quantised weights and MatMul weights stored [in, out] (returned transposed to
PyTorch's [out, in]). External data is read lazily, and only from files inside the model's directory.

A weight is what a MatMul/Gemm/Gather/norm reads, traced back through the constant steps that compute it from
initialisers (DequantizeLinear; Cast + Mul by a scale, minus a zero point; Transpose, Reshape, ...): those
chains are constant-folded by onnx's reference evaluator when the weight is read, so an int8 weight
dequantised inside the graph reads as the float matrix the MatMul multiplies by. ONNX Runtime's dynamic
quantisation (MatMulInteger, the scale applied after the product) is read from its naming. Weights whose names
say nothing (`val_12_q`, `onnx::MatMul_991`) are named from the node's scope when the exporter kept one, else
from the graph's block pattern (onnx_graph.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from taoke.errors import FormatError
from taoke.files import contained_path
from taoke.formats.base import TensorMeta, WeightReader
from taoke.formats.onnx_graph import Use, bare_name, graph_names, is_anonymous

# steps that compute a weight from constants (folded when the weight is read)
_FOLDABLE = {"Cast", "Mul", "Sub", "Add", "Div", "DequantizeLinear", "Transpose", "Reshape", "Unsqueeze", "Squeeze",
             "Identity", "Flatten", "CastLike"}
_PASS_THROUGH = {"Cast", "Add", "Identity", "CastLike"}   # steps between a norm and its readers (onnx_graph.py)
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


@dataclass
class _Source:
    init: str                      # initialiser holding the stored values (the largest one of a folded chain)
    transpose: bool = False
    scale: str | None = None       # ONNX Runtime's MatMulInteger scale / zero point (applied after the product)
    zero_point: str | None = None
    axis: int = 1
    chain: tuple = ()              # nodes computing the weight from initialisers, in graph order
    output: str | None = None      # the tensor the chain computes


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
        self._opsets = list(model.opset_import)
        self._base_dir = str(Path(path).parent)
        for t in g.initializer:
            _check_initializer(Path(path), t)
        if not all(isinstance(n, str) for node in g.node for n in (*node.input, *node.output, node.name)) or \
                not all(isinstance(n, str) for n in self._inits):
            raise FormatError(f"{path}: tensor or node names that are not text; the file is damaged")
        consts = set(self._inits)
        chains: dict[str, tuple] = {}     # folded tensor -> the nodes computing it
        mmi: dict[str, _Source] = {}      # MatMulInteger weights
        hidden: set[str] = set()          # initialisers consumed while folding (scales, zero points, shapes)
        sources: dict[str, _Source] = {}
        order: list[str] = []
        uses: list[Use] = []
        reads: dict[str, list[str]] = {}
        elementwise: dict[str, str] = {}
        for node in g.node:
            ins = list(node.input)
            real = [i for i in ins if i]
            for i in real:
                reads.setdefault(i, []).extend(node.output)
            if node.op_type == "Constant" and node.output:
                consts.add(node.output[0])
                chains[node.output[0]] = (node,)
                continue
            if node.op_type == "DequantizeLinear" and ins and ins[0] in self._inits:
                missing = [i for i in ins[1:] if i and i not in consts]
                if missing:  # a dequantised weight needs its scale (and zero point) as constants
                    raise FormatError(f"{path}: DequantizeLinear of {ins[0][:80]!r} names {missing[0][:80]!r}, "
                                      "which is not an initialiser")
            if node.op_type in _FOLDABLE and real and node.output and all(i in consts for i in real):
                chain = tuple({id(n): n for i in real for n in chains.get(i, ())}.values())   # protos do not hash
                chains[node.output[0]] = chain + (node,)
                consts.add(node.output[0])
                hidden.update(i for i in real if i in self._inits)
                continue
            non_const = [i for i in real if i not in consts]
            if node.op_type in _PASS_THROUGH and len(non_const) == 1 and node.output:
                elementwise[node.output[0]] = non_const[0]
            if node.op_type == "MatMulInteger" and len(ins) > 1 and ins[1] in self._inits:
                # ONNX Runtime's dynamic quantisation: int8 weight W_quantized with W_scale / W_zero_point beside it
                stem = ins[1].removesuffix("_quantized")
                mmi[ins[1]] = _Source(ins[1], scale=f"{stem}_scale" if f"{stem}_scale" in self._inits else None,
                                      zero_point=f"{stem}_zero_point" if f"{stem}_zero_point" in self._inits else None)
                hidden.update(i for i in ins[2:] if i)
            for pos, name in enumerate(ins):
                if not name:
                    continue
                src = self._folded(name, chains[name]) if name in chains else (
                    mmi.get(name) or (_Source(name) if name in self._inits else None))
                if src is None or not self._inits[src.init].dims or src.init in hidden and not src.chain:
                    continue  # scalars (e.g. a quantisation scale fed to a Mul) are no weights and must not take a name
                trans = (node.op_type in ("MatMul", "MatMulInteger") and pos == 1) or (
                    node.op_type == "Gemm" and pos == 1 and not any(a.name == "transB" and a.i for a in node.attribute))
                src = _Source(src.init, trans, src.scale, src.zero_point, src.axis, src.chain, src.output)
                key = bare_name(name if name in self._inits else src.init)
                if is_anonymous(key) and node.name:
                    key = _node_path_name(node.name) or key
                if key not in sources:
                    sources[key] = src
                    order.append(key)
                    data = next((i for j, i in enumerate(ins) if j != pos and i and i not in consts), None)
                    uses.append(Use(key, node.op_type, pos, data, node.output[0] if node.output else "",
                                    self._shape(src)))
        for name in self._inits:  # initialisers no node consumes as weights (unusual) still count
            if name not in hidden and name not in sources and not any(s.init == name for s in sources.values()):
                sources[name] = _Source(name)
                order.append(name)
        if any(is_anonymous(k) for k in order):   # names that say nothing: from the graph's block pattern
            renames = {k: v for k, v in graph_names(uses, reads, elementwise).items()
                       if is_anonymous(k) and v not in sources}
            sources = {renames.get(k, k): v for k, v in sources.items()}
            order = [renames.get(k, k) for k in order]
        self._sources = {}
        for key in order:
            src = sources[key]
            t = self._inits[src.init]
            dtype = _np_dtype(Path(path), t)
            quantised = src.scale is not None or (src.chain and not np.issubdtype(dtype, np.floating))
            if not (np.issubdtype(dtype, np.floating) or quantised) or len(t.dims) == 0:
                continue
            storage = ("I8" if dtype == np.int8 else "U8" if dtype == np.uint8 else str(np.dtype(dtype)).upper()) \
                if quantised else str(np.dtype(dtype)).upper()
            self._sources[key] = src
            self._meta[key] = TensorMeta(key, self._shape(src), storage)

    def _folded(self, name: str, chain: tuple) -> _Source:
        """A weight computed by constant steps: its largest initialiser is the stored weight."""
        inputs = [i for n in chain for i in n.input if i in self._inits]
        root = max(inputs, key=lambda i: math.prod(self._inits[i].dims)) if inputs else None
        if root is None:   # a Constant node's value, no initialiser behind it: nothing stored to read
            return None
        floating = np.issubdtype(_np_dtype(self.path, self._inits[root]), np.floating)
        to_float = any(n.op_type == "DequantizeLinear" or n.op_type == "Cast" and any(
            a.name == "to" and a.i in _FLOAT_TYPES for a in n.attribute) for n in chain)
        if not (floating or to_float):   # integer arithmetic on shapes or indices: no weight
            return None
        return _Source(root, chain=chain, output=name)

    def _shape(self, src: _Source) -> tuple[int, ...]:
        shape = tuple(int(d) for d in self._inits[src.init].dims)
        if src.chain:   # the chain may reshape or transpose the stored tensor: take the shape it computes
            shape = self._chain_shape(src) or shape
        return shape[::-1] if src.transpose and len(shape) == 2 else shape

    def _chain_shape(self, src: _Source) -> tuple[int, ...] | None:
        if not any(n.op_type in ("Transpose", "Reshape", "Unsqueeze", "Squeeze", "Flatten") for n in src.chain):
            return None   # elementwise steps keep the stored shape (scales broadcast over it)
        return tuple(self._evaluate(src).shape)

    def _evaluate(self, src: _Source) -> np.ndarray:
        """Run the chain on its initialisers with onnx's reference evaluator."""
        needed = list(dict.fromkeys(i for n in src.chain for i in n.input if i in self._inits))
        graph = helper.make_graph(list(src.chain), "weight", [], [onnx.ValueInfoProto(name=src.output)],
                                  initializer=[numpy_helper.from_array(self._array(i), i) for i in needed])
        try:
            out = ReferenceEvaluator(helper.make_model(graph, opset_imports=self._opsets)).run(None, {})[0]
        except Exception as e:  # noqa: BLE001 - any failure of a malformed chain names the file and the weight
            raise FormatError(f"{self.path}: the steps computing weight {src.output[:80]!r} cannot be evaluated "
                              f"({e.__class__.__name__}: {str(e)[:120]})") from None
        return np.asarray(out)

    def _array(self, name: str) -> np.ndarray:
        try:
            return numpy_helper.to_array(self._inits[name], base_dir=self._base_dir)
        except (ValueError, TypeError, KeyError, OSError) as e:  # onnx's messages for inconsistent tensor data
            raise FormatError(f"{self.path}: initialiser {name[:80]!r} cannot be read ({str(e)[:120]})") from None

    def _read(self, name: str) -> np.ndarray:
        src = self._sources[name]
        if src.chain:
            w = self._evaluate(src).astype(np.float32)
            return w.T if src.transpose and w.ndim == 2 else w
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
