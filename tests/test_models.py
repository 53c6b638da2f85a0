import pytest
import torch

from taoke.edit.head import insert_hidden
from taoke.models.scratch import build_scratch
from taoke.models.task_model import (get_head, head_io, load_hf_classifier, load_task_model, save_task_model)
from taoke.recipe import InsertHidden
from taoke.library import resolve


@pytest.mark.parametrize("arch,inputs", [
    ("cnn", {"pixel_values": torch.rand(3, 1, 8, 8)}),
    ("mlp", {"features": torch.rand(3, 5)}),
    ("lstm", {"input_ids": torch.randint(2, 50, (3, 7)), "attention_mask": torch.ones(3, 7, dtype=torch.long)}),
    ("gru", {"input_ids": torch.randint(2, 50, (3, 7)), "attention_mask": torch.ones(3, 7, dtype=torch.long)}),
    ("transformer", {"input_ids": torch.randint(2, 50, (3, 7)), "attention_mask": torch.ones(3, 7, dtype=torch.long)}),
])
def test_scratch_forward_and_roundtrip(tmp_path, arch, inputs):
    cfg = {"cnn": {"in_channels": 1, "image_size": 8}, "mlp": {"in_features": 5},
           "lstm": {"vocab_size": 50}, "gru": {"vocab_size": 50}, "transformer": {"vocab_size": 50}}[arch]
    model = build_scratch(arch, 4, cfg).eval()
    out = model(**inputs)
    assert out.shape == (3, 4)
    head = insert_hidden(model, 4, InsertHidden(units=[16], dropout=0.0))
    meta = {"task": "x", "arch": f"scratch:{arch}", "arch_config": cfg, "num_outputs_base": 4, "labels": list("abcd"),
            "label_column": "label", "inputs": {}, "head": head}
    save_task_model(model, tmp_path / "m", meta)
    loaded, meta2, _ = load_task_model(tmp_path / "m")
    assert torch.allclose(loaded(**inputs), model.eval()(**inputs))
    assert head_io(loaded) == (model.feature_dim, 4)


def test_hf_classifier_saves_plain_transformers_model(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = resolve("minilm-l6")
    model = load_hf_classifier(base.path, 3, ["a", "b", "c"], regression=False).eval()
    tok = AutoTokenizer.from_pretrained(base.path)
    meta = {"task": "text-classification", "arch": "hf", "arch_config": {}, "num_outputs_base": 3,
            "labels": ["a", "b", "c"], "label_column": "label", "inputs": {}, "head": None}
    save_task_model(model, tmp_path / "m", meta, tok)
    batch = tok(["what is a neutron star"], return_tensors="pt")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    ours, _, _ = load_task_model(tmp_path / "m")
    with torch.no_grad():
        ref = model(**batch)
        assert torch.allclose(plain(**batch).logits, ref, atol=1e-5)
        assert torch.allclose(ours(**batch), ref, atol=1e-5)
    assert plain.config.id2label[2] == "c"
    assert isinstance(get_head(model), torch.nn.Linear)
