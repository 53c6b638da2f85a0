"""Small real files of every format taoke reads (written by each format's own writer), and seeded mutations of
them for the hostile-input tests: truncations, bit flips, and overwrites of header words with extreme values."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import gguf
import numpy as np
import onnx
import pandas as pd
import torch
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from safetensors.torch import save_file
from sklearn.datasets import load_iris

import taoke
from taoke.data.text import train_word_tokenizer

EXTREMES = [0, 1, 0x7F, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 31, 1 << 40, (1 << 63) - 1, (1 << 64) - 1]


def safetensors_file(d: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    save_file({"layer.weight": torch.randn(16, 8, generator=g), "layer.bias": torch.randn(16, generator=g).half(),
               "emb.weight": torch.randn(4, 8, generator=g).bfloat16(),
               "q.weight": torch.randint(-128, 127, (4, 4), generator=g, dtype=torch.int8)},
              str(d / "model.safetensors"), metadata={"format": "pt"})
    return d / "model.safetensors"


def torch_file(d: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    torch.save({"state_dict": {"w": torch.randn(8, 4, generator=g), "b": torch.randn(4, generator=g),
                               "q": torch.randint(-128, 127, (4, 4), generator=g, dtype=torch.int8)}}, d / "model.pt")
    return d / "model.pt"


def gguf_file(d: Path, name: str = "model.gguf") -> Path:
    """A small LLaMA-style GGUF written by gguf-py: metadata, a token list, F32/F16/Q8_0 tensors."""
    rng = np.random.default_rng(0)
    path = d / name
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_embedding_length(32)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_context_length(64)
    w.add_token_list([f"t{i}" for i in range(16)])
    w.add_tensor("token_embd.weight", rng.standard_normal((16, 32)).astype(np.float16))
    q = rng.standard_normal((32, 32)).astype(np.float32)
    w.add_tensor("blk.0.attn_q.weight", gguf.quants.quantize(q, gguf.GGMLQuantizationType.Q8_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.attn_k.weight", rng.standard_normal((32, 32)).astype(np.float32))
    w.add_tensor("output_norm.weight", rng.standard_normal(32).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def onnx_file(d: Path, external: bool = False) -> Path:
    """MatMul with a float weight and an int8 weight behind DequantizeLinear, as quantised exports hold them."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w")
    q = numpy_helper.from_array(rng.integers(-128, 127, (4, 4)).astype(np.int8), "q_quantized")
    s = numpy_helper.from_array(np.full(4, 0.02, np.float32), "q_scale")
    z = numpy_helper.from_array(np.zeros(4, np.int8), "q_zero_point")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="/layer/MatMul"),
             helper.make_node("DequantizeLinear", ["q_quantized", "q_scale", "q_zero_point"], ["q"], axis=1),
             helper.make_node("MatMul", ["h", "q"], ["y"], name="/out/MatMul")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w, q, s, z])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    path = d / "model.onnx"
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx.data", size_threshold=0)
    else:
        onnx.save_model(model, str(path))
    return path


def png_file(d: Path, name: str = "img.png") -> Path:

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (12, 12, 3)).astype(np.uint8)).save(d / name)
    return d / name


def csv_file(d: Path) -> Path:
    rows = ["text,label"] + [f"example number {i},{'ab'[i % 2]}" for i in range(20)]
    (d / "t.csv").write_text("\n".join(rows) + "\n")
    return d / "t.csv"


def jsonl_file(d: Path) -> Path:
    (d / "t.jsonl").write_text("".join(json.dumps({"text": f"example {i}", "label": "ab"[i % 2]}) + "\n"
                                       for i in range(20)))
    return d / "t.jsonl"


def parquet_file(d: Path) -> Path:

    pd.DataFrame({"text": [f"example {i}" for i in range(20)], "label": ["ab"[i % 2] for i in range(20)]}) \
        .to_parquet(d / "t.parquet")
    return d / "t.parquet"


def header_span(data: bytes, fmt: str) -> int:
    """How many leading bytes hold the structure (where mutations find parser bugs); the rest is tensor data."""
    if fmt == "safetensors" and len(data) >= 8:
        return 8 + struct.unpack("<Q", data[:8])[0]
    return min(len(data), 4096)


def mutate(data: bytes, rng: np.random.Generator, span: int) -> tuple[str, bytes]:
    """One seeded mutation: a truncation, a few bit flips, or an overwritten word; most of them in the header."""
    b = bytearray(data)
    where = lambda: int(rng.integers(0, span if rng.random() < 0.85 else len(b)))  # noqa: E731
    kind = rng.choice(["truncate", "flip", "word", "zero"])
    if kind == "truncate":
        n = int(rng.integers(0, len(b)))
        return f"truncate to {n}", bytes(b[:n])
    if kind == "flip":
        spots = [where() for _ in range(int(rng.integers(1, 9)))]
        for i in spots:
            b[i] ^= 1 << int(rng.integers(0, 8))
        return f"flip bits at {spots}", bytes(b)
    if kind == "zero":
        i = where()
        n = int(rng.integers(1, 64))
        b[i:i + n] = bytes(len(b[i:i + n]))
        return f"zero {n} bytes at {i}", bytes(b)
    size = int(rng.choice([1, 2, 4, 8]))
    i = where() // size * size
    value = int(rng.choice(EXTREMES)) & ((1 << (8 * size)) - 1)
    b[i:i + size] = value.to_bytes(size, "little")[: len(b[i:i + size])]
    return f"write {value:#x} ({size} bytes) at {i}", bytes(b)


def mutate_json(obj, rng: np.random.Generator):
    """A JSON document with one value replaced by a hostile one (huge/negative number, wrong type, deep nest)."""
    hostile = [10 ** 11, -1, 0, 2 ** 63, 1e308, float("nan"), "x", None, [], {}, [[[[[]]]]], True, "../" * 8 + "etc/passwd"]
    paths = []

    def walk(o, path):
        paths.append(path)
        if isinstance(o, dict):
            for k, v in o.items():
                walk(v, path + [k])
        elif isinstance(o, list):
            for i, v in enumerate(o[:8]):
                walk(v, path + [i])

    walk(obj, [])
    path = paths[int(rng.integers(1, len(paths)))] if len(paths) > 1 else []
    value = hostile[int(rng.integers(0, len(hostile)))]
    if not path:
        return value, f"document -> {value!r}"
    obj = json.loads(json.dumps(obj))
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    parent[path[-1]] = value
    return obj, f"{'.'.join(map(str, path))} -> {value!r}"


IRIS = {"name": "iris", "base": "scratch:mlp", "task": "tabular-classification", "data": {"train": "sklearn:iris"},
        "model": {"hidden": [16]}, "train": {"epochs": 2, "seed": 0}}


def iris_run(out: Path) -> Path:
    """A small complete run (MLP on scikit-learn's bundled iris), derived in this process in about a second."""
    taoke.derive(IRIS, out=out, quiet=True)
    return out


def iris_rows(d: Path) -> Path:
    """A CSV of iris feature rows, as `taoke predict --file` takes them."""
    bunch = load_iris()
    pd.DataFrame(bunch.data[:6], columns=bunch.feature_names).to_csv(d / "rows.csv", index=False)
    return d / "rows.csv"


def word_tokenizer(d: Path) -> Path:
    """A small real tokenizer.json (HF tokenizers word-level, as taoke trains for scratch text models) in d."""
    tok = train_word_tokenizer([f"word{i} example text number {i}" for i in range(40)], 200)
    tok.save_pretrained(d)
    return d / "tokenizer.json"
