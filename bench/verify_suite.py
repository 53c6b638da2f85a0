"""Evaluation suite for `taoke verify`: derived and independent variants of real models, one verdict per pair.

    .venv/bin/python bench/verify_suite.py [--work DIR] [--ft-steps 300] [--threads 1] [--repeats 1] [--no-append]

Builds the variants once under --work (cached), runs verify on every pair in a fresh subprocess (so each pair's
peak RSS is its own), prints the confusion table, time and peak RSS per pair, and appends a dated section to
bench/RESULTS.md. With --repeats N each pair runs N times, interleaved (round 1 over all pairs, then round 2 ...):
verify s is the median with its min-max spread, and a pair whose verdict changes between runs is reported.
Expected: derived pairs `derived` with p < 1e-6; independent pairs `independent` with p > 0.01.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from results import record  # noqa: E402

CHILD = r"""
import json, sys, time

def peak_rss_mb():
    # VmHWM: this process's own peak (ru_maxrss would carry the parent's peak across fork/exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

t0 = time.perf_counter()
from taoke.provenance.verify import verify
from taoke.formats import open_weights
a, b = sys.argv[1], sys.argv[2]
if a == "--imports-only":
    print(json.dumps({"rss_mb": peak_rss_mb()}))
    sys.exit(0)
t1 = time.perf_counter()
r = verify(a, b)
t2 = time.perf_counter()
def two_largest(ref):
    sizes = sorted((m.numel * 4 for m in open_weights(ref).tensors()), reverse=True)
    return sizes[:2]
big = sorted(two_largest(a) + two_largest(b), reverse=True)[:2]
print(json.dumps({"verdict": r.verdict, "p": r.p_value, "relation": r.relation, "z": r.z,
                  "verify_s": t2 - t1, "total_s": t2 - t0, "layers": len(r.layers),
                  "rss_mb": peak_rss_mb(),
                  "two_largest_mb": sum(big) / 2**20}))
