"""Slow end-to-end exports of the built-in bases' runs: a MiniLM classifier to ONNX (fp32, int8) and an
SFT'd SmolLM2 to GGUF checked in real llama.cpp, both verified as derived; an adapter-only run merged on the
way out; pruned-and-healed models (MiniLM, SmolLM2) that are really smaller and load."""

import json
import re
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from conftest import read_json, run_cli

pytestmark = pytest.mark.slow
FAST = ["--quiet"]
SFT = ["--set", "train.max_steps=4", "--set", "data.max_rows=80", "--set", "lm.gen_prompts=3",
       "--set", "lm.max_new_tokens=8", *FAST]


@pytest.fixture(scope="module")
def topics(module_tmp):
    root = module_tmp / "cls"
    run_cli("derive", "recipes/text-topics.yaml", "--out", root / "topics", "--set", "data.max_rows=260",
            "--set", "train.epochs=2", "--set", "train.early_stopping=null", *FAST)
    return root


def test_minilm_onnx_fp32_and_int8_are_verified_derived_and_listed(topics, taoke_main):
    run = topics / "topics"
    for quant in ([], ["--quant", "int8"]):
        code, out, err = taoke_main("export", run, "--format", "onnx", *quant, "--json")
        assert code == 0, err
        p = json.loads(out)["export"]["parity"]
        assert p["rows"] > 50 and (quant or (p["max_abs_logit_diff"] < 1e-4 and p["labels_identical"]))
    for exp in ("topics-onnx", "topics-onnx-int8"):
        code, out, _ = taoke_main("verify", run / "model", topics / exp, "--json")
        res = json.loads(out)
        assert res["verdict"] == "derived", (exp, res["verdict"], res["relation"])
    inputs = ["can you write bubble sort?", "what is your favourite film", "who won the world cup"]
    labels = lambda ref: [json.loads(x)["label"] for x in taoke_main("predict", ref, *inputs, "--json")[1].splitlines()]  # noqa: E731
    assert labels(topics / "topics-onnx") == labels(run)
    code, out, err = taoke_main("lineage", topics, "--json")
    assert code == 0, err
    edges = json.loads(out)["edges"]
    assert any(e["child"] == "topics-onnx-int8" and e["parent"] == "topics" and e["status"] == "confirmed"
               for e in edges), edges


def test_pruned_minilm_is_smaller_reports_three_rows_and_exports(topics, tmp_path, taoke_main):
    out = tmp_path / "pruned"
    run_cli("derive", "recipes/text-topics.yaml", "--out", out, "--set", f"base={topics / 'topics'}",
            "--set", "data.max_rows=260", "--set", "train.epochs=1", "--set", "train.early_stopping=null",
            "--set", "edits=[{prune: {mlp: 0.3, heads: 0.25, by: activation}}]", *FAST)
    comp = read_json(out / "lineage.json")["metrics"]["compression"]
    names = list(comp)
    assert len(names) == 3 and comp[names[1]]["params"] < comp[names[0]]["params"]
    assert read_json(out / "model" / "config.json")["intermediate_size"] == 1072   # 1075, rounded down to 16s
    assert read_json(out / "model" / "taoke.json")["attention_heads"] == 9
    assert "pruned, before healing" in (out / "report.md").read_text()
    code, res, err = taoke_main("export", out, "--format", "onnx", "--json")
    assert code == 0, err
    assert json.loads(res)["export"]["parity"]["labels_identical"]


@pytest.fixture(scope="module")
def sft(module_tmp):
    root = module_tmp / "lm"
    run_cli("derive", "recipes/sft-lora.yaml", "--out", root / "sft", *SFT)
    return root


