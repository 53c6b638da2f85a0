"""Structured width pruning: the saved model is really smaller, loads, and pruning units/heads that contribute
nothing leaves the outputs unchanged (the unpruned model is the reference)."""

import copy

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BertConfig

from taoke.edit.prune import kept_counts, prune
from taoke.errors import RecipeError
from taoke.models.task_model import HFClassifier
from taoke.models.widths import resize_bert_attention
from tests.lm_helpers import tiny_llama


def tiny_bert():
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     num_labels=3)
    torch.manual_seed(0)
    return HFClassifier(AutoModelForSequenceClassification.from_config(cfg)).eval()


def _silence_llama(model, units, group):
    """Zero the output side of some MLP units and of one KV group in every block: they contribute nothing."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, units] = 0
            r, d = 2, 16   # tiny_llama: 4 heads, 2 KV groups, head_dim 16
            layer.self_attn.o_proj.weight[:, group * r * d:(group + 1) * r * d] = 0


def test_llama_pruning_of_silent_units_keeps_logits_and_loads_in_plain_transformers(tmp_path):
    model = tiny_llama(vocab=300)
    _silence_llama(model, list(range(0, 128, 2)), group=1)
    ids = torch.randint(0, 300, (2, 12))
    before = model(input_ids=ids).logits
    rec = prune(model, mlp=0.5, heads=0.5, by="magnitude")
    assert rec["mlp_units"] == [128, 64] and rec["kv_groups"] == [2, 1] and rec["heads"] == [4, 2]
    assert torch.allclose(model(input_ids=ids).logits, before, atol=1e-5)
    model.save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert plain.config.intermediate_size == 64 and plain.config.num_key_value_heads == 1
    assert torch.allclose(plain(input_ids=ids).logits, before, atol=1e-5)


def test_bert_pruning_by_activation_keeps_silent_heads_out_and_taoke_reloads_it(tmp_path):
    model = tiny_bert()
    with torch.no_grad():
        for layer in model.hf.bert.encoder.layer:
            layer.output.dense.weight[:, :16] = 0                      # 16 silent MLP units
            layer.attention.output.dense.weight[:, 8:16] = 0           # head 1 silent
    batch = {"input_ids": torch.randint(0, 100, (3, 7)), "attention_mask": torch.ones(3, 7, dtype=torch.long)}
    before = model(**batch)
    rec = prune(model, mlp=0.25, heads=0.25, by="activation", batches=lambda: iter([batch]))
    assert rec["mlp_units"] == [64, 48] and rec["heads"] == [4, 3] and not rec["plain_transformers"]
    assert torch.allclose(model(**batch), before, atol=1e-5)
    # what taoke's loader does with taoke.json's attention_heads: build from the config, resize, load strictly
    model.hf.save_pretrained(tmp_path)
    fresh = HFClassifier(AutoModelForSequenceClassification.from_config(model.hf.config))
    resize_bert_attention(fresh, 3)
    fresh.hf.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=True)
    assert torch.allclose(fresh.eval()(**batch), before, atol=1e-5)


def test_bert_mlp_only_pruning_loads_in_plain_transformers(tmp_path):
    model = tiny_bert()
    prune(model, mlp=0.5, heads=0.0, by="magnitude")
    model.hf.save_pretrained(tmp_path)
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert plain.config.intermediate_size == 32
    assert sum(p.numel() for p in plain.parameters()) < sum(p.numel() for p in tiny_bert().parameters())


def test_ratios_that_leave_nothing_are_refused():
    with pytest.raises(RecipeError, match="no MLP units"):
        kept_counts(4, 4, 0.9, 0.0)
    with pytest.raises(RecipeError, match="no attention heads"):
        kept_counts(64, 3, 0.1, 0.9)


def test_kept_mlp_width_is_rounded_down_to_the_multiple_asked():
    assert kept_counts(1536, 12, 0.3, 0.25, round_to=16) == (1072, 9)   # 1075 exact: at least 30% still goes
    assert kept_counts(1536, 12, 0.3, 0.25) == (1075, 9)
    assert kept_counts(1536, 12, 0.25, 0.0, round_to=128) == (1152, 12)  # already a multiple: unchanged
    assert kept_counts(20, 4, 0.5, 0.0, round_to=16) == (10, 4)          # too narrow for one multiple: exact
    assert kept_counts(1536, 12, 0.0, 0.5, round_to=16) == (1536, 6)     # MLP not pruned: not touched


def test_recipe_refuses_prune_with_an_adapter_saved_alone():
    from taoke.recipe import recipe_from_dict
    raw = {"name": "p", "base": "smollm2-135m", "task": "sft", "data": {"train": "x.jsonl"},
           "edits": [{"prune": {"mlp": 0.3}}], "adapt": {"method": "lora", "merge": False}}
    with pytest.raises(RecipeError, match="prune changes the architecture"):
        recipe_from_dict(raw)
    with pytest.raises(RecipeError, match="mlp"):
        recipe_from_dict({**raw, "edits": [{"prune": {}}], "adapt": {"method": "full"}})


def test_units_and_heads_with_a_constant_output_are_folded_into_the_bias_exactly():
    """A unit whose activation is the same on every token (zero input weights, a bias), and a head whose value is
    constant (attention weights sum to one), add a constant to the block's output: removing them by activation
    must leave the encoder's output as it was (the unpruned model is the reference), though they did contribute."""
    model = tiny_bert()
    const_units, const_head = list(range(16)), slice(8, 16)   # head 1 of 4, head_dim 8
    with torch.no_grad():
        for layer in model.hf.bert.encoder.layer:
            inter, out = layer.intermediate.dense, layer.output.dense
            inter.bias.fill_(3.0)                                   # the other units clearly matter more
            inter.weight[const_units] = 0
            inter.bias[const_units] = 0.05
            out.weight[:, const_units] = 0.05 * torch.randn(32, 16).sign()   # LayerNorm would cancel a uniform shift
            value, att_out = layer.attention.self.value, layer.attention.output.dense
            value.bias.fill_(1.0)
            value.weight[const_head] = 0
            value.bias[const_head] = 0.05
            att_out.weight[:, const_head] = 0.05 * torch.randn(32, 8).sign()
    batch = {"input_ids": torch.randint(0, 100, (3, 7)), "attention_mask": torch.tensor([[1] * 7, [1] * 5 + [0] * 2,
                                                                                      [1] * 3 + [0] * 4])}
    hidden = lambda m: m.hf.bert(**batch).last_hidden_state   # noqa: E731  (the untrained head shrinks logits)
    before = hidden(model)
    uncompensated = copy.deepcopy(model)   # the same cut without the bias: the removed parts did add something
    rec = prune(uncompensated, mlp=0.25, heads=0.25, by="activation", batches=lambda: iter([batch]), compensate=False)
    assert not rec["bias_compensated"] and (hidden(uncompensated) - before).abs().max() > 1e-2
    rec = prune(model, mlp=0.25, heads=0.25, by="activation", batches=lambda: iter([batch]))
    assert rec["bias_compensated"] and rec["mlp_units"] == [64, 48] and rec["heads"] == [4, 3]
    for layer in model.hf.bert.encoder.layer:                    # the constant ones were the ones removed
        assert not torch.isclose(layer.intermediate.dense.bias, torch.tensor(0.05)).any()
    assert torch.allclose(hidden(model), before, atol=1e-5)
