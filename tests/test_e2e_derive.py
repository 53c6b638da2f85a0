"""End-to-end: the real CLI on the shipped recipes, on small slices of their real data."""

import json

import pytest
import torch
import yaml

from conftest import read_json, run_cli

FAST = ["--quiet"]


def front_matter(path):
    text = path.read_text()
    return yaml.safe_load(text.split("---")[1])


def check_run_dir(run):
    for name in ("recipe.yaml", "metrics.jsonl", "report.md", "lineage.json", "model/README.md",
                 "model/taoke.json", "plots/curves.png", "plots/comparison.png"):
        assert (run / name).exists(), name
    assert read_json(run / "status.json")["state"] == "complete"
    assert not (run / "checkpoints").exists()
    lin = read_json(run / "lineage.json")
    for key in ("base", "relation", "edits", "adaptation", "data", "recipe_sha256", "taoke_version", "created",
                "metrics", "parents"):
        assert key in lin, key
    assert all(len(f["sha256"]) == 64 for src in lin["data"]["files"].values() for f in src)
    assert sum(lin["data"]["rows"].values()) > 0
    return lin


@pytest.fixture(scope="module")
def topics_run(module_tmp):
    out = module_tmp / "topics"
    run_cli("derive", "recipes/text-topics.yaml", "--out", out, "--set", "data.max_rows=260",
            "--set", "train.epochs=2", "--set", "train.early_stopping=null", *FAST)
    return out


