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
def tiny(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tiny") / "m", seed=0)


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