def test_sft_to_gguf_runs_in_llama_cpp_and_is_verified(sft, taoke_main):
    """F16, not Q8_0: how far llama.cpp's Q8_0 kernels move this 4-step fixture depends on the CPU (its held-out
    perplexity 2.14% from taoke's on an AVX512-VNNI EPYC, past the 2% the check allows, where the AVX2 and AMX
    machines passed); F16 was 0.03% from it there. Q8_0 has a test of its own below."""
    code, out, err = taoke_main("export", sft / "sft", "--format", "gguf", "--quant", "F16", "--json")
    assert code == 0, err
    lin = json.loads(out)
    p = lin["export"]["parity"]
    assert p["tokenization_identical"] and p["perplexity"]["relative_gap"] < 0.01
    assert p["greedy"]["share_with_near_ties"] >= 0.75 and p["transformers"]["loaded"]
    exp = sft / "sft-gguf-f16"
    assert (exp / "model" / "Modelfile").read_text().startswith("# Ollama")
    assert ModelCard.load(exp / "model" / "README.md").data.base_model_relation == "quantized"
    assert lin["relation"] == "quantized" and lin["parents"][0]["name"] == "sft-lora"
    code, out, _ = taoke_main("verify", sft / "sft" / "model", exp, "--json")
    assert json.loads(out)["verdict"] == "derived"


def gguf_gap(taoke_main, run: Path, out: Path, quant: str, *extra: str) -> tuple[float, dict | None, str]:
    """llama.cpp's held-out perplexity gap of a GGUF export at `quant`: (gap, the export's lineage section, "") when
    the check accepted it, (gap, None, the one-line refusal) when it did not, nothing being left behind."""
    code, res, err = taoke_main("export", run, "--format", "gguf", "--quant", quant, "--out", out, *extra, "--json")
    if code == 0:
        export = json.loads(res)["export"]
        return export["parity"]["perplexity"]["relative_gap"], export, ""
    err = " ".join(err.split())
    assert code == 2 and f"{quant} allows" in err, err
    assert not out.exists() and not list(out.parent.glob(".*partial*"))
    return float(re.search(r"\(([0-9.]+)% apart", err).group(1)) / 100, None, err


def q4_0_gap(taoke_main, run: Path, out: Path, *extra: str) -> float:
    gap, export, refusal = gguf_gap(taoke_main, run, out, "Q4_0", *extra)
    if export:
        assert export["tensor_types"]["Q4_0"] == 7 * 30   # every projection of SmolLM2's 30 blocks
    else:
        assert "Q4_0 allows 10%" in refusal, refusal
    return gap


def test_q8_0_runs_in_llama_cpp_within_a_few_percent_of_the_run(sft, taoke_main):
    """Q8_0, the export most users ask for, through real llama.cpp on every CPU CI meets. On this 4-step fixture
    llama.cpp's AVX512 Q8_0 kernels put held-out perplexity ~2.1% from taoke's (AVX2: ~0.8%), either side of the
    check's 2%: accepted, or refused with the figures, the kernels and nothing written. A broken Q8_0 writer (wrong
    block layout or scales) moves it by far more than 5% either way."""
    gap, export, refusal = gguf_gap(taoke_main, sft / "sft", sft / "q8", "Q8_0")
    if export:
        assert export["tensor_types"]["Q8_0"] >= 7 * 30   # every projection of SmolLM2's 30 blocks
        assert export["parity"]["tokenization_identical"] and export["parity"]["llama_cpp"]["cpu_features"]
    else:
        assert "Q8_0 allows 2%" in refusal and "llama.cpp's CPU kernels here:" in refusal, refusal
    assert gap < 0.05, gap