"""


def build(work: Path, ft_steps: int) -> list[tuple[str, str, str, str]]:
    """(case, A, B, expected) for every pair."""
    from bench import verify_models as suite

    base = suite.smollm2_hf(work)
    g = "smollm2-135m"
    t = time.perf_counter()
    ft = suite.finetuned(work, base, steps=ft_steps)
    took = time.perf_counter() - t   # ~0 when the variant was cached
    print(f"fine-tuned {ft_steps} steps in {took:.0f} s ({took / ft_steps:.2f} s/step): "
          f"{json.loads((ft / 'train_log.json').read_text())}", flush=True)
    perm = suite.permuted(work, base)
    scratch0 = suite.scratch_llama(work, base, seed=0, steps=ft_steps)
    scratch1 = suite.scratch_llama(work, base, seed=1, steps=ft_steps)
    rot_ft = suite.rotated(work / "ft", ft, "random", seed=3)
    pairs = [
        ("GGUF Q4_1 -> safetensors", g, base, "derived"),
        ("renamed (ln1/ln2, wq.., new arch name)", g, suite.renamed(work, base), "derived"),
        ("permuted MLP units + head groups", g, perm, "derived"),
        ("rescaled (up x3, down /3)", g, suite.rescaled(work, base), "derived"),
        ("pruned layers 10-15", g, suite.pruned(work, base), "derived"),
        ("duplicated layers 20-23", g, suite.duplicated(work, base), "derived"),
        ("vocab +512 tokens", g, suite.vocab_expanded(work, base), "derived"),
        ("LoRA r=8 merged (q,v,up)", g, suite.lora_merged(work, base), "derived"),
        (f"fine-tuned {ft_steps} steps", g, ft, "derived"),
        ("int8 ONNX (DequantizeLinear, MatMul^T)", g, suite.to_onnx_int8(work, base, "smollm2-int8"), "derived"),
        ("4-bit GGUF Q4_0 requantised", g, suite.to_gguf(work, base, "smollm2-q4_0"), "derived"),
        ("fine-tuned -> 4-bit GGUF", g, suite.to_gguf(work, ft, f"ft{ft_steps}-q4_0"), "derived"),
        ("permuted -> renamed", g, suite.renamed(work / "perm", perm), "derived"),
        ("residual stream rotated (random Q, gains folded)", g, suite.rotated(work, base, "random"), "derived"),
        ("residual stream rotated (Hadamard Q, gains folded)", g, suite.rotated(work, base, "hadamard"), "derived"),
        ("residual sliced to 90% of dims (SliceGPT-style)", g, suite.sliced(work, base, keep=0.9), "derived"),
        ("fine-tuned -> rotated -> renamed", g, suite.renamed(work / "ft-rot", rot_ft), "derived"),
        ("fine-tuned -> rotated -> layers pruned -> 4-bit GGUF", g,
         suite.to_gguf(work, suite.pruned(work / "ft-rot", rot_ft), "ft-rot-pruned-q4_0"), "derived"),
        ("merge 0.5/0.5 of fine-tuned and LoRA-merged", g, suite.merged(work, [ft, suite.lora_merged(work, base)],
                                                                         [0.5, 0.5]), "derived"),
        ("scratch seed 1, rotated, vs scratch seed 0", scratch0, suite.rotated(work / "s1", scratch1, "random"),
         "independent"),
        ("fine-tuned vs permuted (siblings)", ft, perm, "derived"),
        # the rotated route on a second shape: a LLaMA of another width and depth (h=256, 4 layers, trained here)
        ("scratch LLaMA (h=256) rotated (random Q)", scratch0, suite.rotated(work / "s0", scratch0, "random"),
         "derived"),
        ("scratch LLaMA (h=256) rotated (Hadamard Q)", scratch0, suite.rotated(work / "s0", scratch0, "hadamard"),
         "derived"),
        ("minilm -> torch .bin", "minilm-l6", suite.to_torch_bin(work, "minilm-l6", "minilm-bin"), "derived"),
        ("minilm pruned layers 2-3", "minilm-l6", suite.bert_pruned(work), "derived"),
        ("same arch, fresh init", g, suite.random_init_like(work, base), "independent"),
        (f"scratch seed 0 vs seed 1 ({ft_steps} steps, same data)", scratch0, scratch1, "independent"),
        ("scratch LLaMA (h=256) vs SmolLM2", g, scratch0, "independent"),
        ("BERT (minilm) vs LLaMA (SmolLM2)", g, "minilm-l6", "independent"),
        ("BERT (minilm) vs scratch LLaMA", "minilm-l6", scratch1, "independent"),
    ]
    return [(c, str(a), str(b), e) for c, a, b, e in pairs]


def run_pair(a: str, b: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, a, b], capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode != 0:
        return {"verdict": "ERROR", "p": float("nan"), "relation": out.stderr.strip().splitlines()[-1][:80],
                "verify_s": 0, "rss_mb": 0, "two_largest_mb": 0, "layers": 0, "z": 0, "total_s": 0}
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> str:
    import gguf  # noqa: F401
    import numpy
    import scipy
    import torch
    import transformers
    from importlib.metadata import version

    from taoke.hardware import cpu_flags, machine_summary

    flags = ", ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16") if f in cpu_flags())
    return (f"{machine_summary()} ({flags or 'no AVX2'}); Python {platform.python_version()}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, numpy {numpy.__version__}, scipy {scipy.__version__}, "
            f"gguf {version('gguf')}, onnx {version('onnx')}")

def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "taoke" / "verify-suite")
    ap.add_argument("--ft-steps", type=int, default=300, help="fine-tuning (and scratch-training) steps")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for building variants: on a shared 2-core machine one thread avoids "
                         "threads waiting on a busy core (measured 1.6 s/step vs 10-25 s/step with 2)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per pair; times are medians with their spread")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(args.threads)
    t = time.perf_counter()
    pairs = build(args.work, args.ft_steps)
    print(f"variants ready in {time.perf_counter() - t:.0f} s", flush=True)
    load_before = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    base_rss = run_pair("--imports-only", "-")["rss_mb"]
    runs: list[list[dict]] = [[] for _ in pairs]
    for round_ in range(args.repeats):      # interleaved rounds: a slow spell of the machine hits every pair alike
        for i, (case, a, b, expected) in enumerate(pairs):
            r = run_pair(a, b)
            runs[i].append(r)
            print(f"[{round_ + 1}/{args.repeats}] {case:48s} {r['verdict']:12s} p={r['p']:.3g} {r['relation']:13s} "
                  f"{r['verify_s']:.1f}s {r['rss_mb']:.0f}MB", flush=True)
    rows, confusion = [], {}
    for (case, a, b, expected), rs in zip(pairs, runs):
        r = dict(rs[0])
        times = sorted(x["verify_s"] for x in rs)
        r["verify_s"] = statistics.median(times)
        r["spread"] = f" ({times[0]:.1f}-{times[-1]:.1f})" if len(times) > 1 else ""
        r["rss_mb"] = max(x["rss_mb"] for x in rs)
        verdicts_seen = {x["verdict"] for x in rs}
        if len(verdicts_seen) > 1:       # verify is deterministic; a flip would be a defect worth seeing
            r["verdict"] = "/".join(sorted(verdicts_seen))
        ok = r["verdict"] == expected and all((x["p"] < 1e-6) if expected == "derived" else (x["p"] > 0.01)
                                               for x in rs)
        confusion[(expected, r["verdict"])] = confusion.get((expected, r["verdict"]), 0) + 1
        rows.append((case, expected, r, ok))
    verdicts = ["derived", "related", "inconclusive", "independent", "ERROR"]
    lines = ["| case | expected | verdict | p-value | relation | matched layers | verify s | peak RSS MB |"
             " 2 largest tensors MB | ok |", "|---|---|---|---|---|---|---|---|---|---|"]
    for case, expected, r, ok in rows:
        lines.append(f"| {case} | {expected} | {r['verdict']} | {r['p']:.3g} | {r['relation']} | {r['layers']} | "
                     f"{r['verify_s']:.1f}{r['spread']} | {r['rss_mb']:.0f} | {r['two_largest_mb']:.0f} | "
                     f"{'yes' if ok else 'NO'} |")
    conf = ["| expected \\ got | " + " | ".join(verdicts) + " |", "|---" * (len(verdicts) + 1) + "|"]
    for e in ("derived", "independent"):
        conf.append(f"| {e} | " + " | ".join(str(confusion.get((e, v), 0)) for v in verdicts) + " |")
    n_ok = sum(ok for *_, ok in rows)
    summary = (f"{n_ok}/{len(rows)} pairs right. Fixed overhead (interpreter + imports, no model): "
               f"{base_rss:.0f} MB peak RSS.")
    text = "\n".join(conf) + "\n\n" + "\n".join(lines) + "\n\n" + summary + "\n"
    print("\n" + text)
    ft_log = json.loads((args.work / f"finetuned-{args.ft_steps}" / "train_log.json").read_text())
    if not args.no_append:
        section = (f"\n## verify suite — {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}\n\n"
                   f"Command: `.venv/bin/python bench/verify_suite.py --work {args.work} --ft-steps {args.ft_steps} "
                   f"--repeats {args.repeats}`  \n"
                   f"Machine: {machine()}; load average before the pairs {load_before}  \n"
                   f"Fine-tuning (suite.finetuned, AdamW on the shipped dialog text): {ft_log}  \n"
                   f"Each pair runs `verify(A, B)` in a fresh process, {args.repeats} time(s) in interleaved rounds "
                   "(verify s: median, min-max in brackets, imports excluded; peak RSS: the largest, whole "
                   "process).\n\n" + text)
        record(section)


if __name__ == "__main__":
    main()
