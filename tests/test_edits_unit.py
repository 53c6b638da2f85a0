import pytest
import torch

from taoke.edit.layers import drop_layers, expand_layers
from taoke.errors import RecipeError
from taoke.models.scratch import build_scratch
from taoke.models.task_model import HFClassifier


def test_expand_layers_is_identity_in_pre_norm_transformer():
    torch.manual_seed(0)
    cfg = {"vocab_size": 100, "layers": 2, "dropout": 0.0}
    model = build_scratch("transformer", 3, cfg).eval()
    ids = torch.randint(1, 100, (4, 9))
    mask = torch.ones_like(ids)
    before = model(input_ids=ids, attention_mask=mask)
    rec, prefixes = expand_layers(model, [0, 1], cfg)
    assert rec["layers_after"] == 4 and cfg["layers"] == 4 and prefixes == ["layers.1.", "layers.3."]
    assert torch.allclose(model(input_ids=ids, attention_mask=mask), before, atol=1e-6)


def test_expand_layers_is_identity_in_llama():
    """LLaMA is pre-norm: an inserted block with zeroed o_proj/down_proj leaves the logits unchanged."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)
    model = HFClassifier(LlamaForSequenceClassification(cfg)).eval()
    ids = torch.randint(1, 64, (2, 7))
    before = model(input_ids=ids)
    expand_layers(model, [1], {})
    assert model.hf.config.num_hidden_layers == 3
    assert [l.self_attn.layer_idx for l in model.hf.model.layers] == [0, 1, 2]
    assert torch.allclose(model(input_ids=ids), before, atol=1e-5)
    drop_layers(model, [0, 2], None, {})
    assert model.hf.config.num_hidden_layers == 2


def test_drop_every_k_and_errors():
    cfg = {"vocab_size": 50, "layers": 4}
    model = build_scratch("transformer", 2, cfg)
    rec = drop_layers(model, None, 2, cfg)
    assert rec["kept"] == [1, 3] and cfg["layers"] == 2
    with pytest.raises(RecipeError, match="out of range"):
        drop_layers(model, [5], None, cfg)
    with pytest.raises(RecipeError, match="no transformer layer stack"):
        drop_layers(build_scratch("cnn", 2, {}), [0], None, {})


def test_layer_edits_on_a_causal_lm_keep_config_cache_and_generation_right():
    """A plain LlamaForCausalLM (no classifier wrapper): depth, layer_types and KV-cache indices follow the edit,
    so cached greedy generation equals uncached generation after expanding and after dropping."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=63)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(1, 63, (1, 5))
    before = model(input_ids=ids).logits
    model.config.layer_types = ["a", "b", "c"]  # per-layer kinds (sliding/full in models that have them)
    expand_layers(model, [1], {})
    assert model.config.layer_types == ["a", "b", "b", "c"]
    model.config.layer_types = None  # LLaMA itself has only full attention
    assert model.config.num_hidden_layers == 4 and [l.self_attn.layer_idx for l in model.model.layers] == [0, 1, 2, 3]
    assert torch.allclose(model(input_ids=ids).logits, before, atol=1e-5)
    drop_layers(model, [0, 3], None, {})
    assert model.config.num_hidden_layers == 2 and [l.self_attn.layer_idx for l in model.model.layers] == [0, 1]
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
        plain = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)