def test_export_refuses_a_run_whose_data_changed_before_loading_it(sft, tmp_path, taoke_main):
    """The check and GPTQ rebuild the run's splits from its data: a changed file is named and nothing is written."""
    import shutil
    run = tmp_path / "sft"
    shutil.copytree(sft / "sft", run)
    lin = read_json(run / "lineage.json")
    original = Path(lin["data"]["files"]["train"][0]["path"])
    changed = tmp_path / original.name
    changed.write_bytes(original.read_bytes().rstrip(b"\n") + b" \n")
    lin["data"]["files"]["train"][0]["path"] = str(changed)
    (run / "lineage.json").write_text(json.dumps(lin))
    code, _, err = taoke_main("export", run, "--format", "gguf", "--quant", "Q4_0", "--gptq")
    err = " ".join(err.split())
    assert code == 2 and f"{changed}: missing or changed since the run" in err, err
    assert "--no-check" in err and "without --gptq" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([original.name, "sft"])


# ~10 min on 2 AVX2 cores (GPTQ, then 4 epochs of norm tuning); test_gptq and test_norm_tweak check the parts in CI
@pytest.mark.heavy
def test_q4_0_gptq_codes_keep_llama_cpp_closer_to_the_run(sft, taoke_main):
    """Q4_0 of this 135M base (itself stored 4-bit) moves held-out perplexity in llama.cpp ~28% when each weight is
    rounded to nearest: past the 10% tolerance, refused with the figures. GPTQ's codes with norm gains tuned to them
    (both on training examples, never the held-out rows llama.cpp scores) must at least halve that gap, and are
    recorded."""
    nearest = q4_0_gap(taoke_main, sft / "sft", sft / "q4-nearest")
    gptq = q4_0_gap(taoke_main, sft / "sft", sft / "q4-gptq", "--gptq")
    assert gptq < 0.5 * nearest, (gptq, nearest)
    if gptq < 0.10:
        quant = read_json(sft / "q4-gptq" / "lineage.json")["export"]["quantization"]
        assert quant["method"] == "gptq" and quant["calibration"]["split"] == "train"
        assert quant["norm_tweak"]["tensors"] == 2 * 30 + 1   # every RMSNorm gain, tuned to the codes


def test_exporting_at_the_base_gguf_own_type_is_flagged_in_lineage(sft, taoke_main):
    # the built-in SmolLM2 base ships as a Q4_1 GGUF: a Q4_1 export would round the fine-tune back onto its grid
    code, out, err = taoke_main("export", sft / "sft", "--format", "gguf", "--quant", "Q4_1", "--no-check", "--json")
    assert code == 0, err
    warnings = json.loads(out)["export"]["warnings"]
    assert len(warnings) == 1 and "stored at Q4_1" in warnings[0] and "Q4_0" in warnings[0]


def test_adapter_only_run_is_merged_on_the_way_out(sft, taoke_main):
    from transformers import AutoModelForCausalLM

    run_cli("derive", "recipes/sft-lora.yaml", "--out", sft / "adapter", "--set", "adapt.merge=false", *SFT)
    code, _, err = taoke_main("export", sft / "adapter", "--format", "gguf", "--quant", "F16")
    assert code == 0, err
    code, out, err = taoke_main("export", sft / "adapter", "--format", "hf", "--json")
    assert code == 0, err
    assert json.loads(out)["export"]["parity"]["max_logit_diff"] <= json.loads(out)["export"]["parity"]["tolerance"]
    plain = AutoModelForCausalLM.from_pretrained(sft / "adapter-hf" / "model")
    assert plain.config.num_hidden_layers == 30


def test_pruned_smollm_loads_in_plain_transformers(sft, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "pruned"
    run_cli("derive", "recipes/sft-full.yaml", "--out", out, "--set", "edits=[{prune: {mlp: 0.25, heads: 0.34, "
            "by: magnitude}}]", *SFT)
    plain = AutoModelForCausalLM.from_pretrained(out / "model")
    assert plain.config.intermediate_size == 1152 and plain.config.num_key_value_heads == 2
    assert plain.config.num_attention_heads == 6
    with torch.no_grad():
        assert torch.isfinite(plain(input_ids=torch.tensor([[1, 2, 3]])).logits).all()
    comp = read_json(out / "lineage.json")["metrics"]["compression"]
    assert len(comp) == 3
