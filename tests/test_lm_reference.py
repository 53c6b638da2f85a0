"""Merged LM shards against independent references: PEFT's own merge_and_unload, and the base edited by hand."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from taoke.edit.layers import drop_layers, expand_layers
from taoke.lm.merge import ParityError, save_merged
from taoke.lm.reference import check_against_edited_base, check_against_peft_merge, edited_base
from tests.lm_helpers import adapted, smollm_tokenizer, tiny_llama


def _trained_lora(model):
    model, _ = adapted(model, method="lora", r=4, alpha=8, dropout=0.0)
    torch.manual_seed(1)
    with torch.no_grad():  # stand-in for training: non-zero B so every adapter changes its weight
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


@pytest.fixture(scope="module")
def tok():
    return smollm_tokenizer()


def test_merged_shards_match_peft_and_the_hand_edited_base(tmp_path, tok):
    base = tiny_llama(vocab=len(tok))
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    model = tiny_llama(vocab=len(tok))
    edits = [{"op": "expand_layers", **expand_layers(model, [0], {})[0]},
             {"op": "drop_layers", **drop_layers(model, [0, 1], None, {})}]   # keep the original 0 and its copy
    model = _trained_lora(model)
    out = save_merged(model, tok, tmp_path / "m")
    peft = check_against_peft_merge(out, model)
    assert peft["tensors"] > 10 and peft["max_abs_diff"] < 1e-5
    hand = check_against_edited_base(out, model, base_state, edits)
    assert hand["tensors"] == peft["tensors"]
    # the hand-built reference really has the zeroed copy at position 1
    ref, _ = edited_base(base_state, edits)
    assert torch.equal(ref["model.layers.1.self_attn.q_proj.weight"], base_state["model.layers.0.self_attn.q_proj.weight"])
    assert not ref["model.layers.1.mlp.down_proj.weight"].any()


def test_a_wrong_saved_tensor_is_caught_by_both_references(tmp_path, tok):
    base = tiny_llama(vocab=len(tok))
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    model = _trained_lora(tiny_llama(vocab=len(tok)))
    out = save_merged(model, tok, tmp_path / "m")
    shard = out / "model.safetensors"
    state = load_file(shard)
    state["model.layers.1.self_attn.v_proj.weight"][0, 0] += 1e-2   # a bug a merge could make
    save_file(state, shard)
    with pytest.raises(ParityError, match="v_proj"):
        check_against_peft_merge(out, model)
    with pytest.raises(ParityError, match="v_proj"):
        check_against_edited_base(out, model, base_state, [])


def test_no_adapter_no_peft_reference(tmp_path, tok):
    model = tiny_llama(vocab=len(tok))
    assert check_against_peft_merge(save_merged(model, tok, tmp_path / "m"), model) is None
