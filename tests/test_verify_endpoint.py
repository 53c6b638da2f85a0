"""`taoke verify --endpoint`: the black-box test against real `taoke serve` processes on loopback.

Models: tiny LLaMAs with SmolLM2's tokenizer and chat template built by the test (random weights of different seeds:
unrelated models), and one of them fine-tuned on other text (a derived model). Tiny models trained from scratch in
seconds answer every prompt alike ("a a a ..."), which no test can tell apart; random ones answer each prompt
differently. bench/verify_endpoint.py runs the same test on SmolLM2-135M, its fine-tunes and trained models."""

import itertools
import json

import numpy as np
import pytest

from tests.conftest import run_cli
from tests.serve_helpers import Server

from taoke.provenance.endpoint import (answer_similarity, holm, judge, load_prompts, prompt_specific, sign_flip_p,
                                      similarity_matrix)


# ------------------------------------------------------------------------------------------------ units

def test_answer_similarity_counts_positions_of_the_longer_answer():
    assert answer_similarity([1, 2, 3], [1, 2, 3], 32) == 1.0
    assert answer_similarity([1, 2, 3, 4], [1, 9, 3], 32) == 0.5       # 2 of 4 positions
    assert answer_similarity([], [], 32) == 1.0
    assert answer_similarity([], [5], 32) == 0.0
    assert answer_similarity([1, 2, 7, 7], [1, 2, 8, 8], 2) == 1.0      # only the first max_tokens count


def test_similarity_matrix_is_answer_similarity_of_every_pair():
    a = [[1, 2, 3], [], [4, 4, 4, 4], [1, 2, 9, 9, 9]]
    b = [[1, 2, 3, 5], [], [4], [7, 2, 9]]
    sim = similarity_matrix(a, b, 4)
    assert sim.shape == (4, 4)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            assert sim[i, j] == pytest.approx(answer_similarity(x, y, 4)), (i, j)


def test_prompt_specific_takes_off_what_an_answer_shares_with_answers_to_other_prompts():
    # worked by hand: row 0 -> 1 - (1 + 1) / 2 = 0 (like every answer: nothing specific); row 1 -> 0.5 - (0 + 0) / 2
    # = 0.5; row 2 -> 0 - (1 + 0) / 2 = -0.5
    sim = np.array([[1.0, 1.0, 1.0], [0.0, 0.5, 0.0], [1.0, 0.0, 0.0]])
    assert prompt_specific(sim) == pytest.approx([0.0, 0.5, -0.5])


def test_sign_flip_p_matches_exact_enumeration():
    """The Monte Carlo randomisation p against the exact one over all 2^n sign vectors."""
    diff = np.array([0.3, 0.1, -0.05, 0.2, 0.0, 0.15, -0.1, 0.25, 0.05, 0.1])
    exact_null = [np.mean(np.array(s) * diff) for s in itertools.product((-1, 1), repeat=len(diff))]
    exact = np.mean([t >= diff.mean() - 1e-12 for t in exact_null])
    assert abs(sign_flip_p(diff) - exact) < 0.01
    assert sign_flip_p(np.full(30, 0.5)) == pytest.approx(1 / 10000)   # the floor: 1 / (draws + 1)
    assert sign_flip_p(-np.abs(diff)) > 0.9


def test_holm_against_worked_example():
    # p = (0.01, 0.04, 0.03): sorted 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> kept monotone at 0.06
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5]) == [0.5]


def test_judge_from_answers():
    from tests.lm_helpers import smollm_tokenizer

    tok = smollm_tokenizer()
    ref = [f"answer number {i} is about {w}" for i, w in enumerate("sea sky tea cat dog sun moon rain".split() * 3)]
    other = [f"a different reply, {i}, on the {w}" for i, w in enumerate("hat pen cup box key car bus map".split() * 3)]
    third = [f"nothing like it: {w} {i}" for i, w in enumerate("red blue green gold pink grey teal navy".split() * 3)]
    copy = judge(ref, ref, {"b": other, "c": third}, tok)
    assert (copy["verdict"], copy["relation"]) == ("derived", "copy")
    assert copy["p_value"] <= 0.01 and copy["layers"] == []
    unrelated = judge(other, ref, {"c": third, "d": other}, tok)     # the endpoint is control d
    assert unrelated["verdict"] == "independent"
    assert any("more like control d" in e for e in unrelated["evidence"])
    with pytest.raises(Exception, match="at least one control"):
        judge(ref, ref, {}, tok)


def test_shared_habits_without_shared_answers_are_not_derivation():
    """Two models that say the same thing whatever they are asked (trained on the same text, say) agree on every
    prompt; a model that shares none of that habit agrees on none. Plain similarity calls that derivation; the
    prompt-specific statistic does not, and still finds a real copy (answers that follow the prompt)."""
    from tests.lm_helpers import smollm_tokenizer

    tok = smollm_tokenizer()
    words = "sea sky tea cat dog sun moon rain hat pen cup box".split() * 2
    habit = ["the the poem of the moon the the"] * len(words)
    endpoint = [f"the the poem of the moon, {w}" for w in words]       # the habit, a word on the end that varies
    panel = {"b": [f"a reply on the {w}" for w in reversed(words)], "c": [f"{w} {i}" for i, w in enumerate(words)]}
    plain = judge(endpoint, habit, panel, tok, specific=False)
    assert plain["verdict"] == "derived"            # the confound this statistic removes
    assert judge(endpoint, habit, panel, tok)["verdict"] != "derived"
    copy = judge(panel["c"], panel["c"], {"b": panel["b"], "d": habit}, tok)
    assert copy["verdict"] == "derived" and copy["similarity"]["specific"] > 0.5


