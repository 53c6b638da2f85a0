"""A pruned-and-healed MiniLM classifier (30% of MLP units, 25% of heads removed by activation importance, then
fine-tuned) vs the unpruned derived model it was cut from: PyTorch fp32 CPU latency and throughput, test macro-F1.

    .venv/bin/python bench/prune_speed.py [--run RUN] [--pruned RUN] [--repeats 5] [--threads 2] [--heal-epochs 8]
                                          [--distill 0.5]

Without --run it derives text-topics into runs/bench-topics; a --pruned path that is not a run yet (default
runs/bench-topics-pruned) is derived there from that run with `edits: [{prune: {mlp: 0.3, heads: 0.25, by: activation}}]`. Both
models score the same rows in the two shapes of bench/export_speed.py (the test split as is, and each text
repeated to 128 tokens): batch-1 p50/p95, batch-32 rows/s, interleaved rounds, medians with min-max.
With --distill W a third model is healed the same way but with `train.distill: {teacher: base, weight: W}`: the
unpruned run teaches the pruned one (Hinton-style soft targets, as Minitron heals its pruned models).
Goal (issue 13): >= 1.3x faster at <= 2 points macro-F1 below the unpruned derived model.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from datetime import datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from export_speed import macro_f1, machine, measure, shapes  # noqa: E402


PRUNE = "edits=[{prune: {mlp: 0.3, heads: 0.25, by: activation}}]"


def ensure(run: Path | None, pruned: Path | None, heal_epochs: int) -> tuple[Path, Path]:
    import taoke

    if run is None:
        run = ROOT / "runs" / "bench-topics"
        if not taoke.Run.is_run(run):
            taoke.derive(ROOT / "recipes" / "text-topics.yaml", out=run, quiet=True)
    pruned = pruned or run.parent / f"{run.name}-pruned"
    if not taoke.Run.is_run(pruned):   # derived here when missing (a new path compares another heal length)
        taoke.derive(ROOT / "recipes" / "text-topics.yaml", out=pruned, quiet=True, overrides=[
            f"base={run}", "name=topics-pruned", f"train.epochs={heal_epochs}", "train.early_stopping=null",
            PRUNE])
    return run, pruned


def ensure_distilled(run: Path, pruned: Path, heal_epochs: int, weight: float) -> Path:
    """The same prune and heal, with the unpruned run as the teacher."""
    import taoke

    out = pruned.parent / f"{pruned.name}-kd{weight:g}"
    if not taoke.Run.is_run(out):
        taoke.derive(ROOT / "recipes" / "text-topics.yaml", out=out, quiet=True, overrides=[
            f"base={run}", "name=topics-pruned-kd", f"train.epochs={heal_epochs}", "train.early_stopping=null",
            PRUNE, f"train.distill={{teacher: base, weight: {weight}, temperature: 2.0}}"])
    return out


def taoke_epochs(run: Path) -> float:
    import taoke

    return taoke.load_recipe(run / "recipe.yaml").train.epochs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", type=Path)
    ap.add_argument("--pruned", type=Path)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--heal-epochs", type=int, default=8)
    ap.add_argument("--distill", type=float, default=0.0, help="also heal with the unpruned run as teacher (weight)")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    from taoke.inference import load

    run, pruned = ensure(args.run, args.pruned, args.heal_epochs)
    torch.set_num_threads(args.threads)
    models = {"unpruned derived": load(run, device="cpu"), "pruned and healed": load(pruned, device="cpu")}
    distilled = ensure_distilled(run, pruned, args.heal_epochs, args.distill) if args.distill else None
    if distilled:
        models[f"pruned, healed with distillation ({args.distill:g})"] = load(distilled, device="cpu")
    data = shapes(models["unpruned derived"])
    results = {(m, s): [] for m in models for s in data}
    for _ in range(args.repeats):
        for s, encoded in data.items():
            for m, p in models.items():
                results[(m, s)].append(measure(p, encoded))
    params = {m: sum(x.numel() for x in p.model.parameters()) for m, p in models.items()}
    lines = [f"## prune_speed — {datetime.now().isoformat(timespec='minutes')}", "",
             f"{run.name} vs {pruned.name} (mlp 0.3, heads 0.25, by activation, then fine-tuned "
             f"{taoke_epochs(pruned)} epochs), PyTorch fp32 eager. "
             f"{machine()}. {args.repeats} interleaved rounds; medians, spread min-max.", "",
             "| shape | model | parameters | batch-1 p50 ms | batch-1 p95 ms | batch-32 rows/s | speed-up | test macro-F1 |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for s, encoded in data.items():
        base = statistics.median(r["rows_per_s"] for r in results[("unpruned derived", s)])
        for m in models:
            rs = results[(m, s)]
            thr = [r["rows_per_s"] for r in rs]
            f1 = macro_f1(rs[0]["pred"], encoded.targets.numpy()) if s == "short" else None
            lines.append(f"| {s} | {m} | {params[m]:,} | {statistics.median(r['p50'] for r in rs):.2f} | "
                         f"{statistics.median(r['p95'] for r in rs):.2f} | {statistics.median(thr):.0f} "
                         f"({min(thr):.0f}-{max(thr):.0f}) | {statistics.median(thr) / base:.2f}x | "
                         + (f"{f1:.4f}" if f1 is not None else "-") + " |")
    lines += ["", f"Re-run: `.venv/bin/python bench/prune_speed.py --run {run} --pruned {pruned} --repeats "
                  f"{args.repeats} --threads {args.threads}" + (f" --distill {args.distill:g}" if distilled else "")
              + "`", ""]
    text = "\n".join(lines)
    print(text)
    if not args.no_append:
        with open(ROOT / "bench" / "RESULTS.md", "a", encoding="utf-8") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
