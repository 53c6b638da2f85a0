"""Would log-probs make `verify --endpoint` better? Log-prob similarities against the shipped greedy test, one zoo.

    .venv/bin/python bench/verify_endpoint_logprobs.py [--work DIR] [--steps 150] [--no-append]

The zoo and the pairs are bench/verify_endpoint.py's (built there, or here into the same --work), without servers:
each endpoint model is run locally and its answer tokens and top-20 log-probs are taken with the function
`taoke serve` reports them with (engine.token_logprobs), so what is measured is the statistic, not the transport.

For every (endpoint, REF) pair and every candidate similarity, the shipped test decides: paired sign-flip p of
sim(E, REF) - sim(E, c) per prompt, Holm over the panel (the other base models minus the endpoint's own origin),
derived at p <= 0.01. Candidates, each a mean over the endpoint's answer positions of a prompt:
- greedy: free-running greedy answers compared token by token, the baseline;
- specific: the same, less the mean similarity to M's answers to the other prompts (what `verify --endpoint`
  tests by default since 2026-12-07);
- argmax: M's most likely token, fed the endpoint's own answer (teacher forcing), equals the endpoint's token;
- overlap: share of the endpoint's top-20 tokens that are in M's top-20 there;
- tv: 1 - total variation between the endpoint's top-20 distribution and M's on the same 20 tokens (renormalised);
- spearman: rank correlation of the endpoint's top-20 log-probs and M's log-probs of those tokens;
- each also on the first 4 positions only (less teacher forcing, so less pull towards the most fluent model).
Tokens are compared as decoded strings, as the API gives them; M's log-prob of a string sums its ids' mass.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from results import record  # noqa: E402

from bench.verify_endpoint import build_zoo, local  # noqa: E402

TOP_K, MAX_TOKENS, FIRST = 20, 32, 4
KINDS = ("greedy", "specific", "argmax", "overlap", "tv", "spearman")


def chat_texts(tok, prompts):
    return [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts]


def endpoint_tokens(d: Path, prompts, cache: Path):
    """Per prompt: (answer ids, answer pieces, top-20 [(piece, log-prob)] per position), greedy, as served."""
    import torch

    from taoke.lm.load import load_causal_lm
    from taoke.ship.serve.engine import token_logprobs

    f = cache / f"{hashlib.sha256(str(d).encode()).hexdigest()[:16]}.gen.json"
    if f.exists():
        return json.loads(f.read_text())   # JSON, not pickle: a cache is a file anyone could swap
    model, tok = load_causal_lm(str(d))
    eos = model.generation_config.eos_token_id
    stop = set(eos if isinstance(eos, list) else [eos]) | {tok.eos_token_id}
    out = []
    with torch.no_grad():
        for text in chat_texts(tok, prompts):
            ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            g = model.generate(input_ids=ids, max_new_tokens=MAX_TOKENS, do_sample=False, output_logits=True,
                               return_dict_in_generate=True, pad_token_id=tok.eos_token_id)
            answer, tops = [], []
            for t, logits in zip(g.sequences[0, ids.shape[1]:].tolist(), g.logits):
                if t in stop:
                    break
                _, top = token_logprobs(logits[0], t, TOP_K)
                answer.append(t)
                tops.append([(tok.decode([i]), v) for i, v in top])
            out.append((answer, [tok.decode([t]) for t in answer], tops))
    f.write_text(json.dumps(out))
    return out


def model_view(d: Path, prompts, endpoints: dict, cache: Path):
    """For root model M and every endpoint: per prompt, per position of the endpoint's answer that M can follow
    (its own tokenisation spells the same pieces): (M's log-probs of the endpoint's top-20 pieces, M's top-20)."""
    import torch

    from taoke.lm.load import load_causal_lm

    f = cache / f"{hashlib.sha256(str(d).encode()).hexdigest()[:16]}.view.json"
    if f.exists():
        return json.loads(f.read_text())   # JSON, not pickle: a cache is a file anyone could swap
    model, tok = load_causal_lm(str(d))
    ids_of: dict[str, list[int]] = {}
    for i in range(len(tok)):
        ids_of.setdefault(tok.decode([i]), []).append(i)
    view = {}
    with torch.no_grad():
        for name, answers in endpoints.items():
            rows = []
            for text, (_, pieces, tops) in zip(chat_texts(tok, prompts), answers):
                follow = tok("".join(pieces), add_special_tokens=False)["input_ids"]
                n = 0
                while n < min(len(follow), len(pieces)) and tok.decode([follow[n]]) == pieces[n]:
                    n += 1
                ids = tok(text, add_special_tokens=False)["input_ids"]
                lp = model(input_ids=torch.tensor([ids + follow[:n]])).logits[0, len(ids) - 1:].float().log_softmax(-1)
                per = []
                for t in range(min(n + 1, len(pieces))):
                    q = lp[t]
                    mine = [float(torch.logsumexp(q[ids_of[s]], 0)) if s in ids_of else -30.0 for s, _ in tops[t]]
                    per.append((mine, [tok.decode([i]) for i in q.topk(TOP_K).indices.tolist()]))
                rows.append(per)
            view[name] = rows
    f.write_text(json.dumps(view))
    return view


def position_similarity(kind: str, piece: str, top, mine, m_top) -> float:
    e = np.array([v for _, v in top])
    m = np.clip(np.array(mine), -30.0, 0.0)
    if kind == "argmax":
        return float(m_top[0] == piece)
    if kind == "overlap":
        return len({s for s, _ in top} & set(m_top)) / TOP_K
    if kind == "tv":
        pe, pm = np.exp(e - e.max()), np.exp(m - m.max())
        return float(1 - 0.5 * np.abs(pe / pe.sum() - pm / pm.sum()).sum())
    from scipy.stats import spearmanr

    r = spearmanr(e, m).statistic
    return 0.0 if np.isnan(r) else float(r)


def prompt_similarities(kind: str, answers, rows, first: int | None) -> np.ndarray:
    """Mean per prompt; a position M cannot follow counts as 0 (it cannot spell what the endpoint said)."""
    out = []
    for (_, pieces, tops), per in zip(answers, rows):
        n = len(pieces) if first is None else min(len(pieces), first)
        vals = [position_similarity(kind, pieces[t], tops[t], *per[t]) if t < len(per) else 0.0 for t in range(n)]
        out.append(float(np.mean(vals)) if vals else 1.0)
    return np.array(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "taoke" / "verify-endpoint")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--n-prompts", type=int, default=64)
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    import torch
    from transformers import AutoTokenizer

    from taoke.provenance.endpoint import (DERIVED_P, answer_similarity, holm, load_prompts, prompt_specific,
                                          sign_flip_p, similarity_matrix)

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    endpoints, roots = build_zoo(args.work, args.steps)
    prompts = load_prompts(n=args.n_prompts)
    cache = args.work / "logprobs"
    cache.mkdir(exist_ok=True)
    answers = {name: endpoint_tokens(d, prompts, cache) for name, (d, _) in endpoints.items()}
    views = {name: model_view(d, prompts, answers, cache) for name, d in roots.items()}
    tok = AutoTokenizer.from_pretrained(next(iter(roots.values())))   # the zoo shares SmolLM2's tokenizer
    (args.work / "answers").mkdir(exist_ok=True)   # verify_endpoint.py's cache of the bases' greedy answers
    greedy = {name: [tok.encode(a, add_special_tokens=False)
                     for a in local(name, d, prompts, MAX_TOKENS, args.work / "answers")] for name, d in roots.items()}
    said = {name: [tok.encode(tok.decode(a, skip_special_tokens=True).strip(), add_special_tokens=False)
                   for a, _, _ in gens] for name, gens in answers.items()}   # the endpoints' answers, as judge reads

    def sims(kind, first, ename, root):
        if kind == "greedy":
            return np.array([answer_similarity(x, y, MAX_TOKENS) for x, y in zip(said[ename], greedy[root])])
        if kind == "specific":   # what `verify --endpoint` tests by default: greedy, less the other prompts' baseline
            return prompt_specific(similarity_matrix(said[ename], greedy[root], MAX_TOKENS))
        return prompt_similarities(kind, answers[ename], views[root][ename], first)

    lines = ["| similarity | positions | precision | recall | derived calls on unrelated pairs | largest p, derived |",
             "|---|---|---:|---:|---:|---:|"]
    for kind in KINDS:
        for first in ((None,) if kind in ("greedy", "specific") else (None, FIRST)):
            rows = []
            for ename, (_, origin) in endpoints.items():
                s = {r: sims(kind, first, ename, r) for r in roots}
                for ref in roots:
                    panel = [c for c in roots if c not in (ref, origin)]
                    p = max(holm([sign_flip_p(s[ref] - s[c]) for c in panel]))
                    rows.append((origin == ref, p))
            called = [truth for truth, p in rows if p <= DERIVED_P]
            pos = sum(truth for truth, _ in rows)
            lines.append(f"| {kind} | {'all' if first is None else f'first {first}'} | "
                         f"{sum(called) / max(1, len(called)):.3f} ({sum(called)}/{len(called)}) | "
                         f"{sum(called) / pos:.3f} ({sum(called)}/{pos}) | "
                         f"{len(called) - sum(called)}/{len(rows) - pos} | "
                         f"{max(p for truth, p in rows if truth):.3g} |")
            print(lines[-1], flush=True)
    text = (f"{len(endpoints)} endpoints x {len(roots)} REFs, {args.n_prompts} prompts, {MAX_TOKENS} tokens, top "
            f"{TOP_K} log-probs, derived at p <= {DERIVED_P:g}; whole run {time.perf_counter() - t0:.0f} s.\n\n"
            + "\n".join(lines) + "\n")
    print("\n" + text)
    if not args.no_append:
        from bench.verify_suite import machine

        record(f"\n## verify --endpoint: log-prob similarities against greedy — "
               f"{dt.datetime.now().strftime('%Y-%m-%d %H:%M')}\n\nMachine: {machine()}. Command: "
               f"`.venv/bin/python bench/verify_endpoint_logprobs.py --steps {args.steps}`.\n\n" + text)


if __name__ == "__main__":
    main()