def test_text_topics_run(topics_run):
    lin = check_run_dir(topics_run)
    assert lin["base"]["name"] == "minilm-l6" and lin["relation"] == "finetune"
    assert lin["base"]["weights"][0]["sha256"] and lin["license"] == "apache-2.0"
    assert "base (linear probe)" in lin["metrics"] and "derived" in lin["metrics"]
    card = front_matter(topics_run / "model" / "README.md")
    assert card["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert card["base_model_relation"] == "finetune" and card["license"] == "apache-2.0"
    assert card["datasets"] == ["topics.csv"]
    assert "base (linear probe)" in (topics_run / "report.md").read_text()
    assert (topics_run / "plots" / "confusion_derived.png").stat().st_size > 1000


def test_eval_reproduces_report(topics_run):
    lin = read_json(topics_run / "lineage.json")
    res = json.loads(run_cli("eval", topics_run, "--split", "test", "--json").stdout)
    for k in ("accuracy", "macro_f1"):
        assert res["metrics"][k] == pytest.approx(lin["metrics"]["derived"][k], abs=1e-9)
    assert res["rows"] == lin["data"]["rows"]["test"]


def test_eval_new_file_and_unknown_label(topics_run, tmp_path):
    f = tmp_path / "new.csv"
    f.write_text("text,label\nhow do i write a python function,coding\nwho wrote hamlet,literature\n")
    res = json.loads(run_cli("eval", topics_run, "--data", f, "--json").stdout)
    assert res["rows"] == 2 and 0 <= res["metrics"]["accuracy"] <= 1
    f.write_text("text,label\nhello,weather\n")
    proc = run_cli("eval", topics_run, "--data", f, check=False)
    assert proc.returncode == 2 and "'weather'" in proc.stderr and "Traceback" not in proc.stderr


def test_predict_text(topics_run, tmp_path):
    rows = [json.loads(line) for line in run_cli("predict", topics_run, "can you write bubble sort in python?",
                                                 "--json").stdout.splitlines()]
    assert rows[0]["label"] in read_json(topics_run / "lineage.json")["data"]["labels"]
    inputs = tmp_path / "in.txt"
    inputs.write_text("what is a black hole\nwho wrote war and peace\n")
    out = tmp_path / "pred.jsonl"
    run_cli("predict", topics_run, "--file", inputs, "--out", out)
    assert len(out.read_text().splitlines()) == 2


def test_model_loads_with_plain_transformers(topics_run):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from taoke.models.task_model import load_task_model

    plain = AutoModelForSequenceClassification.from_pretrained(topics_run / "model").eval()
    tok = AutoTokenizer.from_pretrained(topics_run / "model")
    ours, _, _ = load_task_model(topics_run / "model")
    batch = tok(["what is thermodynamics"], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(plain(**batch).logits, ours(**batch), atol=1e-5)


def test_derive_from_run_grows_chain(topics_run, tmp_path):
    out = tmp_path / "child"
    run_cli("derive", "recipes/text-topics.yaml", "--out", out, "--set", f"base={topics_run}",
            "--set", "data.max_rows=260", "--set", "train.epochs=1", "--set", "adapt.method=head", *FAST)
    lin = check_run_dir(out)
    assert lin["parents"][0]["kind"] == "run" and lin["parents"][0]["name"] == "text-topics"
    assert lin["parents"][1]["name"] == "minilm-l6"
    assert "parent" in lin["metrics"]
    assert lin["adaptation"]["trainable_params"] < lin["adaptation"]["total_params"] / 100
    card = front_matter(out / "model" / "README.md")
    assert card["base_model"] == "text-topics"
    assert card["taoke"]["parents"] == ["text-topics", "minilm-l6"]


def test_text_lstm_from_scratch(tmp_path):
    out = tmp_path / "lstm"
    run_cli("derive", "recipes/text-lstm.yaml", "--out", out, "--set", "train.epochs=3",
            "--set", "train.early_stopping=null", *FAST)
    lin = check_run_dir(out)
    assert "baseline" in lin["metrics"] and lin["base"]["format"] == "scratch"
    card = front_matter(out / "model" / "README.md")
    assert "base_model" not in card and "from-scratch" in card["tags"]
    assert "trained from scratch" in (out / "report.md").read_text()
    pred = json.loads(run_cli("predict", out, "tell me a joke", "--json").stdout.splitlines()[0])
    assert 0 < pred["probability"] <= 1


def test_digits_cnn_and_shell(tmp_path):
    parent = tmp_path / "digits-cnn"
    run_cli("derive", "recipes/digits-cnn.yaml", "--out", parent, "--set", "train.epochs=4", *FAST)
    lin = check_run_dir(parent)
    assert lin["metrics"]["derived"]["accuracy"] > 0.8   # chance is 0.1
    shell = tmp_path / "shell"
    run_cli("derive", "recipes/shell-cnn.yaml", "--out", shell, "--set", f"base={parent}",
            "--set", "train.epochs=2", *FAST)
    lin = check_run_dir(shell)
    assert lin["edits"][0]["op"] == "insert_hidden" and lin["edits"][0]["units"] == [256]
    assert lin["edits"][0]["params_after"] > lin["edits"][0]["params_before"]
    assert "parent" in lin["metrics"] and lin["parents"][0]["name"] == "digits-cnn"
    assert json.loads((shell / "model" / "taoke.json").read_text())["head"]["hidden"] == [256]
    res = json.loads(run_cli("eval", shell, "--split", "test", "--json").stdout)
    assert res["metrics"]["accuracy"] == pytest.approx(lin["metrics"]["derived"]["accuracy"])


def test_image_folder_predict(tmp_path):
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    root = tmp_path / "digits"
    for i in range(300):
        (root / str(d.target[i])).mkdir(parents=True, exist_ok=True)
        Image.fromarray((d.images[i] * 15).astype(np.uint8)).save(root / str(d.target[i]) / f"{i}.png")
    out = tmp_path / "run"
    run_cli("derive", "recipes/digits-cnn.yaml", "--out", out, "--set", f"data.train={root}",
            "--set", "train.epochs=2", "--set", "preprocess=[{resize: {size: 16, channels: 1}}]", *FAST)
    check_run_dir(out)
    pred = json.loads(run_cli("predict", out, root / "3" / "3.png", "--json").stdout.splitlines()[0])
    assert pred["label"] in [str(i) for i in range(10)]


def test_tabular_classification_and_regression(tmp_path):
    out = tmp_path / "cancer"
    run_cli("derive", "recipes/tabular-cancer.yaml", "--out", out, "--set", "train.epochs=10", *FAST)
    lin = check_run_dir(out)
    assert lin["metrics"]["derived"]["accuracy"] > 0.85
    out = tmp_path / "diabetes"
    run_cli("derive", "recipes/tabular-diabetes.yaml", "--out", out, "--set", "train.epochs=30", *FAST)
    lin = check_run_dir(out)
    assert set(lin["metrics"]["derived"]) == {"mae", "rmse", "r2"}
    assert lin["metrics"]["derived"]["r2"] > 0.0


def test_a_changed_weight_file_is_refused_on_load(topics_run, tmp_path):
    """lineage.json holds the sha256 of every model file; loading a run checks them (exit 2 naming the file)."""
    import shutil

    lin = read_json(topics_run / "lineage.json")
    assert "model.safetensors" in lin["model_files"] and "README.md" in lin["model_files"]
    copy = tmp_path / "copy"
    shutil.copytree(topics_run, copy)
    weights = copy / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte in the last tensor
    weights.write_bytes(bytes(data))
    proc = run_cli("predict", copy, "hello", check=False)
    assert proc.returncode == 2 and "model.safetensors: sha256 differs" in proc.stderr.replace("\n", "")
