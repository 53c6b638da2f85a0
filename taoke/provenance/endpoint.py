"""`verify --endpoint URL REF`: does the model behind an OpenAI-compatible API derive from REF? (weights unseen)

The test of Model Provenance Testing (Nikolić, Baluta, Saxena; NeurIPS 2025), on greedy answers:

1. Ask. The endpoint answers a fixed prompt set (probe_prompts.txt, or the user's) greedily: temperature 0, a
   bounded number of prompts and tokens, at most `rps` requests a second, through the official `openai` client.
2. Answer locally. REF and every model of a control panel (models that do not derive from REF; the weight test
   checks that first) answer the same prompts the same way.
3. Similarity of two answers: the share of positions, over the longer answer (in REF's tokens, at most
   `max_tokens`), where both have the same token. Two empty answers are the same answer.
   Prompt-specific similarity (the default): the similarity of the two answers to the same prompt, less the mean
   similarity of the endpoint's answer to the model's answers to the other prompts. Two models trained on the same
   kind of text share words and habits whatever they are asked; a model derived from REF shares REF's answer to
   each prompt. Subtracting the mismatched-prompt baseline keeps the second and drops the first (on the bench's zoo
   it removed every false call made by models that answer all prompts alike; bench/RESULTS.md).
4. Test. For each control c, H0_c: "the endpoint is no closer to REF than to c". Statistic: the mean over prompts
   of sim(E, REF) - sim(E, c), sim being the prompt-specific similarity; p from random sign flips of the
   per-prompt differences (a paired randomisation test: exact when the two answers of a prompt are exchangeable,
   never below 1/(draws+1)). The endpoint derives
   from REF only if every H0_c falls, so p is the largest Holm-adjusted p over the panel.

The p-value is calibrated against the panel the user gives: a panel of models weaker or narrower than the
endpoint makes REF look close to any fluent model. bench/verify_endpoint.py measures the error rates on
served pairs; docs and README say what panel it used.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from taoke.errors import ModelError

PROMPTS_FILE = Path(__file__).with_name("probe_prompts.txt")
DERIVED_P = 0.01        # largest Holm-adjusted p at or below this: derived
INDEPENDENT_P = 0.05    # above this: no evidence that the endpoint is closer to REF than to the panel
COPY_SIM = 0.99         # mean similarity to REF at or above this: the endpoint answers as REF does
SIGN_FLIPS = 9999       # randomisation draws per control (p floor 1e-4)
MAX_PROMPTS = 1000      # a bound on what one check may send to someone's API


def load_prompts(path: str | os.PathLike | None = None, n: int | None = None) -> list[str]:
    """The probe prompts (one a line, '#' lines skipped): the built-in set, or a file of the user's."""
    src = Path(path) if path else PROMPTS_FILE
    try:
        lines = src.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ModelError(f"{src}: cannot read the prompts ({e.__class__.__name__}); give a UTF-8 text file with "
                         "one prompt a line") from None
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise ModelError(f"{src}: no prompts (one a line; lines starting with # are skipped)")
    n = len(prompts) if n is None else n
    if not 1 <= n <= MAX_PROMPTS:
        raise ModelError(f"--n-prompts must be between 1 and {MAX_PROMPTS}, not {n}")
    return (prompts * (n // len(prompts) + 1))[:n] if n > len(prompts) else prompts[:n]


# ------------------------------------------------------------------------------------------------ asking

class RateLimit:
    """At most `rps` calls a second across threads (start times spaced 1/rps apart)."""

    def __init__(self, rps: float):
        self.gap = 1.0 / rps if rps > 0 else 0.0
        self.next = time.monotonic()
        self.lock = threading.Lock()

    def wait(self) -> None:
        with self.lock:
            now = time.monotonic()
            at = max(now, self.next)
            self.next = at + self.gap
        time.sleep(max(0.0, at - now))


def _client(url: str, api_key: str | None, timeout: float):
    from openai import OpenAI

    key = api_key or os.environ.get("TAOKE_API_KEY") or os.environ.get("OPENAI_API_KEY") or "none"
    return OpenAI(base_url=url.rstrip("/"), api_key=key, timeout=timeout, max_retries=2)


def _api_failure(url: str, e: Exception) -> ModelError:
    import openai

    if isinstance(e, openai.AuthenticationError):
        return ModelError(f"{url}: the endpoint refused the key (401); give --api-key or TAOKE_API_KEY")
    if isinstance(e, openai.NotFoundError):
        return ModelError(f"{url}: not found (404): {str(e)[:200]}; check the URL (the API base, e.g. "
                          "http://host:8000/v1) and --model")
    if isinstance(e, openai.APIConnectionError):
        return ModelError(f"{url}: cannot reach the endpoint ({e.__class__.__name__}); is the server running?")
    if isinstance(e, openai.APIStatusError):
        return ModelError(f"{url}: the endpoint answered {e.status_code}: {str(e)[:200]}")
    return ModelError(f"{url}: {e.__class__.__name__}: {str(e)[:200]}")


def endpoint_model(url: str, api_key: str | None = None, timeout: float = 60.0) -> str:
    """The endpoint's only model id (GET /models); ModelError when it serves none or several."""
    import openai

    try:
        ids = [m.id for m in _client(url, api_key, timeout).models.list()]
    except openai.OpenAIError as e:
        raise _api_failure(url, e) from None
    if len(ids) != 1:
        raise ModelError(f"{url}: serves {len(ids)} models ({', '.join(ids[:5]) or 'none'}); name one with --model")
    return ids[0]


def ask_endpoint(url: str, prompts: list[str], *, model: str, max_tokens: int = 32, api: str = "chat",
                 api_key: str | None = None, rps: float = 4.0, concurrency: int = 4, timeout: float = 120.0,
                 progress: bool = True) -> list[str]:
    """Greedy answers of the endpoint to `prompts` (temperature 0, seed 0), at most `rps` requests a second."""
    import openai
    from rich.progress import Progress

    client, limit = _client(url, api_key, timeout), RateLimit(rps)

    def one(prompt: str) -> str:
        limit.wait()
        if api == "chat":
            r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                               max_tokens=max_tokens, temperature=0, seed=0)
            return (r.choices[0].message.content or "").strip()
        r = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, seed=0)
        return (r.choices[0].text or "").strip()

    answers: list[str] = [""] * len(prompts)
    with Progress(disable=not progress, transient=True) as bar, ThreadPoolExecutor(max(1, concurrency)) as pool:
        task = bar.add_task(f"asking {url}", total=len(prompts))
        futures = {pool.submit(one, p): i for i, p in enumerate(prompts)}
        try:
            for fut, i in futures.items():
                answers[i] = fut.result()
                bar.advance(task)
        except openai.OpenAIError as e:
            for f in futures:
                f.cancel()
            raise _api_failure(url, e) from None
    return answers


