"""Merges of two or more parents: weights from the weights, verify --parent, lineage edges with weights.

The merges are built by hand here (numpy, mergekit's linear and layer-wise recipes), never by the code under test."""

import json

import numpy as np
import pytest

from bench import verify_models as suite
from taoke.errors import ModelError
from taoke.provenance.merge import merge_weights
from taoke.provenance.tree import build_tree
from tests.lineage_tiny import finetune_like, load, save, tiny_llama


@pytest.fixture(scope="module")
def kin(module_tmp):
    root = module_tmp
    base = tiny_llama(root / "base", seed=0)
    return {"root": root, "base": base,
            "ft1": finetune_like(base, root / "ft1", scale=0.3, seed=5),
            "ft2": finetune_like(base, root / "ft2", scale=0.3, seed=6),
            "ft3": finetune_like(base, root / "ft3", scale=0.3, seed=7)}


def linear_merge(d, parents, weights, per_layer=None, card_base=None):
    """mergekit's `linear` by hand: every tensor is sum_i w_i * parent_i (per_layer: layer index -> weights)."""
    sds = [load(p)[0] for p in parents]
    cfg = load(parents[0])[1]
    out = {}
    for k in sds[0]:
        w = weights
        if per_layer is not None and ".layers." in k:
            w = per_layer(int(k.split(".layers.")[1].split(".")[0]))
        out[k] = sum(wi * sd[k] for wi, sd in zip(w, sds))
    return save(d, out, cfg, card_base)


def test_two_parent_linear_merge_recovers_the_weights(kin, tmp_path):
    merged = linear_merge(tmp_path / "m", [kin["ft1"], kin["ft2"]], [0.3, 0.7])
    est = merge_weights(str(merged), [str(kin["ft1"]), str(kin["ft2"])])
    assert est.verdict == "merge", est.evidence
    assert np.allclose(est.weights, [0.3, 0.7], atol=0.01) and est.explained > 0.99


def test_three_parents_and_layer_wise_weights(kin, tmp_path):
    parents = [kin["ft1"], kin["ft2"], kin["ft3"]]
    merged = linear_merge(tmp_path / "m3", parents, [0.2, 0.3, 0.5])
    est = merge_weights(str(merged), [str(p) for p in parents])
    assert est.verdict == "merge" and np.allclose(est.weights, [0.2, 0.3, 0.5], atol=0.01)
    # a gradient merge: layer i takes (1 - t, t) with t = i / 3 (mergekit's list-valued weight)
    graded = linear_merge(tmp_path / "g", parents[:2], [0.5, 0.5], per_layer=lambda i: (1 - i / 3, i / 3))
    est = merge_weights(str(graded), [str(p) for p in parents[:2]])
    got = [row["weights"][1] for row in est.per_layer]
    assert np.allclose(got, [0, 1 / 3, 2 / 3, 1], atol=0.01), est.per_layer
    assert est.verdict == "merge" and est.explained < 0.9 < est.explained_by_layer
    assert any("differ by layer" in e for e in est.evidence)


def test_a_fine_tune_of_one_parent_is_not_a_merge(kin, tmp_path):
    child = finetune_like(kin["ft1"], tmp_path / "c", scale=0.3, seed=11)
    est = merge_weights(str(child), [str(kin["ft1"]), str(kin["ft2"])])
    assert est.verdict != "merge" and max(est.explained, est.explained_by_layer) < 0.9, est.evidence


def test_parents_of_another_architecture_are_refused(kin):
    with pytest.raises(ModelError, match="no tensors shared"):
        merge_weights(str(kin["ft1"]), ["minilm-l6", str(kin["ft2"])])
    with pytest.raises(ModelError, match="two or more"):
        merge_weights(str(kin["ft1"]), [str(kin["ft2"])])


def test_verify_parent_option_reports_the_merge(kin, tmp_path, taoke_main):
    merged = linear_merge(tmp_path / "m", [kin["ft1"], kin["ft2"]], [0.6, 0.4])
    code, out, err = taoke_main("verify", kin["ft1"], merged, "--parent", kin["ft2"], "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["verdict"] == "derived" and res["merge"]["verdict"] == "merge"
    assert np.allclose(res["merge"]["weights"], [0.6, 0.4], atol=0.01)
    assert set(res["merge"]["verdicts"].values()) == {"derived"}
    code, out, err = taoke_main("verify", kin["ft1"], merged, "--parent", kin["ft2"])
    assert code == 0 and "merge: merge" in out and "weight 0.600" in out


def test_lineage_draws_both_parents_with_their_weights(kin, tmp_path):
    root = tmp_path / "models"
    for name in ("ft1", "ft2"):
        save(root / name, *load(kin[name]))
    linear_merge(root / "merged", [root / "ft1", root / "ft2"], [0.25, 0.75], card_base=None)
    (root / "merged" / "README.md").write_text("---\nbase_model:\n- ft1\n- ft2\nbase_model_relation: merge\n---\n")
    tree = build_tree(root)
    into = {e["parent"]: e for e in tree["edges"] if e["child"] == "merged"}
    assert set(into) == {"ft1", "ft2"} and all(e["status"] == "confirmed" for e in into.values())
    assert into["ft1"]["merge_weight"] == pytest.approx(0.25, abs=0.01)
    assert into["ft2"]["merge_weight"] == pytest.approx(0.75, abs=0.01)
    node = next(n for n in tree["nodes"] if n["id"] == "merged")
    assert node["merge"]["verdict"] == "merge"


@pytest.mark.slow   # 55 s on SmolLM2; the tiny-model merges above cover the method
def test_real_merge_of_smollm2_and_its_lora_variant(tmp_path):
    """Real weights: SmolLM2-135M and a LoRA-merged variant of it (peft), merged 0.4 / 0.6 by hand."""
    root = tmp_path
    base = suite.smollm2_hf(root)
    lora = suite.lora_merged(root, base)
    sd_a, cfg = suite._load_hf(base)
    sd_b, _ = suite._load_hf(lora)
    merged = suite._save_hf(root / "merged", {k: 0.4 * sd_a[k] + 0.6 * sd_b[k] for k in sd_a}, cfg)
    est = merge_weights(str(merged), [str(base), str(lora)])
    assert est.verdict == "merge" and np.allclose(est.weights, [0.4, 0.6], atol=0.01), est.evidence
