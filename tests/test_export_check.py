"""The GGUF export check's greedy comparison: strict agreement counts, and divergences at a near tie told apart from
real ones, on a tiny LLaMA whose log-probabilities the test reads itself."""

import torch

from taoke.ship.language import compare_greedy, near_tie_rule
from tests.lm_helpers import tiny_llama


def test_strict_agreement_counts_leading_tokens_and_early_stops():
    ref = [[1, 2, 3, 4], [1, 2, 3, 4], [5, 6], [7, 8, 9, 9]]
    other = [[1, 2, 3, 4], [1, 2, 9, 4], [5, 6], [7, 8, 9, 1]]
    g = compare_greedy(ref, other, need=3)
    assert [p["agree"] for p in g["per_prompt"]] == [4, 2, 2, 3]
    assert [p["ok"] for p in g["per_prompt"]] == [True, False, True, True]   # [5, 6] == [5, 6]: both ended early
    assert g["agree_first_3"] == 3 and g["share"] == 0.75 and g["diverge_at_near_tie"] == 0


def test_near_ties_are_counted_apart_and_only_for_diverging_prompts():
    calls = []

    def rule(i, k):
        calls.append((i, k))
        return i == 1

    g = compare_greedy([[1, 2, 3], [1, 2, 3], [4, 5, 6]], [[1, 2, 3], [1, 9, 3], [8, 5, 6]], need=3, near_tie=rule)
    assert calls == [(1, 1), (2, 0)]   # agreeing prompts are never asked about
    assert g["agree_first_3"] == 1 and g["diverge_at_near_tie"] == 1
    assert g["share_with_near_ties"] == 2 / 3 and g["share"] == 1 / 3


@torch.no_grad()
def test_near_tie_rule_accepts_the_runner_up_within_the_noise_only():
    model = tiny_llama(seed=0).eval()
    prompt = [1, 400, 1200, 77]
    logp = torch.log_softmax(model(input_ids=torch.tensor([prompt])).logits[0, -1], -1)
    order = logp.argsort(descending=True).tolist()
    first, second, third = order[:3]
    margin = float(logp[first] - logp[second])
    ref = [[first, 5]]
    assert near_tie_rule(model, [prompt], ref, [[second, 5]], noise=margin + 1e-3)(0, 0)
    assert not near_tie_rule(model, [prompt], ref, [[second, 5]], noise=margin / 2)(0, 0)
    wide = float(logp[first] - logp[third]) + 1.0
    assert not near_tie_rule(model, [prompt], ref, [[third, 5]], noise=wide)(0, 0)   # third-ranked: not a tie
    # the divergence is read at its own position: after the shared first token
    nxt = torch.log_softmax(model(input_ids=torch.tensor([prompt + [first]])).logits[0, -1], -1)
    a, b = nxt.argsort(descending=True)[:2].tolist()
    gap = float(nxt[a] - nxt[b])
    assert near_tie_rule(model, [prompt], [[first, a]], [[first, b]], noise=gap + 1e-3)(0, 1)
    assert not near_tie_rule(model, [prompt], [[first]], [[first, b]], noise=10.0)(0, 1)   # one stopped: no tie
