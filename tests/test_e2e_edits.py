"""Each structure edit and adaptation method: its recipe runs on a real base through the real CLI, the
architecture changes as declared, and the model still trains (loss falls, accuracy beats chance)."""

import json

import pytest
import torch

from conftest import read_json, run_cli

SLICE = ["--set", "data.max_rows=300", "--set", "eval.compare_base=false", "--quiet"]


def derive(recipe, tmp_path, *extra):
    out = tmp_path / "run"
    run_cli("derive", f"recipes/{recipe}.yaml", "--out", out, *SLICE, *extra)
    lin = read_json(out / "lineage.json")
    steps = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in steps if r["type"] == "epoch"]
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"], "loss did not fall"
    n = len(lin["data"]["labels"])
    assert lin["metrics"]["derived"]["accuracy"] > 1.5 / n, "no better than chance"
    return out, lin


def hf_config(out):
    return read_json(out / "model" / "config.json")


@pytest.mark.slow   # covered in CI (make test-all); the default run keeps a faster sibling
def test_drop_layers(tmp_path):
    out, lin = derive("edit-drop-layers", tmp_path, "--set", "train.epochs=4")
    assert lin["edits"][0]["kept"] == [1, 3, 5]
    assert hf_config(out)["num_hidden_layers"] == 3
    assert lin["adaptation"]["total_params"] < 20_000_000


@pytest.mark.slow   # covered in CI (make test-all); the default run keeps a faster sibling
def test_expand_layers_trains_only_new_blocks(tmp_path):
    out, lin = derive("edit-expand-layers", tmp_path, "--set", "train.epochs=4")
    e = lin["edits"][0]
    assert e["layers_after"] == 8 and e["new_positions"] == [3, 7]
    assert hf_config(out)["num_hidden_layers"] == 8
    block = sum(p.numel() for p in _bert_layer().parameters())
    head = 384 * 9 + 9
    assert lin["adaptation"]["trainable_params"] == 2 * block + head


def _bert_layer():
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertLayer

    return BertLayer(BertConfig(hidden_size=384, num_attention_heads=12, intermediate_size=1536))


@pytest.mark.slow   # covered in CI (make test-all); the default run keeps a faster sibling
def test_freeze_by_index_and_pattern(tmp_path):
    out, lin = derive("edit-freeze", tmp_path, "--set", "train.epochs=3")
    frozen = lin["edits"][0]["frozen_params"]
    assert frozen > 3 * sum(p.numel() for p in _bert_layer().parameters())
    assert lin["adaptation"]["trainable_params"] == lin["adaptation"]["total_params"] - frozen


@pytest.mark.slow   # covered in CI (make test-all); the default run keeps a faster sibling
def test_expand_vocab(tmp_path):
    out, lin = derive("edit-vocab", tmp_path, "--set", "train.epochs=3")
    e = lin["edits"][0]
    assert e["added"] == 9 and e["vocab_after"] == e["vocab_before"] + 9
    assert hf_config(out)["vocab_size"] == e["vocab_after"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "model")
    assert tok.tokenize("graphql rocks")[0] == "graphql"


def test_head_only(tmp_path):
    out, lin = derive("adapt-head", tmp_path, "--set", "train.epochs=6")
    assert lin["adaptation"]["trainable_params"] == 384 * 9 + 9


@pytest.mark.slow   # covered in CI (make test-all); the default run keeps a faster sibling
def test_freeze_method(tmp_path):
    out, lin = derive("adapt-freeze", tmp_path, "--set", "train.epochs=3")
    assert lin["adaptation"]["trainable_params"] < lin["adaptation"]["total_params"] / 3


@pytest.mark.slow   # covered in CI (make test-all); the default run keeps a faster sibling
def test_lora_merged_equals_adapter(tmp_path):
    from taoke.data.encode import encode_frame
    from taoke.inference import load
    from taoke.models.meta import read_meta
    from taoke.models.task_model import load_adapter_model, load_task_model
    from taoke.train.classifier import predict

    out, lin = derive("adapt-lora", tmp_path, "--set", "train.epochs=4")
    assert lin["adaptation"]["trainable_params"] < 0.02 * lin["adaptation"]["total_params"]
    assert (out / "model" / "adapter" / "adapter_model.safetensors").exists()
    merged, meta, tok = load_task_model(out / "model")
    adapter = load_adapter_model(out / "model" / "adapter", read_meta(out / "model")).eval()
    frame, _ = load(out).split_frame("test")
    enc = encode_frame(frame, meta, tok)
    a, b = predict(merged, enc, precision="fp32"), predict(adapter, enc, precision="fp32")
    assert torch.allclose(a, b, atol=1e-4)
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    card = (out / "model" / "README.md").read_text()
    assert "base_model_relation: finetune" in card


@pytest.mark.slow   # covered in CI (make test-all); the default run keeps a faster sibling
def test_dora_adapter_only(tmp_path):
    out, lin = derive("adapt-dora", tmp_path, "--set", "train.epochs=3")
    assert not (out / "model" / "model.safetensors").exists()
    assert (out / "model" / "adapter_model.safetensors").exists()
    assert "base_model_relation: adapter" in (out / "model" / "README.md").read_text()
    res = json.loads(run_cli("eval", out, "--split", "test", "--json").stdout)
    assert res["metrics"]["accuracy"] == pytest.approx(lin["metrics"]["derived"]["accuracy"])


@pytest.mark.parametrize("edit,expect", [
    ("[{drop_layers: {keep: [0, 9]}}]", "layer index 9 is out of range; the model has 6 layers"),
    ("[{freeze: {layers: [7]}}]", "index 7 is out of range"),
    ("[{freeze: {pattern: nosuchparam}}]", "matches no parameter"),
    ("[{replace_head: {outputs: 4}}]", "contradicts the data, which has 9 classes"),
])
# The refusals below run the real entry point in this process (taoke_main): the same command, without paying the
# libraries' import again for each one.
def test_bad_edits_fail_before_training(tmp_path, edit, expect, taoke_main):
    code, _, err = taoke_main("derive", "recipes/text-topics.yaml", "--out", tmp_path / "r", "--set", f"edits={edit}",
                              "--quiet")
    assert code == 2 and expect in err.replace("\n", " "), err
    assert not (tmp_path / "r").exists()


def test_lora_target_matching_nothing(tmp_path, taoke_main):
    code, _, err = taoke_main("derive", "recipes/adapt-lora.yaml", "--out", tmp_path / "r", "--set",
                              "adapt.target_modules=[q_proj]", "--quiet")
    assert code == 2 and "['q_proj'] match no Linear module" in err
    assert not (tmp_path / "r").exists()


def test_dry_run_prints_architecture(tmp_path, taoke_main):
    code, out, _ = taoke_main("derive", "recipes/edit-drop-layers.yaml", "--dry-run", "--out", tmp_path / "r")
    assert code == 0 and "trainable" in out and "layers_after=3" in out.replace("\n", "")
    assert not (tmp_path / "r").exists()
