"""An SFT'd SmolLM2 exported to GGUF (Q8_0, Q4_0): generation tokens/s in real llama.cpp (node-llama-cpp) vs
taoke's own `generate` (PyTorch fp32, greedy), and the held-out perplexities the export check measured.

    .venv/bin/python bench/gguf_speed.py [--run RUN] [--repeats 3] [--threads 1] [--new-tokens 32]

Without --run it derives recipes/sft-lora.yaml into runs/bench-sft first; exports missing beside the run are
made with `taoke.export` (which runs the check). Two prompt shapes: the run's held-out chat prompts (short,
~30-60 tokens) and the same prompts after ~400 tokens of earlier held-out dialog (long). Both engines get the
same token ids, the same thread count and exactly the same number of new tokens (greedy; an end-of-turn token
stops neither engine: taoke's generate runs with min_new_tokens, llama.cpp with ignore_eog). tokens/s = new tokens
/ wall time including the prompt. (Until 2026-12-06 llama.cpp stopped at an end-of-turn token, so a model that
ends its turn at once "generated" 0-1 tokens in the time of a whole prompt: the Q8_0 long-prompt 1.3 tokens/s.)
Engines run interleaved, `repeats` rounds; medians with min-max. Appends to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from export_speed import machine  # noqa: E402
from results import record  # noqa: E402


def ensure(run: Path | None) -> tuple[Path, dict[str, Path]]:
    import taoke

    if run is None:
        run = ROOT / "runs" / "bench-sft"
        if not taoke.Run.is_run(run):
            taoke.derive(ROOT / "recipes" / "sft-lora.yaml", out=run, quiet=True)
    out, refused = {}, {}
    for quant in ("Q8_0", "Q4_0"):
        exp = run.parent / f"{run.name}-gguf-{quant.lower()}"
        if not taoke.Run.is_run(exp):
            try:
                taoke.export(run, "gguf", quant, exp, quiet=True)
            except taoke.ModelError as e:   # refused by the export check: time it anyway, say why
                refused[quant] = str(e)
                taoke.export(run, "gguf", quant, exp, check=False, quiet=True)
        out[quant] = exp
    return run, out, refused


def prompt_shapes(run: Path, tok) -> dict[str, list[list[int]]]:
    from taoke.ship.language import held_out, run_splits

    splits = run_splits(taoke_run(run), "the bench's prompts come from the run's held-out split; restore its data.")
    held = held_out(splits, tok, max_prompts=6, max_positions=1)
    history = tok.decode([t for p in held.prompts for t in p])[-1600:]
    long = [tok(history, add_special_tokens=False)["input_ids"][-400:] + p for p in held.prompts]
    return {"held-out prompts": held.prompts, "long (+400 tokens of dialog)": long}


def taoke_run(path: Path):
    from taoke.run import Run
    return Run(path)


@torch.no_grad()
def taoke_generate(model, prompts: list[list[int]], n: int) -> tuple[int, float]:
    t = time.perf_counter()
    made = 0
    for ids in prompts:
        x = torch.tensor([ids])
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0)
        made += out.shape[1] - x.shape[1]
    return made, time.perf_counter() - t


def llama_generate(gguf: Path, prompts: list[list[int]], n: int, threads: int) -> tuple[int, float]:
    from taoke.ship.llamacpp import run_llamacpp

    ans = run_llamacpp(gguf, greedy=[{"ids": p, "n": n, "ignore_eog": True} for p in prompts], threads=threads)
    if ans["generated_tokens"] != n * len(prompts):   # the same work for both engines, or no figure
        raise RuntimeError(f"{gguf}: llama.cpp generated {ans['generated_tokens']} tokens, not {n * len(prompts)}")
    return ans["generated_tokens"], ans["seconds"]["greedy"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", type=Path)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    from taoke.lm.load import load_causal_lm

    run, exports, refused = ensure(args.run)
    torch.set_num_threads(args.threads)
    model, tok = load_causal_lm(run / "model", device="cpu")
    model.eval()
    shapes = prompt_shapes(run, tok)
    ggufs = {q: next((e / "model").glob("*.gguf")) for q, e in exports.items()}
    engines = {"taoke generate (PyTorch fp32)": lambda p: taoke_generate(model, p, args.new_tokens),
               **{f"llama.cpp {q}": (lambda p, g=g: llama_generate(g, p, args.new_tokens, args.threads))
                  for q, g in ggufs.items()}}
    results = {(e, s): [] for e in engines for s in shapes}
    for _ in range(args.repeats):
        for s, prompts in shapes.items():
            for e, fn in engines.items():
                made, secs = fn(prompts)
                results[(e, s)].append(made / secs)
    ppl = {q: (taoke_run(e).lineage["export"]["parity"] or {}).get("perplexity") for q, e in exports.items()}
    lines = [f"## gguf_speed — {datetime.now().isoformat(timespec='minutes')}", "",
             f"Run {run.name} (SmolLM2-135M SFT), {len(shapes['held-out prompts'])} prompts x {args.new_tokens} new "
             f"tokens, greedy, {args.threads} thread(s) for both engines. {machine()}. {args.repeats} interleaved "
             "rounds; medians, spread min-max. llama.cpp through node-llama-cpp 3.21.1 (prebuilt CPU binaries); its "
             "time includes the node round trip per prompt but not loading the model.", "",
             "| prompts | engine | tokens/s | vs taoke |", "|---|---|---:|---:|"]
    for s in shapes:
        base = statistics.median(results[(next(iter(engines)), s)])
        for e in engines:
            r = results[(e, s)]
            lines.append(f"| {s} | {e} | {statistics.median(r):.1f} ({min(r):.1f}-{max(r):.1f}) | "
                         f"{statistics.median(r) / base:.2f}x |")
    lines += ["", "Held-out perplexity (the export check; assistant tokens of the run's held-out dialogs):", ""]
    lines += [f"- {q}: llama.cpp {p['llama.cpp']:.4f} vs taoke {p['taoke']:.4f} ({p['relative_gap']:.2%} apart, "
              f"tolerance {p['tolerance']:.0%}, {p['tokens']} tokens)" for q, p in ppl.items() if p]
    lines += [f"- {q}: refused by the export check ({msg.split(': ', 1)[-1]}); timed from an unchecked export"
              for q, msg in refused.items()]
    lines += ["", f"Re-run: `.venv/bin/python bench/gguf_speed.py --run {run} --repeats {args.repeats} "
                  f"--threads {args.threads}`", ""]
    text = "\n".join(lines)
    print(text)
    if not args.no_append:
        record("\n" + text)


if __name__ == "__main__":
    main()
