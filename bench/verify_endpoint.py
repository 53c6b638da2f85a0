"""Black-box provenance on served models: `taoke verify --endpoint` precision and recall on loopback.

    .venv/bin/python bench/verify_endpoint.py [--work DIR] [--steps 150] [--n-prompts 64] [--max-tokens 32]
                                              [--no-hf] [--no-append]

Zoo (every model real or trained here; nothing random):
- SmolLM2-135M-Instruct (dequantised by transformers' GGUF loader) and four models derived from it: itself served
  under another name (a plain re-hosted shell), its residual stream rotated (same function, weights that the
  plain fingerprint cannot match), fully fine-tuned 200 steps on the shipped dialogs (lr 1e-4, batch 4 x 32
  tokens), and 40 steps on the instructions (lr 3e-4, batch 8 x 64 tokens).
- Six small LLaMA/Qwen2 models trained from scratch here, two on each of the shipped dialogs / instructions /
  Chinese poems (the calibration study's recipe), and two of them fine-tuned on other text.
Every endpoint is served by `taoke serve` on 127.0.0.1 (two also by `transformers serve`) and asked the built-in
64 probe prompts greedily; each (endpoint, REF) pair is judged against a panel of the other base models, minus the
endpoint's own origin (a user never has the true parent in the panel: if they had, they would not ask). Truth: the
endpoint derives from REF. Reports precision, recall, the false positive rate on unrelated pairs at each threshold
and the p of every derived pair.

What this panel is not: SmolLM2 is the only fluent model on this machine; the others are small models trained for
minutes, whose answers are poor. The null is measured on them. A real unrelated 135M model (another family) might sit
closer to SmolLM2 than these do; on such pairs the false positive rate is not measured here.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from results import record  # noqa: E402

from bench import verify_calibration as cal  # noqa: E402  (the repo root must be on sys.path first)
from bench import verify_models as suite  # noqa: E402
from bench.serve_load import Server, free_port  # noqa: E402

# (arch, hidden, layers, seed, data, tokenizer) of the from-scratch bases: all with SmolLM2's tokenizer, so that
# each can answer the chat prompts through SmolLM2's chat template. Two independent models per data set (the sixth,
# a second poems model, added 2026-12-06): a panel then holds a model trained on REF's text, as README tells users
# to choose controls, except where the endpoint's origin is that model (the panel leaves it out).
SCRATCH = [("llama", 256, 4, 31, "dialogs", "smollm"), ("qwen2", 256, 4, 32, "alpaca", "smollm"),
           ("llama", 192, 3, 33, "poems", "smollm"), ("qwen2", 192, 4, 34, "dialogs", "smollm"),
           ("llama", 256, 2, 35, "alpaca", "smollm"), ("qwen2", 256, 3, 36, "poems", "smollm")]
THRESHOLDS = (0.05, 0.01, 1e-3)


def build_zoo(work: Path, steps: int) -> tuple[dict, dict]:
    """(endpoints: name -> (model dir, origin), roots: name -> model dir). origin = the root it derives from."""
    import torch
    from transformers import AutoTokenizer

    smol = suite.smollm2_hf(work)
    if not (smol / "tokenizer.json").exists():
        raise SystemExit(f"{smol}: no tokenizer")
    chat = AutoTokenizer.from_pretrained(smol).chat_template
    roots = {"smollm2": smol}
    endpoints = {"smollm2 (re-hosted)": (smol, "smollm2"),
                 "smollm2 rotated": (suite.rotated(work / "rot", smol, "random", seed=3), "smollm2"),
                 "smollm2 ft dialogs 200": (suite.finetuned(work / "ft", smol, steps=200), "smollm2"),
                 "smollm2 ft instructions 40": (cal.child_model(work, smol, ("llama", 0, 0, 0, "", "smollm"),
                                                                 "alpaca", 40), "smollm2")}
    for i, spec in enumerate(SCRATCH):
        t0 = time.perf_counter()
        d = cal.panel_model(work, spec, steps)
        _with_template(d, chat)
        name = f"scratch-{i} {spec[0]} h{spec[1]} l{spec[2]} {spec[4]}"
        roots[name] = d
        print(f"{name}: ready ({time.perf_counter() - t0:.0f} s)", flush=True)
        if i < 2:
            other = "poems" if spec[4] != "poems" else "dialogs"
            child = cal.child_model(work, d, spec, other, steps)
            _with_template(child, chat)
            endpoints[f"{name} ft {other}"] = (child, name)
        elif i < 4:
            endpoints[f"{name} (re-hosted)"] = (d, name)
    for d, _ in endpoints.values():
        _with_template(d, chat)
    return endpoints, roots


def _with_template(d: Path, template: str) -> None:
    """Give a model SmolLM2's chat template where its tokenizer files lack it (the suite's builders copy
    tokenizer.json and tokenizer_config.json; transformers 5 keeps the template in chat_template.jinja)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d)
    if tok.chat_template != template:
        tok.chat_template = template
        tok.save_pretrained(d)


