"""The LM recipes through the real CLI on small real slices: held-out loss falls below the base's, the merged
model passes the parity check (the run only completes if it does), predict answers."""

import json

import pytest

from conftest import read_json, run_cli


def derive(recipe, tmp_path, *extra):
    out = tmp_path / "run"
    run_cli("derive", f"recipes/{recipe}.yaml", "--out", out, "--quiet", *extra)
    lin = read_json(out / "lineage.json")
    ref = lin["metrics"]["reference"]
    return out, lin, lin["metrics"][ref], lin["metrics"]["derived"]


def test_sft_lora_slice(tmp_path):
    out, lin, base, derived = derive("sft-lora", tmp_path, "--set", "train.max_steps=6", "--set", "data.max_rows=80")
    assert derived["loss"] < base["loss"]
    assert lin["metrics"]["parity"]["ok"] is True and lin["metrics"]["parity"]["max_logit_diff"] < 1e-3
    card = (out / "model" / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "license: apache-2.0" in card
    assert (out / "model" / "chat_template.jinja").exists() or "chat_template" in (out / "model" / "tokenizer_config.json").read_text()
    assert "Sample generations" in (out / "report.md").read_text()
    rows = [json.loads(l) for l in run_cli("predict", out, "What is a computer?", "--json").stdout.splitlines()]
    assert rows[0]["completion"].strip()


@pytest.mark.slow
def test_sft_full(tmp_path):
    out, lin, base, derived = derive("sft-full", tmp_path, "--set", "train.max_steps=8", "--set", "data.max_rows=80")
    assert derived["loss"] < base["loss"] and lin["metrics"]["parity"]["ok"]


@pytest.mark.slow
def test_continued_pretraining(tmp_path):
    out, lin, base, derived = derive("lm-continued", tmp_path, "--set", "train.max_steps=8")
    assert derived["loss"] < base["loss"] and lin["metrics"]["parity"]["ok"]


@pytest.mark.slow
def test_dpo_lora(tmp_path):
    out, lin, base, derived = derive("dpo-lora", tmp_path, "--set", "train.max_steps=8")
    assert derived["dpo_loss"] < 0.6931 and lin["metrics"]["parity"]["ok"]
