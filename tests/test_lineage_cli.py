"""verify, diff, normalize and lineage through the real entry point (taoke.cli:main); lineage trees."""

import json

import numpy as np
import pytest

from tests.lineage_tiny import finetune_like, load, save, tiny_llama


@pytest.fixture(scope="module")
def fam(module_tmp):
    root = module_tmp
    base = tiny_llama(root / "base", seed=0)
    return {"root": root, "base": base, "other": tiny_llama(root / "other", seed=3)}


def test_verify_json_contract(fam, tmp_path, taoke_main):
    child = finetune_like(fam["base"], tmp_path / "child", scale=0.2)
    code, out, err = taoke_main("verify", fam["base"], child, "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["verdict"] == "derived" and res["p_value"] < 1e-6
    assert res["relation"] == "finetune"  # dense changes to every matrix, same storage type: fine-tuning
    assert len(res["layers"]) == 4 and {"names_a", "names_b", "similarity"} <= set(res["layers"][0])
    assert res["layers"][0]["names_a"] == res["layers"][0]["names_b"]  # same naming on both sides
    code, out, err = taoke_main("verify", fam["base"], fam["other"])
    assert code == 0 and "verdict: independent" in out


def test_unknown_reference_exits_2_with_a_message(fam, taoke_main):
    code, out, err = taoke_main("verify", fam["base"], "no-such-model-xyz")
    assert code == 2 and "unknown base 'no-such-model-xyz'" in err and "Traceback" not in err


def test_diff_writes_table_and_heatmap(fam, tmp_path, taoke_main):
    sd, cfg = load(fam["base"])
    keep = [0, 1, 3]   # drop layer 2
    pruned = {k: v for k, v in sd.items() if ".layers." not in k}
    for new, old in enumerate(keep):
        pre = f"model.layers.{old}."
        pruned.update({f"model.layers.{new}." + k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)})
    child = save(tmp_path / "pruned", pruned, {**cfg, "num_hidden_layers": 3})
    code, out, err = taoke_main("diff", fam["base"], child, "--out", tmp_path / "d", "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["relation"] == "pruned"
    assert [(r["a"], r["b"]) for r in rep["table"]] == [("blk.0", "blk.0"), ("blk.1", "blk.1"), ("blk.3", "blk.2")]
    assert any("not found in B: 2" in c for c in rep["changes"])
    png = (tmp_path / "d" / "diff_heatmap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_lineage_flags_undisclosed_and_contradicted(fam, tmp_path, taoke_main):
    root = tmp_path / "zoo"
    save(root / "base", *load(fam["base"]))
    finetune_like(fam["base"], root / "honest", scale=0.2, card_base="base")
    finetune_like(fam["base"], root / "shell", scale=0.2, seed=9)                 # claims nothing
    save(root / "liar", *load(fam["other"]), card_base="base")                   # claims base, is not
    code, out, err = taoke_main("lineage", root, "--out", tmp_path / "out", "--json")
    assert code == 0, err
    tree = json.loads(out)
    status = {(e["parent"], e["child"]): e["status"] for e in tree["edges"]}
    assert status[("base", "honest")] == "confirmed"
    assert status[("base", "liar")] == "contradicted"
    assert status.get(("base", "shell")) == "undisclosed" or status.get(("honest", "shell")) == "undisclosed"
    assert any("shell" in f for f in tree["flags"]) and any("liar" in f for f in tree["flags"])
    assert "graph TD" in tree["mermaid"]
    assert (tmp_path / "out" / "lineage_tree.png").exists() and (tmp_path / "out" / "lineage_tree.mmd").exists()


def test_normalize_renamed_tiny_gives_identical_logits(fam, tmp_path, taoke_main):
    import torch
    from transformers import AutoModelForCausalLM

    sd, cfg = load(fam["base"])
    ren = {k.replace("input_layernorm", "ln1").replace("post_attention_layernorm", "ln2")
            .replace("model.layers", "transformer.h"): v for k, v in sd.items()}
    src = save(tmp_path / "yi", ren, {**cfg, "architectures": ["YiForCausalLM"], "model_type": "yi"})
    code, out, err = taoke_main("normalize", src, tmp_path / "norm")
    assert code == 0, err
    ids = torch.tensor([[1, 5, 9, 200, 3, 77]])
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(str(fam["base"])).eval()(ids).logits
        b = AutoModelForCausalLM.from_pretrained(str(tmp_path / "norm")).eval()(ids).logits
    assert torch.equal(a, b)


@pytest.mark.slow   # covered in CI (make test-all); the default run keeps a faster sibling
def test_normalize_real_renamed_smollm2(tmp_path):
    """The renamed-LLaMA case becomes a model plain transformers loads, with the logits of the base it was renamed
    from. The base comes from transformers' own GGUF loader and save_pretrained (rope_theta 100000 under
    transformers 5's rope_parameters): a normalize that wrote the default rope_theta passed its own check but
    differed from this base by up to ~2."""
    import torch
    from transformers import AutoModelForCausalLM

    from bench import verify_models as suite
    from taoke.provenance.normalize import normalize

    base = suite.smollm2_hf(tmp_path)
    src = suite.renamed(tmp_path, base)
    with pytest.raises(Exception):
        AutoModelForCausalLM.from_pretrained(str(src))          # transformers cannot load the renamed checkpoint
    rep = normalize(str(src), tmp_path / "norm")
    assert rep["identical_logits"] and rep["family"] == "llama"
    ids = torch.tensor([[1, 504, 3000, 17, 9000, 2]])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(str(tmp_path / "norm"), dtype=torch.float32).eval()(ids).logits
    assert torch.equal(want, got)
    assert np.isfinite(got.numpy()).all()
