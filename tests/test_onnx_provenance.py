"""verify on ONNX files as the tools people use write them: torch.onnx.export of all-MiniLM-L6-v2, ONNX Runtime's
own quantize_dynamic of it (MatMulInteger), and an int8 file like the published one (int8 initialisers with
fp32 scales, dequantised inside the graph by Cast and Mul before each MatMul and Gather, every initialiser and
node anonymous). Each must be judged derived from the model it was exported from, and unrelated to another."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper
from transformers import AutoModel

from taoke.formats import open_weights
from taoke.library import resolve
from taoke.provenance.canonical import canonical_view
from taoke.provenance.verify import verify


class _Hidden(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


@pytest.fixture(scope="module")
def exports(module_tmp):
    root = module_tmp
    base = resolve("minilm-l6")
    model = AutoModel.from_pretrained(base.path).eval()
    ids = torch.tensor([[101, 7592, 2088, 102]])
    with torch.no_grad():   # before exporting: the exporter leaves the module in training mode (dropout on)
        want = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.numpy()
    fp32 = root / "minilm.onnx"
    torch.onnx.export(_Hidden(model).eval(), (ids, torch.ones_like(ids)), str(fp32), input_names=["input_ids", "attention_mask"],
                      output_names=["hidden"], dynamic_axes={"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}},
                      opset_version=17, dynamo=False)
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dynamic = root / "minilm-dynamic-int8.onnx"
    quantize_dynamic(str(fp32), str(dynamic), weight_type=QuantType.QInt8)
    anonymous = root / "minilm-int8-anonymous.onnx"
    cast_mul_int8(fp32, anonymous)
    return {"base": base, "fp32": fp32, "dynamic": dynamic, "anonymous": anonymous, "ids": ids, "want": want}


def cast_mul_int8(src, dst):
    """Every 2-D float weight as int8 + a per-row fp32 scale, dequantised by Cast and Mul in the graph; every
    initialiser renamed val_<n>[_q|_scale] and every node name dropped."""
    m = onnx.load(str(src))
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    renames, new_inits, new_nodes = {}, [], []
    for k, (name, t) in enumerate(inits.items()):
        w = numpy_helper.to_array(t)
        if w.ndim == 2 and w.dtype == np.float32:
            axis = 1 if name.startswith("onnx::MatMul") else 0   # MatMul weights are [in, out]: scale per out unit
            scale = np.abs(w).max(axis=1 - axis, keepdims=True) / 127.0
            q = np.clip(np.round(w / np.maximum(scale, 1e-12)), -127, 127).astype(np.int8)
            new_inits += [numpy_helper.from_array(q, f"val_{k}_q"), numpy_helper.from_array(scale.astype(np.float32),
                                                                                            f"val_{k}_scale")]
            new_nodes += [helper.make_node("Cast", [f"val_{k}_q"], [f"val_{k}_f"], to=onnx.TensorProto.FLOAT),
                          helper.make_node("Mul", [f"val_{k}_f", f"val_{k}_scale"], [f"val_{k}_deq"])]
            renames[name] = f"val_{k}_deq"
        else:
            renames[name] = f"val_{k}"
            new_inits.append(numpy_helper.from_array(w, f"val_{k}"))
    for node in g.node:
        node.name = ""
        for i, x in enumerate(node.input):
            if x in renames:
                node.input[i] = renames[x]
    del g.initializer[:]
    g.initializer.extend(new_inits)
    nodes = new_nodes + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    onnx.save(m, str(dst))


def run(path, ids):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input_ids": ids.numpy(), "attention_mask": np.ones_like(ids.numpy())})[0]


def test_the_exports_compute_the_model(exports):
    """The files are what they claim: ONNX Runtime runs them to the model's own output (int8: the hidden states
    point the same way)."""
    want = exports["want"][0]
    assert np.abs(run(exports["fp32"], exports["ids"])[0] - want).max() < 1e-4
    for key in ("dynamic", "anonymous"):
        got = run(exports[key], exports["ids"])[0]
        cos = (got * want).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
        assert cos.mean() > 0.9 and cos.min() > 0.8, (key, cos)   # ORT's dynamic int8 reaches ~0.87 on [SEP]


def test_roles_of_an_anonymous_int8_graph_come_from_its_structure(exports):
    reader = open_weights(str(exports["anonymous"]))
    view = canonical_view(reader)
    assert view.family == "bert" and len(view.layers) == 6 and not view.unknown[:0]
    layer = view.layers[3]
    assert {"attn_q", "attn_k", "attn_v", "attn_o", "ffn_up", "ffn_down", "attn_out_norm", "ffn_out_norm"} <= set(layer)
    # the weight read back is the dequantised matrix: within int8 rounding of the model's own query weight
    ref = AutoModel.from_pretrained(exports["base"].path).encoder.layer[3].attention.self.query.weight.detach().numpy()
    got = reader.get(layer["attn_q"].name)
    assert got.shape == ref.shape and np.abs(got - ref).max() < np.abs(ref).max() / 100
    assert reader.tensors()[0].dtype in ("I8", "FLOAT")


@pytest.mark.parametrize("key,relations", [("fp32", {"copy", "quantized"}), ("dynamic", {"quantized"}),
                                           ("anonymous", {"quantized"})])
def test_verify_says_each_export_derives_from_minilm(exports, key, relations):
    res = verify("minilm-l6", str(exports[key]))
    assert res.verdict == "derived" and res.relation in relations, (res.verdict, res.relation, res.p_value)
    assert len(res.layers) == 6


def test_an_unrelated_model_is_not_called_derived_from_the_int8_file(exports):
    res = verify("smollm2-135m", str(exports["anonymous"]))
    assert res.verdict in ("independent", "inconclusive")
