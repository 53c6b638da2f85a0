"""The GGUF writer against the real consumers: gguf-py's reader, transformers' GGUF loader and llama.cpp
(node-llama-cpp). A tiny LLaMA with SmolLM2's tokenizer (plus added tokens) keeps it fast."""

from pathlib import Path

import numpy as np
import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM

from taoke.errors import ModelError
from taoke.ship.gguf import bpe_pre_name, permute_qk, write_gguf
from taoke.ship.llamacpp import REPO_MODULES, cpu_features, run_llamacpp
from taoke.formats.gguf_io import unpermute_qk
from tests.lm_helpers import smollm_tokenizer, tiny_llama

needs_llama = pytest.mark.skipif(not (REPO_MODULES / "node-llama-cpp" / "package.json").is_file(),
                                 reason="node-llama-cpp not installed (make llama)")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny LLaMA whose tokenizer gained two whole-word tokens (as expand_vocab adds them), saved as a run would."""
    d = tmp_path_factory.mktemp("tiny")
    tok = smollm_tokenizer()
    tok.add_tokens(["你好", "taokeword"])
    model = tiny_llama(vocab=len(tok) + 6)   # padded rows without a token, as resized embeddings often have
    tok.save_pretrained(d)
    return model, tok, d


def test_qk_permutation_is_undone_by_the_reader():
    w = torch.randn(4 * 16, 8)
    assert torch.equal(torch.from_numpy(unpermute_qk(permute_qk(w, 4).numpy(), 4)), w)


def test_pre_tokenizer_names():
    assert bpe_pre_name({"model": {"type": "BPE"}, "pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}) == "gpt-2"
    seq = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                 {"type": "ByteLevel", "use_regex": True}]}
    assert bpe_pre_name({"model": {"type": "BPE"}, "pre_tokenizer": seq}) == "smollm"
    with pytest.raises(ModelError, match="byte-level BPE"):
        bpe_pre_name({"model": {"type": "Unigram"}})
    with pytest.raises(ModelError, match="no known llama.cpp"):
        bpe_pre_name({"model": {"type": "BPE"}, "pre_tokenizer": {"type": "Whitespace"}})


@pytest.mark.slow  # transformers rebuilds the 49k-token tokenizer from the file: ~25 s
def test_f32_file_reads_back_in_transformers_with_the_same_logits(tiny, tmp_path):
    model, tok, d = tiny
    path = tmp_path / "m.gguf"
    counts = write_gguf(model, tok, d, path, "F32", name="tiny")
    assert counts == {"F32": sum(1 for _ in model.state_dict()) - 1}   # tied head not written
    r = gguf.GGUFReader(str(path))
    types = r.fields["tokenizer.ggml.token_type"].contents()
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    assert tokens[tok.convert_tokens_to_ids("你好")] == "你好" and types[tok.convert_tokens_to_ids("你好")] == 4
    assert types[tok.convert_tokens_to_ids("<|im_end|>")] == 3 and tokens[-1] == f"[PAD{len(tokens) - 1}]"
    assert r.fields["tokenizer.chat_template"].contents() == tok.chat_template
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    ids = torch.tensor([tok("Hello there, 你好 taokeword 2024")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4)


def test_low_bit_files_keep_norms_f32_and_the_embedding_q8(tiny, tmp_path):
    model, tok, d = tiny
    counts = write_gguf(model, tok, d, tmp_path / "q.gguf", "Q4_0", name="tiny")
    r = gguf.GGUFReader(str(tmp_path / "q.gguf"))
    kinds = {t.name: t.tensor_type.name for t in r.tensors}
    assert kinds["token_embd.weight"] == "Q8_0" and kinds["blk.0.attn_norm.weight"] == "F32"
    assert kinds["blk.0.ffn_up.weight"] == "Q4_0" and counts["Q4_0"] > 0


@needs_llama
def test_llama_cpp_tokenizes_and_continues_like_the_model(tiny, tmp_path):
    model, tok, d = tiny
    path = tmp_path / "m.gguf"
    write_gguf(model, tok, d, path, "F32", name="tiny")
    texts = ["Hello there, 你好 taokeword 2024!",
             tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    ans = run_llamacpp(path, tokenize=texts, greedy=[{"ids": ids[0], "n": 8}],
                       nll=[{"ids": ids[0], "positions": list(range(len(ids[0]) - 1))}])
    assert ans["tokenize"] == ids
    x = torch.tensor([ids[0]])
    with torch.no_grad():
        ref = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False,
                             pad_token_id=2)[0, len(ids[0]):].tolist()
        logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), -1)
    assert ans["greedy"][0] == ref[:len(ans["greedy"][0])] and len(ans["greedy"][0]) >= 1
    want = logp[torch.arange(len(ids[0]) - 1), x[0, 1:]]
    assert torch.allclose(torch.tensor(ans["nll"][0], dtype=torch.float32), want, atol=1e-2)  # llama.cpp keeps an f16 KV cache
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").is_file() else set()
    if "sse3" in flags or "pni" in flags:   # an x86 machine: the kernels llama.cpp picked match what the CPU has
        assert ("AVX2" in cpu_features(ans["system_info"])) == ("avx2" in flags), ans["system_info"]
        assert ("AVX512" in cpu_features(ans["system_info"])) == ("avx512f" in flags), ans["system_info"]


def test_cpu_features_are_read_from_llama_cpp_system_info():
    info = "CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 0 | LLAMAFILE = 1 | REPACK = 1 | "
    assert cpu_features(info) == ["SSE3", "AVX2", "LLAMAFILE", "REPACK"]
    assert cpu_features(None) == []


@needs_llama
def test_llama_cpp_generates_past_an_end_of_turn_only_when_asked(tmp_path):
    """The export check stops at an end of turn; the speed bench asks for exactly n tokens (ignore_eog), so both
    engines do the same work. A model built by hand to answer <|im_end|> after anything shows both."""
    tok = smollm_tokenizer()
    end = tok.convert_tokens_to_ids("<|im_end|>")
    model = tiny_llama(vocab=len(tok), tie=False)
    with torch.no_grad():   # constant embeddings, layers that add nothing: the final norm gives all-ones states,
        model.model.embed_tokens.weight.fill_(0.5)   # so only <|im_end|>'s head row (ones) scores above zero
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[end] = 1.0
    tok.save_pretrained(tmp_path)
    path = tmp_path / "m.gguf"
    write_gguf(model, tok, tmp_path, path, "F32", name="tiny")
    ids = tok("Hello there", add_special_tokens=False)["input_ids"]
    ans = run_llamacpp(path, greedy=[{"ids": ids, "n": 5}, {"ids": ids, "n": 5, "ignore_eog": True}])
    assert ans["greedy"] == [[], [end] * 5] and ans["generated_tokens"] == 5


def test_exporting_at_the_grid_of_a_quantised_base_is_flagged_and_would_undo_the_fine_tune(tmp_path):
    """gguf-py's own quantizer shows the premise: weights on a Q4_1 grid plus a small update requantise to exactly
    the base; the note fires for the types whose grid holds the base's and for no other."""
    from gguf.quants import dequantize, quantize

    from taoke.ship.gguf import same_grid_note, stored_quant

    rng = np.random.default_rng(0)
    Q = gguf.GGMLQuantizationType
    base_w = np.asarray(dequantize(quantize(rng.standard_normal((64, 256)).astype(np.float32), Q.Q4_1), Q.Q4_1),
                        dtype=np.float32).reshape(64, 256)
    update = 0.002 * rng.standard_normal(base_w.shape).astype(np.float32)   # a LoRA-sized change
    again = np.asarray(dequantize(quantize(base_w + update, Q.Q4_1), Q.Q4_1)).reshape(base_w.shape)
    assert ((again - base_w) * update).sum() / (update * update).sum() < 0.3   # most of the update rounds away ...
    assert np.linalg.norm(again - base_w) < 2 * np.linalg.norm(update)         # ... back onto the base's points
    path = tmp_path / "base.gguf"
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_tensor("blk.0.ffn_up.weight", quantize(base_w, Q.Q4_1), raw_dtype=Q.Q4_1)
    w.add_tensor("blk.0.attn_norm.weight", np.ones(64, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert stored_quant(path) == "Q4_1"
    base = {"name": "tiny", "format": "gguf", "weights": [{"path": str(path)}]}
    assert "stored at Q4_1" in same_grid_note(base, "Q4_1") and "Q4_0" in same_grid_note(base, "Q4_1")
    assert same_grid_note(base, "Q5_1") is not None
    assert same_grid_note(base, "Q4_0") is None and same_grid_note(base, "Q8_0") is None
    assert same_grid_note({**base, "format": "safetensors"}, "Q4_1") is None


def test_the_grid_warning_looks_past_runs_to_the_gguf_the_weights_were_first_read_from(tmp_path):
    """A run derived from a run derived from a GGUF base: the export looks up the chain (run lineage records) to the
    GGUF, and a chain that loops ends instead of hanging."""
    import json

    from taoke.run import base_chain
    from taoke.ship.gguf import same_grid_note

    path = tmp_path / "base.gguf"
    w = gguf.GGUFWriter(path, arch="llama")
    q = gguf.quants.quantize(np.random.default_rng(1).standard_normal((8, 64)).astype(np.float32),
                             gguf.GGMLQuantizationType.Q4_1)
    w.add_tensor("blk.0.ffn_up.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q4_1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    gguf_base = {"name": "tiny", "format": "gguf", "weights": [{"path": str(path)}]}

    def run_on(base: dict, name: str) -> dict:
        (tmp_path / name / "model").mkdir(parents=True)
        (tmp_path / name / "lineage.json").write_text(json.dumps({"base": base}))
        return {"name": name, "format": "run", "run": {"dir": str(tmp_path / name)}}

    grandchild_base = run_on(run_on(gguf_base, "sft"), "sft-more")
    chain = base_chain(grandchild_base)
    assert [b["name"] for b in chain] == ["sft-more", "sft", "tiny"]
    assert same_grid_note(grandchild_base, "Q4_1") is None                      # the direct base is a run ...
    assert any(same_grid_note(b, "Q4_1") for b in chain)                        # ... whose root is a Q4_1 GGUF
    looped = tmp_path / "loop"
    (looped / "model").mkdir(parents=True)
    me = {"name": "loop", "format": "run", "run": {"dir": str(looped)}}
    (looped / "lineage.json").write_text(json.dumps({"base": me}))
    assert len(base_chain(me, limit=5)) == 5
