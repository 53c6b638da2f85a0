"""normalize for every family it claims: a tiny real-config model of each, built and run by transformers, its
tensors renamed under a new root; normalize must give back a directory plain transformers loads with the very
outputs of the original model (the reference is transformers running the original, not taoke's placement)."""

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from taoke.errors import ModelError
from taoke.provenance.normalize import normalize

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "mistral": ({}, AutoModelForCausalLM),
    "qwen2": ({}, AutoModelForCausalLM),
    "qwen3": ({"head_dim": 16}, AutoModelForCausalLM),
    "gemma": ({"head_dim": 16}, AutoModelForCausalLM),
    "gemma2": ({"head_dim": 16}, AutoModelForCausalLM),
    "gemma3_text": ({"head_dim": 16}, AutoModelForCausalLM),
    "phi3": ({}, AutoModelForCausalLM),
    "gpt2": ({"n_embd": 64, "n_layer": 2, "n_head": 4}, AutoModelForCausalLM),
    "bert": ({}, AutoModel),
    "roberta": ({"max_position_embeddings": 40}, AutoModel),
}


def outputs(model, ids):
    with torch.no_grad():
        out = model.eval()(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def disguised(tmp_path, family):
    """The original (transformers, seeded, non-trivial norms) and a copy with every tensor under a new root name."""
    extra, auto = FAMILIES[family]
    torch.manual_seed(0)
    model = auto.from_config(AutoConfig.for_model(family, **{**SMALL, **extra}))
    with torch.no_grad():   # norm gains and biases away from their init, so a misplaced one shows in the outputs
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "original")
    sd = {("net." + k.split(".", 1)[1] if k.split(".")[0] in ("model", "transformer", "bert", "roberta")
           else "net." + k): v.detach().numpy().copy() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        sd = {k: v for k, v in sd.items() if not k.endswith("lm_head.weight")}
    d = tmp_path / "disguised"
    d.mkdir()
    save_file(sd, str(d / "model.safetensors"))
    (d / "config.json").write_text((tmp_path / "original" / "config.json").read_text())
    return model, d, auto


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_normalize_restores_each_family_with_identical_outputs(tmp_path, family):
    original, src, auto = disguised(tmp_path, family)
    ids = torch.tensor([[1, 17, 42, 200, 3, 99, 5]])
    want = outputs(original, ids)
    try:   # the disguise is real: transformers refuses the names, or initialises the tensors it cannot find
        assert not torch.allclose(outputs(auto.from_pretrained(str(src), dtype=torch.float32), ids), want)
    except (OSError, ValueError, KeyError, RuntimeError):
        pass
    report = normalize(str(src), tmp_path / "norm")
    assert report["identical_logits"] and report["family"] == family
    got = outputs(auto.from_pretrained(str(tmp_path / "norm"), dtype=torch.float32), ids)
    assert torch.equal(want, got), float((want - got).abs().max())


def test_a_tensor_the_family_has_no_place_for_is_refused(tmp_path):
    _, src, _ = disguised(tmp_path, "qwen2")
    from safetensors.numpy import load_file

    sd = load_file(str(src / "model.safetensors"))
    sd["net.layers.0.mlp.extra_proj.weight"] = np.zeros((7, 3), np.float32)
    save_file(sd, str(src / "model.safetensors"))
    with pytest.raises(ModelError, match="no place in qwen2"):
        normalize(str(src), tmp_path / "norm")
    assert not (tmp_path / "norm").exists()


def test_an_unknown_architecture_name_on_a_non_llama_is_refused(tmp_path):
    """A GPT-2 whose config names an architecture transformers does not know: only LLaMA is read through a
    disguised name, so this is refused, naming the family it looks like."""
    _, src, _ = disguised(tmp_path, "gpt2")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "mystery", "architectures": ["MysteryLM"]}))
    with pytest.raises(ModelError, match="looks like 'gpt2'.*llama family only"):
        normalize(str(src), tmp_path / "norm")
    assert not (tmp_path / "norm").exists()


def test_real_minilm_normalizes_as_bert(tmp_path):
    """all-MiniLM-L6-v2 (the package's files), its tensors under a new root: back to BertModel, same hidden states."""
    from taoke.library import resolve

    ref = resolve("minilm-l6").path
    original = AutoModel.from_pretrained(str(ref), dtype=torch.float32)
    from safetensors.numpy import load_file

    weights = next(ref.glob("*.safetensors"))
    d = tmp_path / "disguised"
    d.mkdir()
    save_file({"enc." + k: v for k, v in load_file(str(weights)).items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text((ref / "config.json").read_text())
    report = normalize(str(d), tmp_path / "norm")
    assert report["family"] == "bert"
    ids = torch.tensor([[101, 7592, 2088, 2003, 102]])
    assert torch.equal(outputs(original, ids), outputs(AutoModel.from_pretrained(str(tmp_path / "norm")), ids))
