"""`taoke export` on real runs of scratch models (fast): ONNX parity in ONNX Runtime on the whole test split,
int8, predict/eval through the ONNX Runtime backend, the export as a derivation (lineage, card parsed by
huggingface_hub), and every bad input refused with exit 2 and nothing left behind."""

import json

import pytest
from huggingface_hub import ModelCard

from conftest import read_json, run_cli

FAST = ["--quiet"]


@pytest.fixture(scope="module")
def runs(module_tmp):
    root = module_tmp
    run_cli("derive", "recipes/digits-cnn.yaml", "--out", root / "cnn", "--set", "train.epochs=1",
            "--set", "data.max_rows=400", *FAST)
    run_cli("derive", "recipes/text-lstm.yaml", "--out", root / "lstm", "--set", "train.epochs=1",
            "--set", "train.early_stopping=null", "--set", "data.max_rows=240", *FAST)
    return root


def test_onnx_exports_match_pytorch_on_the_test_split_and_predict_alike(runs, taoke_main):
    for name in ("cnn", "lstm"):
        code, out, err = taoke_main("export", runs / name, "--format", "onnx", "--json")
        assert code == 0, err
        lin = json.loads(out)
        exp = runs / f"{name}-onnx"
        parity = lin["export"]["parity"]
        assert parity["max_abs_logit_diff"] < 1e-4 and parity["labels_identical"], parity
        assert parity["rows"] == len(read_json(runs / name / "splits.json")["rows"]["test"])
        assert lin["relation"] == "converted" and lin["base"]["run"]["dir"] == str((runs / name).resolve())
        assert set(lin["model_files"]) >= {"model.onnx", "taoke.json", "README.md"}
        card = ModelCard.load(exp / "model" / "README.md").data
        assert card.base_model_relation == "quantized" and card.base_model
        # the ONNX Runtime backend scores the run's test split exactly as the run's own model does
        code, out, _ = taoke_main("eval", exp, "--split", "test", "--json")
        assert code == 0
        assert json.loads(out)["metrics"]["accuracy"] == pytest.approx(lin["metrics"]["parent"]["accuracy"])
    text_inputs = ["can you write bubble sort?", "what is your favourite film", "do you like football"]
    a = [json.loads(x)["label"] for x in taoke_main("predict", runs / "lstm", *text_inputs, "--json")[1].splitlines()]
    b = [json.loads(x)["label"] for x in
         taoke_main("predict", runs / "lstm-onnx", *text_inputs, "--json")[1].splitlines()]
    assert a == b


def test_int8_export_reports_the_metric_delta(runs, taoke_main):
    code, out, err = taoke_main("export", runs / "cnn", "--format", "onnx", "--quant", "int8", "--json")
    assert code == 0, err
    lin = json.loads(out)
    p = lin["export"]["parity"]
    assert lin["relation"] == "quantized" and lin["export"]["quant"] == "int8"
    assert set(p["metrics"]["delta"]) >= {"accuracy", "macro_f1"} and p["label_agreement"] > 0.8
    assert lin["export"]["file"] == "model.onnx" and (runs / "cnn-onnx-int8" / "model" / "model.onnx").is_file()


def _listing(path):
    return sorted(p.name for p in path.iterdir())


def test_bad_inputs_exit_2_with_one_line_and_leave_nothing(runs, tmp_path, taoke_main):
    before = _listing(runs)
    cases = [
        (["export", runs / "cnn", "--format", "gguf"], "GGUF export takes causal language models"),
        (["export", runs / "cnn", "--format", "onnx", "--quant", "q3_k"], "unknown for onnx"),
        (["export", runs / "cnn", "--format", "tflite"], "unknown; choose one of gguf, onnx, hf"),
        (["export", runs / "cnn", "--format", "hf"], "needs a transformers-based run"),
        (["export", runs / "cnn", "--format", "onnx", "--out", runs / "lstm"], "already exists"),
        (["export", tmp_path / "nope", "--format", "onnx"], "no such run directory"),
        (["export", runs / "cnn", "--format", "onnx", "--gptq"], "use it with --format gguf --quant Q4_0"),
    ]
    incomplete = tmp_path / "incomplete"
    (incomplete / "model").mkdir(parents=True)
    (incomplete / "recipe.yaml").write_text("name: x\n")
    (incomplete / "status.json").write_text('{"state": "running", "pid": 1}')
    cases.append((["export", incomplete, "--format", "onnx"], "not a complete run (running)"))
    lm = tmp_path / "lm-run"
    (lm / "model").mkdir(parents=True)
    (lm / "recipe.yaml").write_text("name: x\n")
    (lm / "model" / "taoke.json").write_text('{"task": "sft"}')
    (lm / "lineage.json").write_text('{"task": "sft", "name": "x"}')
    cases.append((["export", lm, "--format", "onnx"], "ONNX export covers classifiers"))
    for args, message in cases:
        code, out, err = taoke_main(*args)
        assert code == 2, (args, out, err)
        assert message in " ".join(err.split()), (message, err)
        assert "Traceback" not in err
    assert _listing(runs) == before
    assert not list(tmp_path.glob(".*partial*"))


def test_changed_run_is_refused(runs, tmp_path, taoke_main):
    import shutil
    copy = tmp_path / "cnn-copy"
    shutil.copytree(runs / "cnn", copy)
    with open(copy / "model" / "model.safetensors", "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02\x03")
    code, _, err = taoke_main("export", copy, "--format", "onnx")
    assert code == 2 and "sha256 differs" in " ".join(err.split())
    assert _listing(tmp_path) == ["cnn-copy"]