# ---------------------------------------------------------------------------------------------- answering

def local_answers(model, tokenizer, prompts: list[str], *, max_tokens: int = 32, api: str = "chat",
                  batch_size: int = 8) -> list[str]:
    """Greedy answers of a local model, prompted as the endpoint is: the chat template for `chat` (the raw prompt
    when the model has none), the raw prompt for `completions`, exactly as `taoke serve` tokenizes them."""
    import torch   # imported here: the argument checks and the judging need none of it (generate takes no grads)

    device = next(model.parameters()).device
    model.eval()
    chat = api == "chat" and bool(tokenizer.chat_template)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) if chat else p for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outs = []
    for i in range(0, len(texts), batch_size):
        rows = [tokenizer(t, add_special_tokens=not chat)["input_ids"] for t in texts[i:i + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False,
                             pad_token_id=pad)
        outs += tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
    return [o.strip() for o in outs]


def answers_of(ref: str, prompts: list[str], *, max_tokens: int = 32, api: str = "chat") -> tuple[list[str], object]:
    """(answers, tokenizer) of a model reference (library name, HF directory, run, GGUF) to the prompts."""
    from taoke.lm.load import load_causal_lm

    model, tok = load_causal_lm(ref)
    answers = local_answers(model, tok, prompts, max_tokens=max_tokens, api=api)
    del model
    return answers, tok


# ------------------------------------------------------------------------------------------------ judging

def answer_similarity(a: list[int], b: list[int], max_tokens: int) -> float:
    """Share of positions (over the longer of the two, at most max_tokens) where both answers hold the same token."""
    a, b = a[:max_tokens], b[:max_tokens]
    n = max(len(a), len(b))
    if n == 0:
        return 1.0
    return sum(x == y for x, y in zip(a, b)) / n


def similarity_matrix(a: list[list[int]], b: list[list[int]], max_tokens: int) -> np.ndarray:
    """S[i, j] = answer_similarity(a[i], b[j], max_tokens) for every pair of answers, vectorised."""
    def padded(rows, fill):
        out = np.full((len(rows), max_tokens), fill, dtype=np.int64)
        for i, r in enumerate(rows):
            out[i, :len(r[:max_tokens])] = r[:max_tokens]
        return out, np.array([min(len(r), max_tokens) for r in rows])

    (x, lx), (y, ly) = padded(a, -1), padded(b, -2)     # different fills: padding never matches padding
    # 64 rows at a time: 1000 prompts x 512 tokens at once would be a 512 MB comparison
    same = np.concatenate([(x[i:i + 64, None, :] == y[None, :, :]).sum(-1) for i in range(0, len(x), 64)]) \
        if len(x) else np.zeros((0, len(y)), dtype=np.int64)
    longer = np.maximum(lx[:, None], ly[None, :])
    return np.where(longer == 0, 1.0, same / np.maximum(longer, 1))


def prompt_specific(sim: np.ndarray) -> np.ndarray:
    """Per prompt i: sim[i, i] less the mean of sim[i, j], j != i (how much more the endpoint's answer to i is like
    the model's answer to i than like its answers to other prompts)."""
    n = len(sim)
    if n < 2:
        return np.diag(sim).copy()
    return np.diag(sim) - (sim.sum(axis=1) - np.diag(sim)) / (n - 1)


def sign_flip_p(diff: np.ndarray, draws: int = SIGN_FLIPS, seed: int = 0) -> float:
    """One-sided paired randomisation test of mean(diff) > 0: flip the sign of each difference at random."""
    diff = np.asarray(diff, dtype=np.float64)
    observed = diff.mean()
    signs = np.random.default_rng(seed).choice((-1.0, 1.0), size=(draws, len(diff)))
    null = (signs * diff).mean(axis=1)
    return float((1 + np.sum(null >= observed - 1e-12)) / (draws + 1))


def holm(ps: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone); a few lines, so no statsmodels dependency."""
    order = np.argsort(ps)
    adjusted, running = [0.0] * len(ps), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
        adjusted[i] = running
    return adjusted


def require_controls(controls) -> None:
    """Checked before any network call (verify_endpoint) and again by judge, which is also called on its own."""
    if not controls:
        raise ModelError("the black-box test needs at least one control model (--control REF2): a model that does "
                         "not derive from REF, to measure how close unrelated models come")


def judge(endpoint: list[str], reference: list[str], controls: dict[str, list[str]], tokenizer,
          max_tokens: int = 32, specific: bool = True) -> dict:
    """Verdict from the answers alone: the endpoint's, REF's and each control's to the same prompts. `specific`:
    test prompt-specific similarity (module docstring, step 3); False tests the plain per-prompt similarity."""
    require_controls(controls)

    if any(len(a) != len(endpoint) for a in (reference, *controls.values())):
        raise ValueError("every model must answer the same prompts")

    def ids(texts: list[str]) -> list[list[int]]:
        return [tokenizer.encode(t, add_special_tokens=False) for t in texts]

    def scores(answers: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(plain similarity per prompt, the statistic tested per prompt)."""
        sim = similarity_matrix(e, ids(answers), max_tokens)
        return np.diag(sim), (prompt_specific(sim) if specific else np.diag(sim))

    e = ids(endpoint)
    sim_ref, stat_ref = scores(reference)
    rows, raw = [], []
    for name, answers in controls.items():
        sim_c, stat_c = scores(answers)
        p = sign_flip_p(stat_ref - stat_c)
        raw.append(p)
        rows.append({"control": name, "similarity": round(float(sim_c.mean()), 4),
                     "specific": round(float(stat_c.mean()), 4),
                     "difference": round(float((stat_ref - stat_c).mean()), 4), "p": p})
    for row, adj in zip(rows, holm(raw)):
        row["p_holm"] = adj
    p = max(row["p_holm"] for row in rows)
    mean_ref = float(sim_ref.mean())
    closest = max(rows, key=lambda row: row["similarity"])
    if p <= DERIVED_P:
        verdict, relation = "derived", "copy" if mean_ref >= COPY_SIM else "unknown"
    elif p > INDEPENDENT_P:
        verdict, relation = "independent", "unknown"
    else:
        verdict, relation = "inconclusive", "unknown"
    statistic = "prompt-specific similarity" if specific else "similarity"
    evidence = [f"mean answer similarity to REF {mean_ref:.3f} over {len(e)} prompts; to the closest control "
                f"({closest['control']}) {closest['similarity']:.3f}",
                f"p = {p:.3g}: the largest Holm-adjusted p of {len(rows)} paired sign-flip tests of {statistic} "
                f"({SIGN_FLIPS} draws each, so never below {1 / (SIGN_FLIPS + 1):.0e})"]
    if specific:
        evidence.insert(1, f"prompt-specific similarity to REF {stat_ref.mean():.3f}; to the controls "
                           + ", ".join(f"{r['control']} {r['specific']:.3f}" for r in rows[:5])
                           + (" ..." if len(rows) > 5 else ""))
    if closest["similarity"] > mean_ref:
        evidence.append(f"the endpoint answers more like control {closest['control']} than like REF")
    return {"verdict": verdict, "p_value": p, "relation": relation, "layers": [],
            "similarity": {"reference": round(mean_ref, 4), "specific": round(float(stat_ref.mean()), 4),
                           "statistic": statistic, "per_prompt": [round(float(s), 4) for s in sim_ref]},
            "controls": rows, "evidence": evidence, "changes": []}


# ------------------------------------------------------------------------------------------------ the check

def check_panel(ref: str, controls: list[str]) -> list[dict]:
    """The weight test of REF against each control: a control that derives from REF (or shares its origin) would
    hide a real derivation, so it is refused."""
    from taoke.provenance.verify import verify, weights_of

    out = []
    for c in controls:
        res = verify(weights_of(ref), weights_of(c), deep=False)
        out.append({"control": c, "weight_verdict": res.verdict, "p_value": res.p_value})
        if res.verdict in ("derived", "related"):
            raise ModelError(f"control '{c}': the weight test against REF '{ref}' says {res.verdict} (p = "
                             f"{res.p_value:.3g}); a control must not share REF's origin: drop it from --control")
    return out


def verify_endpoint(url: str, ref: str, controls: list[str], *, model: str | None = None,
                    prompts_file: str | os.PathLike | None = None, n_prompts: int = 64, max_tokens: int = 32,
                    api: str = "chat", api_key: str | None = None, rps: float = 4.0, concurrency: int = 4,
                    panel_check: bool = True, progress: bool = True) -> dict:
    """Does the model behind the OpenAI-compatible API at `url` derive from `ref`? What `verify --endpoint --json`
    prints: verdict, p_value, relation, layers (none: the weights are not seen), and the answers' evidence."""
    if api not in ("chat", "completions"):
        raise ModelError(f"--api must be chat or completions, not '{api}'")
    if not 1 <= max_tokens <= 512:
        raise ModelError(f"--max-tokens must be between 1 and 512, not {max_tokens}")
    if not url.startswith(("http://", "https://")):
        raise ModelError(f"--endpoint must be an http(s) URL of the API base (e.g. http://127.0.0.1:8000/v1), "
                         f"not '{url}'")
    require_controls(controls)
    if ref in controls:
        raise ModelError(f"'{ref}' is both REF and a control; a control must be a model unrelated to REF")
    t0 = time.perf_counter()
    prompts = load_prompts(prompts_file, n_prompts)
    model = model or endpoint_model(url, api_key)   # an unreachable endpoint fails before any model loads
    panel = check_panel(ref, controls) if panel_check else []
    endpoint = ask_endpoint(url, prompts, model=model, max_tokens=max_tokens, api=api, api_key=api_key, rps=rps,
                            concurrency=concurrency, progress=progress)
    reference, tok = answers_of(ref, prompts, max_tokens=max_tokens, api=api)
    answers = {c: answers_of(c, prompts, max_tokens=max_tokens, api=api)[0] for c in controls}
    res = judge(endpoint, reference, answers, tok, max_tokens)
    res.update(a=str(ref), b=f"{url} ({model})", endpoint={"url": url, "model": model, "api": api,
                                                             "prompts": len(prompts), "max_tokens": max_tokens},
               panel=panel, seconds=round(time.perf_counter() - t0, 2),
               samples=[{"prompt": p, "endpoint": e[:200], "reference": r[:200]}
                        for p, e, r in list(zip(prompts, endpoint, reference))[:3]])
    return res
