"""Norm tweaking after GGUF quantisation: the weights it tunes against are the ones the written file holds (read back
with gguf-py's own reader), the tuned gains bring the quantised model's outputs closer to the original's on text
it did not tune on, and nothing but the gains changes."""

import copy
import json

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf.quants import dequantize

from taoke.ship.gguf import permute_qk, stored_weights, write_gguf
from taoke.ship.norm_tweak import norm_gains, tweak_norms
from tests.lm_helpers import smollm_tokenizer, tiny_llama


def alpaca_texts(start: int, n: int) -> list[str]:
    rows = json.load(open("data/chatterbot-lm/alpaca.json", encoding="utf-8"))[start:start + n]
    return [f"{r['instruction']}\n{r['output']}" for r in rows]


def kl_to(model, student, tok, texts) -> float:
    total = 0.0
    with torch.no_grad():
        for t in texts:
            ids = tok(t, return_tensors="pt")["input_ids"]
            p = F.log_softmax(model(input_ids=ids).logits, -1)[0]
            q = F.log_softmax(student(input_ids=ids).logits, -1)[0]
            total += float(F.kl_div(q, p, log_target=True, reduction="batchmean"))
    return total


def test_stored_weights_and_tuned_gains_are_what_the_file_holds(tmp_path):
    tok, model = smollm_tokenizer(), tiny_llama()
    tok.save_pretrained(tmp_path)
    stored = stored_weights(model, "Q4_0")
    gains = {n: p.detach() * 1.5 for n, p in norm_gains(model).items()}
    write_gguf(model, tok, tmp_path, tmp_path / "q.gguf", "Q4_0", name="tiny", replaced=gains)
    held = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "q.gguf")).tensors}
    heads = {"q_proj": model.config.num_attention_heads, "k_proj": model.config.num_key_value_heads}
    layer = "model.layers.1."
    for hf, name in [("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("mlp.down_proj", "ffn_down")]:
        t = held[f"blk.1.{name}.weight"]
        read = torch.from_numpy(np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32))
        want = stored[layer + hf + ".weight"]
        kind = hf.rsplit(".", 1)[-1]
        want = permute_qk(want, heads[kind]) if kind in heads else want
        assert torch.equal(read.reshape(want.shape), want), hf
    assert torch.equal(torch.from_numpy(np.array(held["blk.1.attn_norm.weight"].data)),
                       gains[layer + "input_layernorm.weight"])
    assert not any("norm" in k for k in stored)   # F32 tensors are the file's own, not a rounding


@pytest.mark.slow   # 60 s of tuning on SmolLM2; the stored-gains test beside it stays fast
def test_tuned_gains_bring_the_quantised_model_closer_on_held_out_text():
    """SmolLM2 rounded to Q4_0 (gguf-py's own quantizer), its gains tuned on 24 instructions, judged on 8 others."""
    from taoke.lm.load import load_causal_lm

    model, tok = load_causal_lm("smollm2-135m", device="cpu")
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stored = stored_weights(model, "Q4_0")
    batches = [{"input_ids": tok(t, return_tensors="pt")["input_ids"]} for t in alpaca_texts(0, 24)]
    gains = tweak_norms(model, stored, batches, epochs=2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())   # the teacher is untouched
    assert sorted(gains) == sorted(norm_gains(model)) and len(gains) == 2 * 30 + 1

    student = copy.deepcopy(model)
    student.load_state_dict(stored, strict=False)
    held = alpaca_texts(100, 8)
    plain = kl_to(model, student, tok, held)
    student.load_state_dict(gains, strict=False)
    tuned = kl_to(model, student, tok, held)
    assert tuned < 0.9 * plain, (plain, tuned)
