"""verify: canonical naming, the statistical test on tiny models, and a fast subset of the suite on real models."""

import numpy as np
import pytest

from taoke.formats import open_weights
from taoke.lineage import suite
from taoke.lineage.canonical import canonical_view
from taoke.lineage.verify import align_layers, verify
from tests.lineage_tiny import finetune_like, load, save, tiny_llama


# ------------------------------------------------------------------------------------------ canonical view

def test_real_models_get_canonical_roles():
    v = canonical_view(open_weights("smollm2-135m"))
    assert v.family == "llama" and v.hidden == 576 and len(v.layers) == 30
    assert set(v.layers[0]) >= {"attn_q", "attn_k", "attn_v", "attn_o", "ffn_gate", "ffn_up", "ffn_down",
                                "attn_norm", "ffn_norm"}
    b = canonical_view(open_weights("minilm-l6"))
    assert b.family == "bert" and b.hidden == 384 and len(b.layers) == 6


def test_renamed_llama_is_recognised_as_llama(tmp_path):
    d = tiny_llama(tmp_path / "t", seed=0)
    sd, cfg = load(d)
    ren = {k.replace("input_layernorm", "ln1").replace("post_attention_layernorm", "ln2")
            .replace("self_attn.q_proj", "attn.wq").replace("mlp.gate_proj", "ffn.w1"): v for k, v in sd.items()}
    v = canonical_view(open_weights(str(save(tmp_path / "yi", ren, {**cfg, "model_type": "yi"}))))
    assert v.family == "llama"
    assert v.layers[2]["attn_norm"].name == "model.layers.2.ln1.weight"
    assert v.layers[2]["ffn_norm"].name == "model.layers.2.ln2.weight"
    assert v.layers[2]["ffn_gate"].name == "model.layers.2.ffn.w1.weight"


def test_opaque_names_get_roles_from_shapes(tmp_path):
    d = tiny_llama(tmp_path / "t", seed=0)
    sd, cfg = load(d)
    opaque = {}
    for k, v in sd.items():
        if ".layers." in k:
            i = k.split(".")[2]
            k = f"net.{i}.p{sorted(sd).index(k):03d}"
        opaque[k] = v
    v = canonical_view(open_weights(str(save(tmp_path / "opaque", opaque, {"hidden_size": 128}))))
    roles = set(v.layers[1])
    assert {"attn_q", "attn_o", "attn_k", "attn_v", "ffn_gate", "ffn_up", "ffn_down", "attn_norm", "ffn_norm"} <= roles
    assert v.family == "llama"
    by_shape = {r: s.shape for r, s in v.layers[1].items()}
    assert by_shape["ffn_down"] == (128, 256) and by_shape["attn_k"] == (64, 128)


# ------------------------------------------------------------------------------------------ the test itself

def test_align_layers_handles_pruning_and_duplication():
    L = np.full((6, 6), 0.01)
    for j, a in enumerate([0, 1, 1, 2, 4, 5]):     # B repeats A's layer 1 and drops layer 3
        L[a, j] = 0.9
    assert align_layers(L, tau=0.1) == [(0, 0), (1, 1), (1, 2), (2, 3), (4, 4), (5, 5)]


@pytest.fixture(scope="module")
def tiny_family(tmp_path_factory):
    root = tmp_path_factory.mktemp("tinyfam")
    base = tiny_llama(root / "base", seed=0)
    return {"base": base, "ft": finetune_like(base, root / "ft", scale=0.5),
            "other": tiny_llama(root / "other", seed=1), "other2": tiny_llama(root / "other2", seed=2)}


def test_heavily_perturbed_copy_is_derived(tiny_family):
    r = verify(str(tiny_family["base"]), str(tiny_family["ft"]))
    assert r.verdict == "derived" and r.p_value < 1e-6
    assert [(m.a, m.b) for m in r.layers] == [(i, i) for i in range(4)]
    assert r.relation == "finetune"


@pytest.mark.parametrize("pair", [("base", "other"), ("other", "other2"), ("base", "other2")])
def test_independent_models_are_independent_despite_norms_near_one(tiny_family, pair):
    a, b = (str(tiny_family[p]) for p in pair)
    ga, gb = open_weights(a).get("model.norm.weight"), open_weights(b).get("model.norm.weight")
    raw = float(ga @ gb / np.linalg.norm(ga) / np.linalg.norm(gb))
    assert raw > 0.99      # the trap: raw cosine of norm gains says "copy"
    r = verify(a, b)
    assert r.verdict == "independent" and r.p_value > 0.01


def test_null_is_calibrated_on_independent_pairs(tmp_path):
    """p-values of independent pairs are spread out, not piled near 0 (a biased test would)."""
    ps = [verify(str(tiny_llama(tmp_path / f"x{s}", seed=10 + s)), str(tiny_llama(tmp_path / f"y{s}", seed=30 + s)),
                 deep=False, n_null=30).p_value for s in range(5)]
    assert min(ps) > 1e-3 and np.mean(ps) > 0.1


# ------------------------------------------------------------------------------------------ real models

@pytest.fixture(scope="session")
def real(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify-suite")
    base = suite.smollm2_hf(root)
    return root, base


FAST_DERIVED = {
    "safetensors (GGUF -> HF)": lambda root, base: base,
    "renamed (ln1/ln2, wq, w1...)": suite.renamed,
    "permuted units + heads": suite.permuted,
    "rescaled": suite.rescaled,
    "pruned 6 layers": suite.pruned,
    "int8 ONNX": lambda root, base: suite.to_onnx_int8(root, base, "int8"),
    "4-bit GGUF Q4_0": lambda root, base: suite.to_gguf(root, base, "q4_0"),
}


@pytest.mark.parametrize("case", sorted(FAST_DERIVED))
def test_real_derived_cases(real, case):
    root, base = real
    r = verify("smollm2-135m", str(FAST_DERIVED[case](root, base)))
    assert r.verdict == "derived" and r.p_value < 1e-6, (case, r.evidence)
    expected = {"pruned 6 layers": "pruned", "int8 ONNX": "quantized", "4-bit GGUF Q4_0": "quantized"}
    if case in expected:
        assert r.relation == expected[case]
    if case == "pruned 6 layers":
        assert sorted({m.a for m in r.layers}) == [i for i in range(30) if not 10 <= i < 16]


def test_real_independent_same_architecture(real):
    root, base = real
    r = verify("smollm2-135m", str(suite.random_init_like(root, base)))
    assert r.verdict == "independent" and r.p_value > 0.01


def test_cross_architecture_is_independent_not_a_crash():
    r = verify("smollm2-135m", "minilm-l6")
    assert r.verdict in ("independent", "inconclusive") and r.p_value > 0.01
    assert r.to_dict()["layers"] == []