def test_probe_prompts_are_fixed_and_bounded(tmp_path):
    prompts = load_prompts()
    assert len(prompts) == 64 and len(set(prompts)) == 64
    assert load_prompts(n=10) == prompts[:10]
    f = tmp_path / "p.txt"
    f.write_text("# comment\nfirst\n\nsecond\n")
    assert load_prompts(f) == ["first", "second"]
    with pytest.raises(Exception, match="between 1 and"):
        load_prompts(n=5000)


# ------------------------------------------------------------------------------------------------ end to end

@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """base-0..3: tiny LLaMAs with SmolLM2's tokenizer and chat template, random weights of seeds 0-3 (unrelated
    models whose greedy answers depend on the prompt); child-0: base-0 fine-tuned on the shipped instructions."""
    import torch

    from bench.verify_calibration import texts
    from bench.verify_models import train_on_ids
    from tests.lm_helpers import smollm_tokenizer, tiny_llama

    root = tmp_path_factory.mktemp("endpoint-zoo")
    tok = smollm_tokenizer()
    zoo = {}
    for name, seed in (("base-0", 0), ("base-1", 1), ("base-2", 2), ("base-3", 3), ("child-0", 0)):
        model = tiny_llama(seed=seed)
        if name == "child-0":
            ids = torch.tensor(tok("\n".join(texts("alpaca")))["input_ids"])
            train_on_ids(model, ids, 20, lr=1e-4, seed=7, batch=8, seq=64)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        zoo[name] = root / name
    return zoo


def _verify(url, ref, controls, *extra):
    args = ["verify", "--endpoint", url + "/v1", ref, *[x for c in controls for x in ("--control", c)],
            "--n-prompts", "32", "--max-tokens", "16", "--rps", "50", "--json", *extra]
    return json.loads(run_cli(*args).stdout)


@pytest.mark.slow   # 80 s: three servers, six models; the judging is unit-tested above
def test_served_derived_model_is_found_and_unrelated_one_is_not(zoo):
    controls = [zoo["base-1"], zoo["base-2"]]
    with Server(zoo["child-0"], "--model-name", "shell") as server:
        derived = _verify(server.url, zoo["base-0"], controls)
    assert derived["verdict"] == "derived", derived["evidence"]
    assert derived["p_value"] <= 0.01 and derived["endpoint"]["model"] == "shell"
    assert derived["similarity"]["reference"] > max(c["similarity"] for c in derived["controls"])
    assert [p["weight_verdict"] for p in derived["panel"]] == ["independent", "independent"]
    with Server(zoo["base-3"], "--model-name", "other") as server:
        unrelated = _verify(server.url, zoo["base-0"], controls)
        assert unrelated["verdict"] != "derived", unrelated["evidence"]
        # completions API: the same test on raw-text continuations
        raw = _verify(server.url, zoo["base-0"], controls, "--api", "completions")
        assert raw["verdict"] != "derived" and raw["endpoint"]["api"] == "completions"


def test_endpoint_bad_input(zoo, free_port_url="http://127.0.0.1:9/v1"):
    def failing(*args):    # the error as one line, however rich wraps it
        proc = run_cli(*args, check=False)
        proc.stderr = " ".join(proc.stderr.split())
        return proc

    proc = failing("verify", "--endpoint", free_port_url, zoo["base-0"], "--control", zoo["base-1"],
                   "--n-prompts", "2")
    assert proc.returncode == 2 and "cannot reach the endpoint" in proc.stderr
    proc = failing("verify", "--endpoint", free_port_url, zoo["base-0"])
    assert proc.returncode == 2 and "at least one control" in proc.stderr
    # with --model named, the endpoint is not asked for its models: the control panel is checked before any request
    proc = failing("verify", "--endpoint", free_port_url, zoo["base-0"], "--control", zoo["child-0"], "--model", "x")
    assert proc.returncode == 2 and "must not share REF's origin" in proc.stderr
    proc = failing("verify", "--endpoint", "127.0.0.1:8000", zoo["base-0"], "--control", zoo["base-1"])
    assert proc.returncode == 2 and "http(s) URL" in proc.stderr
    proc = failing("verify", zoo["base-0"])
    assert proc.returncode == 2 and "give two models" in proc.stderr


@pytest.mark.slow
def test_transformers_serve_endpoint(zoo, tmp_path):
    """The same test against transformers' own OpenAI-compatible server (`transformers serve`), a peer's API."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    from tests.serve_helpers import free_port, http

    port = free_port()
    exe = Path(sys.executable).parent / "transformers"
    with open(tmp_path / "hf.log", "w") as log:
        proc = subprocess.Popen([str(exe), "serve", str(zoo["child-0"]), "--device", "cpu", "--dtype", "float32",
                                 "--host", "127.0.0.1", "--port", str(port)], stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 300
        while time.monotonic() < end and proc.poll() is None:
            try:
                if http("GET", url + "/v1/models", timeout=2)[0] == 200:
                    break
            except OSError:
                time.sleep(0.5)
        assert proc.poll() is None, (tmp_path / "hf.log").read_text()[-2000:]
        res = _verify(url, zoo["base-0"], [zoo["base-1"], zoo["base-2"]], "--model", str(zoo["child-0"]))
        assert res["verdict"] == "derived", res["evidence"]
        other = _verify(url, zoo["base-3"], [zoo["base-1"], zoo["base-2"]], "--model", str(zoo["child-0"]))
        assert other["verdict"] != "derived", other["evidence"]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
