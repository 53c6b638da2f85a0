"""Readers: safetensors (sharded), torch weights_only, GGUF (dequant + q/k un-permute), ONNX int8 + transposed."""

import json
import pickle

import numpy as np
import pytest
import torch

from taoke.errors import ModelError
from taoke.formats import open_weights
from taoke.formats.gguf_io import unpermute_qk
from bench import verify_models as suite
from tests.lineage_tiny import load, tiny_llama


@pytest.fixture(scope="module")
def tiny(module_tmp):
    return tiny_llama(module_tmp / "m", seed=0)


def test_unpermute_inverts_llama_cpp_permute():
    w = np.random.default_rng(0).standard_normal((8 * 16, 24)).astype(np.float32)
    n = 8  # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
    permuted = w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(unpermute_qk(permuted, n), w)


def test_safetensors_sharded_dir(tiny, tmp_path):
    from safetensors.numpy import save_file

    sd, cfg = load(tiny)
    names = sorted(sd)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for f, keys in shards.items():
        save_file({k: sd[k] for k in keys}, str(tmp_path / f))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: f for f, keys in shards.items() for k in keys}}))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    r = open_weights(str(tmp_path))
    assert sorted(r.names()) == names
    np.testing.assert_array_equal(r.get(names[-1]), sd[names[-1]])
    assert r.meta(names[0]).shape == sd[names[0]].shape


def test_torch_weights_only_reads_and_refuses_pickles(tiny, tmp_path):
    sd, _ = load(tiny)
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, tmp_path / "w.bin")
    r = open_weights(str(tmp_path / "w.bin"))
    np.testing.assert_array_equal(r.get("model.norm.weight"), sd["model.norm.weight"])

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(ModelError, match="weights-only"):
        open_weights(str(tmp_path / "evil.pt"))


def test_gguf_roundtrip_undoes_qk_permutation(tiny, tmp_path):
    sd, _ = load(tiny)
    path = suite.to_gguf(tmp_path, tiny, "tiny", qtype="Q8_0")
    r = open_weights(str(path))
    assert r.config["num_attention_heads"] == 4 and r.meta("blk.0.attn_q.weight").dtype == "Q8_0"
    for gname, hname in (("blk.1.attn_q.weight", "model.layers.1.self_attn.q_proj.weight"),
                         ("blk.1.attn_k.weight", "model.layers.1.self_attn.k_proj.weight"),
                         ("blk.1.ffn_down.weight", "model.layers.1.mlp.down_proj.weight")):
        got, want = r.get(gname), sd[hname]
        assert got.shape == want.shape
        assert np.abs(got - want).max() < 0.02 * np.abs(want).max()   # Q8_0 error, not a permutation


def test_onnx_int8_dequantised_and_transposed(tiny, tmp_path):
    sd, _ = load(tiny)
    path = suite.to_onnx_int8(tmp_path, tiny, "tiny-int8")
    r = open_weights(str(path))
    name = "model.layers.2.mlp.up_proj.weight"     # recovered from the node scope, not the anonymous initialiser
    assert name in r.names() and r.meta(name).dtype == "I8"
    w, want = r.get(name), sd[name]
    assert w.shape == want.shape == (256, 128)
    assert np.abs(w - want).max() <= np.abs(want).max(axis=1).max() / 127 * 0.51 + 1e-6


def test_real_gguf_unpermute_matches_transformers():
    """Our GGUF q/k un-permute gives what transformers' own GGUF integration gives on the real SmolLM2 file."""
    import gguf
    from gguf.quants import dequantize
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from taoke.library import resolve

    base = resolve("smollm2-135m")
    r = open_weights(base)
    proc = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    raw = {t.name: t for t in gguf.GGUFReader(str(base.path)).tensors}
    for name in ("blk.3.attn_q.weight", "blk.3.attn_k.weight"):
        t = raw[name]
        plain = dequantize(t.data, t.tensor_type).reshape(r.meta(name).shape)
        theirs = proc.process(plain, name).weights
        assert not np.array_equal(plain, theirs)
        np.testing.assert_array_equal(r.get(name), theirs)


def test_unknown_suffix_is_a_user_error(tmp_path):
    (tmp_path / "w.xyz").write_text("x")
    with pytest.raises(ModelError):
        open_weights(str(tmp_path / "w.xyz"))


def _gguf_py_view(path):
    """(metadata, [(name, shape, type, float32 values)]) of a GGUF file as gguf-py's own GGUFReader reads it."""
    import gguf
    from gguf.quants import dequantize

    r = gguf.GGUFReader(str(path))
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = [(t.name, tuple(reversed(t.shape.tolist())), t.tensor_type,
                np.asarray(dequantize(t.data, t.tensor_type), np.float32)) for t in r.tensors]
    return meta, tensors


def _assert_header_matches_gguf_py(path):
    from gguf.quants import dequantize

    from taoke.formats.gguf_header import read_header

    want_meta, want = _gguf_py_view(path)
    meta, got = read_header(path, np.fromfile(path, dtype=np.uint8))
    assert list(meta) == list(want_meta)
    for key, value in want_meta.items():
        got_value = meta[key]
        if key == "t.nested":   # gguf-py's contents() flattens nested arrays; the parser keeps their structure
            assert got_value == [[1, 2], [3]]
            got_value = [x for inner in got_value for x in inner]
        assert np.array_equal(np.asarray(got_value, dtype=object), np.asarray(value, dtype=object)), key
    assert [t.name for t in got] == [name for name, *_ in want]
    for t, (name, shape, qtype, values) in zip(got, want):
        assert (t.shape, t.qtype) == (shape, qtype), name
        np.testing.assert_array_equal(np.asarray(dequantize(t.data, t.qtype), np.float32).reshape(shape),
                                      values.reshape(shape))


def test_gguf_header_reads_what_gguf_py_reads_for_every_value_and_tensor_type(tmp_path):
    """taoke's one-pass header parser against gguf-py's GGUFReader on a file gguf-py's writer made: metadata of every
    value type (nested arrays too) and tensors of every type gguf-py can write."""
    import gguf
    from gguf.quants import quantize

    Q = gguf.GGMLQuantizationType
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(tmp_path / "all.gguf"), "llama")
    w.add_uint8("t.u8", 7)
    w.add_int16("t.i16", -3)
    w.add_uint32("t.u32", 1 << 31)
    w.add_int64("t.i64", -(1 << 40))
    w.add_uint64("t.u64", 1 << 63)
    w.add_float32("t.f32", 0.5)
    w.add_float64("t.f64", 1e-300)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo, 世界")
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.25, 1.5])
    w.add_array("t.strs", ["a", "", "ü"])
    w.add_array("t.nested", [[1, 2], [3]])
    w.add_token_list([f"tok{i}" for i in range(300)])
    for qtype in (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1):
        x = rng.standard_normal((3, 2, 64)).astype(np.float32) if qtype == Q.F32 else \
            rng.standard_normal((48, 64)).astype(np.float32)
        w.add_tensor(f"w.{qtype.name}", quantize(x, qtype), raw_dtype=qtype)
    w.add_tensor("norm", rng.standard_normal(64).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _assert_header_matches_gguf_py(tmp_path / "all.gguf")


def test_gguf_header_reads_the_real_smollm2_file_as_gguf_py_does():
    from taoke.library import resolve

    _assert_header_matches_gguf_py(resolve("smollm2-135m").path)