def local(name: str, d: Path, prompts, max_tokens: int, cache: Path) -> list[str]:
    """Greedy answers of a base model to the prompts, kept in `cache` (also read by verify_endpoint_logprobs)."""
    from taoke.provenance.endpoint import answers_of

    key = hashlib.sha256(f"{d}|{len(prompts)}|{max_tokens}".encode()).hexdigest()[:16]
    f = cache / f"{key}.json"
    if f.exists():
        return json.loads(f.read_text())
    t0 = time.perf_counter()
    answers, _ = answers_of(str(d), prompts, max_tokens=max_tokens)
    f.write_text(json.dumps(answers))
    print(f"local answers of {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return answers


def serve(server: str, d: Path, log: Path) -> tuple[Server, str, str]:
    """A server on a free loopback port; returns (server, API base URL, model id) once it answers."""
    port, py = free_port(), sys.executable
    if server == "taoke":
        cmd = [py, "-m", "taoke.cli", "serve", str(d), "--port", str(port), "--model-name", "shell",
               "--audit-log", os.devnull]
        proc, ready = Server(server, cmd, "shell", port, log, threads=None), "/readyz"
    else:
        cmd = [str(Path(py).parent / "transformers"), "serve", str(d), "--device", "cpu", "--dtype", "float32",
               "--host", "127.0.0.1", "--port", str(port)]
        proc, ready = Server(server, cmd, str(d), port, log, threads=None), "/v1/models"
    try:
        proc.wait_ready(ready)
    except RuntimeError as e:
        proc.stop()
        raise SystemExit(f"{server} serve: {e}") from None
    return proc, proc.url + "/v1", proc.model_id


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "taoke" / "verify-endpoint")
    ap.add_argument("--steps", type=int, default=150, help="training steps of each from-scratch model")
    ap.add_argument("--n-prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers serve endpoint")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    import torch
    from transformers import AutoTokenizer

    from taoke.provenance.endpoint import DERIVED_P, INDEPENDENT_P, ask_endpoint, judge, load_prompts

    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    endpoints, roots = build_zoo(args.work, args.steps)
    prompts = load_prompts(n=args.n_prompts)
    cache = args.work / "answers"
    cache.mkdir(exist_ok=True)
    base_answers = {name: local(name, d, prompts, args.max_tokens, cache) for name, d in roots.items()}
    tok = {name: AutoTokenizer.from_pretrained(d) for name, d in roots.items()}
    servers = [("taoke", name) for name in endpoints]
    if not args.no_hf:   # one derived and one unrelated endpoint behind transformers' own server too
        servers += [("transformers", "smollm2 ft dialogs 200"),
                    ("transformers", next(n for n in endpoints if n.startswith("scratch-2")))]
    rows, asked_answers = [], {}
    for server, name in servers:
        d, origin = endpoints[name]
        proc, url, model = serve(server, d, args.work / f"serve-{server}.log")
        try:
            t0 = time.perf_counter()
            answers = ask_endpoint(url, prompts, model=model, max_tokens=args.max_tokens, rps=50, concurrency=8,
                                   progress=False)
            asked = time.perf_counter() - t0
        finally:
            proc.stop()
        asked_answers[f"{server}|{name}"] = answers
        for ref in roots:
            panel = {c: base_answers[c] for c in roots if c not in (ref, origin)}
            res = judge(answers, base_answers[ref], panel, tok[ref], args.max_tokens)
            plain = judge(answers, base_answers[ref], panel, tok[ref], args.max_tokens, specific=False)
            rows.append({"server": server, "endpoint": name, "ref": ref, "truth": origin == ref,
                         "verdict": res["verdict"], "p": res["p_value"], "sim_ref": res["similarity"]["reference"],
                         "sim_best_control": max(c["similarity"] for c in res["controls"]),
                         "spec_ref": res["similarity"]["specific"],
                         "spec_best_control": max(c["specific"] for c in res["controls"]),
                         "plain_verdict": plain["verdict"], "plain_p": plain["p_value"],
                         "panel": len(panel), "ask_s": round(asked, 1)})
            r = rows[-1]
            print(f"{server:12s} {name:42s} REF {ref:36s} truth={r['truth']!s:5s} {r['verdict']:12s} "
                  f"p={r['p']:.3g} specific {r['spec_ref']:.3f} vs {r['spec_best_control']:.3f}; plain "
                  f"{r['plain_verdict']} p={r['plain_p']:.3g} sim {r['sim_ref']:.3f} vs {r['sim_best_control']:.3f}",
                  flush=True)
    pos = [r for r in rows if r["truth"]]
    neg = [r for r in rows if not r["truth"]]

    def scores(key: str) -> tuple[int, int, float, float]:
        called = [r for r in rows if r[key] == "derived"]
        tp = sum(r["truth"] for r in called)
        return tp, len(called), (tp / len(called) if called else float("nan")), tp / len(pos)

    tp, n_called, precision, recall = scores("verdict")
    ptp, pn_called, pprecision, precall = scores("plain_verdict")
    fpr = {t: sum(r["p"] <= t for r in neg) for t in THRESHOLDS}
    lines = [
        f"{len(rows)} (endpoint, REF) pairs: {len(pos)} derived, {len(neg)} unrelated; {len(servers)} served endpoints "
        f"({sum(s == 'taoke' for s, _ in servers)} by taoke serve, {sum(s != 'taoke' for s, _ in servers)} by "
        f"transformers serve), {args.n_prompts} probe prompts, {args.max_tokens} tokens, greedy; panel per pair: "
        "the other base models minus the endpoint's own origin.",
        "",
        f"- `derived` (p <= {DERIVED_P:g}), prompt-specific similarity (the shipped default): precision "
        f"{precision:.3f} ({tp}/{n_called}), recall {recall:.3f} ({tp}/{len(pos)}).",
        f"- The same test on plain similarity (`judge(..., specific=False)`, the statistic before 2026-12-07): "
        f"precision {pprecision:.3f} ({ptp}/{pn_called}), recall {precall:.3f} ({ptp}/{len(pos)}); unrelated pairs "
        f"called derived {sum(r['plain_verdict'] == 'derived' for r in neg)}/{len(neg)}.",
        "- Unrelated pairs with p at or below the threshold: "
        + ", ".join(f"{t:g}: {fpr[t]}/{len(neg)}" for t in THRESHOLDS)
        + f"; verdicts on unrelated pairs: "
        + ", ".join(f"{v} {sum(r['verdict'] == v for r in neg)}" for v in ("derived", "inconclusive", "independent"))
        + f" (`independent` needs p > {INDEPENDENT_P:g}).",
        f"- Largest p among derived pairs: {max(r['p'] for r in pos):.3g}; p is a sign-flip count (floor 1e-4), "
        "Holm-adjusted over the panel.",
        f"- Distinct answers of each base model to the {args.n_prompts} prompts (a model that says the same to every "
        "prompt carries little evidence either way): "
        + ", ".join(f"{name} {len(set(a))}" for name, a in base_answers.items()) + ".",
        f"- Whole run {time.perf_counter() - t_all:.0f} s (building the zoo included, cached on re-runs).",
        "",
        "| server | endpoint | REF | truth | verdict | p | specific: REF | best control | plain: verdict | p | "
        "similarity to REF | best control |",
        "|---|---|---|---|---|---:|---:|---:|---|---:|---:|---:|",
    ] + [f"| {r['server']} | {r['endpoint']} | {r['ref']} | {'derived' if r['truth'] else 'unrelated'} | "
         f"{r['verdict']} | {r['p']:.3g} | {r['spec_ref']:.3f} | {r['spec_best_control']:.3f} | "
         f"{r['plain_verdict']} | {r['plain_p']:.3g} | {r['sim_ref']:.3f} | {r['sim_best_control']:.3f} |"
         for r in sorted(rows, key=lambda r: (not r["truth"], r["p"]))]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    (args.work / "endpoint_pairs.json").write_text(json.dumps(rows, indent=1))
    (args.work / "endpoint_answers.json").write_text(json.dumps(asked_answers, ensure_ascii=False, indent=1))
    if not args.no_append:
        from bench.verify_suite import machine

        head = (f"\n## verify --endpoint (black box) — {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}\n\n"
                f"Machine: {machine()}. Command: `.venv/bin/python bench/verify_endpoint.py --steps {args.steps} "
                f"--n-prompts {args.n_prompts} --max-tokens {args.max_tokens}`.\n\n")
        record(head + text)


if __name__ == "__main__":
    main()
