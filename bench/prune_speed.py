"""A pruned-and-healed MiniLM classifier (30% of MLP units, 25% of heads removed by activation importance, then
fine-tuned) vs the unpruned derived model it was cut from: PyTorch fp32 CPU latency and throughput, test macro-F1.

    .venv/bin/python bench/prune_speed.py [--run RUN] [--repeats 5] [--threads 2] [--heal-epochs 8] [--heal-lr 1e-4]
                                          [--seeds 0,1,2] [--distill 0.5]

Without --run it derives text-topics into runs/bench-topics. The pruned model is derived from that run with `edits:
[{prune: {mlp: 0.3, heads: 0.25, by: activation, round_to: R}}]` (R: --round-to, 16 as in recipes) and healed with the
recipe's own training (early stopping on validation macro-F1, best epoch kept) at --heal-lr, once per seed in --seeds
(runs/<run>-pruned-r<R>-lr<lr>-s<seed>; an existing run there is reused). --exact-widths also prunes with round_to 1
(1075 units kept of 1536) and times that model too, to show what the rounding is worth. The test split has 141 rows,
where one row moves macro-F1 by up to a point and a heal seed by several, so quality is the median over the seeds,
with each seed's figure beside it. Speed: the unpruned model and the first seed's pruned model (every seed has the
same widths) score the same rows in the two shapes of bench/export_speed.py (the test split as is, and each text
repeated to 128 tokens), in PyTorch eager and in ONNX Runtime (each exported to ONNX fp32 beside its run): batch-1
p50/p95, batch-32 rows/s, interleaved rounds, medians with min-max; each runtime's speed-up is against the unpruned
model in the same runtime.
With --distill W the pruned models are also healed with `train.distill: {teacher: base, weight: W}`: the unpruned
run teaches the pruned one (Hinton-style soft targets, as Minitron heals its pruned models).
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
from export_speed import macro_f1, machine, measure, ort_predictor, run_rows, shapes  # noqa: E402
from results import record  # noqa: E402


PRUNE = "edits=[{prune: {mlp: 0.3, heads: 0.25, by: activation}}]"


def ensure_unpruned(run: Path | None) -> Path:
    import taoke

    if run is None:
        run = ROOT / "runs" / "bench-topics"
        if not taoke.Run.is_run(run):
            taoke.derive(ROOT / "recipes" / "text-topics.yaml", out=run, quiet=True)
    return run


def ensure_healed(run: Path, seed: int, epochs: int, lr: float, distill: float = 0.0, compensate: bool = True,
                  round_to: int = 16) -> Path:
    """The unpruned run, pruned and healed with this seed (derived when the folder is not a run yet). Runs pruned to
    exact widths (round_to 1, the only kind before round_to existed) keep the folder names they had."""
    import taoke

    kd = f"-kd{distill:g}" if distill else ""
    rounded = f"-r{round_to}" if round_to != 1 else ""
    out = run.parent / f"{run.name}-pruned{kd}{'' if compensate else '-nocomp'}{rounded}-lr{lr:g}-s{seed}"
    if not taoke.Run.is_run(out):
        prune = PRUNE.replace("by: activation", f"by: activation, round_to: {round_to}"
                                                + ("" if compensate else ", compensate: false"))
        overrides = [f"base={run}", "name=topics-pruned", f"train.epochs={epochs}", f"train.lr={lr}",
                     f"train.seed={seed}", prune]
        if distill:
            overrides.append(f"train.distill={{teacher: base, weight: {distill}, temperature: 2.0}}")
        taoke.derive(ROOT / "recipes" / "text-topics.yaml", out=out, quiet=True, overrides=overrides)
    return out


def ensure_onnx(run: Path) -> Path:
    """The run exported to ONNX fp32 beside it (bench/export_speed.py makes the same folder for the unpruned run)."""
    import taoke

    out = run.parent / f"{run.name}-onnx"
    if not taoke.Run.is_run(out):
        taoke.export(run, "onnx", None, out, quiet=True)
    return out


def test_macro_f1(predictor, encoded) -> float:
    n = len(encoded)
    pred = torch.cat([run_rows(predictor, encoded, list(range(s, min(s + 32, n)))) for s in range(0, n, 32)])
    return macro_f1(pred.argmax(-1).numpy(), encoded.targets.numpy())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", type=Path)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--heal-epochs", type=int, default=8)
    ap.add_argument("--heal-lr", type=float, default=1e-4)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--distill", type=float, default=0.0, help="also heal with the unpruned run as teacher (weight)")
    ap.add_argument("--ablate", action="store_true", help="also prune without bias compensation (quality only)")
    ap.add_argument("--round-to", type=int, default=16, help="the prune edit's round_to (kept MLP units a multiple of)")
    ap.add_argument("--exact-widths", action="store_true",
                    help="also prune to exact widths (round_to 1) and time that model beside the rounded one")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    import taoke
    from taoke.inference import load

    seeds = [int(x) for x in args.seeds.split(",")]
    run = ensure_unpruned(args.run)
    variants = {"pruned and healed": (0.0, True, args.round_to)}
    if args.distill:
        variants[f"pruned, healed with distillation ({args.distill:g})"] = (args.distill, True, args.round_to)
    if args.ablate:
        variants["pruned without bias compensation, healed"] = (0.0, False, args.round_to)
    exact = "pruned to exact widths (round_to 1), healed"
    if args.exact_widths:
        variants[exact] = (0.0, True, 1)
    healed = {name: [ensure_healed(run, s, args.heal_epochs, args.heal_lr, kd, comp, rt) for s in seeds]
              for name, (kd, comp, rt) in variants.items()}
    torch.set_num_threads(args.threads)
    unpruned = load(run, device="cpu")
    data = shapes(unpruned)
    short = data["short"]
    quality = {"unpruned derived": [test_macro_f1(unpruned, short)]}
    before = {name: [taoke.Run(r).lineage["metrics"]["compression"]["pruned, before healing"]["macro_f1"] for r in runs]
              for name, runs in healed.items()}   # scored by the derive itself, on the same test split
    models = {"unpruned derived": unpruned}
    params = {"unpruned derived": sum(x.numel() for x in unpruned.model.parameters())}
    first = next(iter(healed))   # variants of one round_to have the same widths: time one (its first seed's model)
    timed = [first] + ([exact] if args.exact_widths else [])
    for name, runs in healed.items():
        loaded = [load(r, device="cpu") for r in runs]
        widths = {sum(x.numel() for x in p.model.parameters()) for p in loaded}
        assert len(widths) == 1, f"{name}: seeds gave different widths {widths}"
        quality[name] = [test_macro_f1(p, short) for p in loaded]
        params[name] = widths.pop()
        if name in timed:
            models[name] = loaded[0]

    # the same two models in ONNX Runtime: the runtime an exported classifier ships to (less framework overhead
    # per layer, so more of the removed FLOPs show)
    models["unpruned derived, onnxruntime"] = ort_predictor(ensure_onnx(run), args.threads)
    for name in timed:
        models[f"{name}, onnxruntime"] = ort_predictor(ensure_onnx(healed[name][0]), args.threads)
    params.update({m: params[m.split(", onnxruntime")[0]] for m in models if m.endswith(", onnxruntime")})
    results = {(m, s): [] for m in models for s in data}
    for _ in range(args.repeats):
        for s, encoded in data.items():
            for m, p in models.items():
                results[(m, s)].append(measure(p, encoded))
    ref = quality["unpruned derived"][0]
    units = {name: taoke.Run(healed[name][0]).lineage["edits"][0]["mlp_units"] for name in timed}   # [before, kept]
    widths_note = ", ".join(f"{name} keeps {kept} of {total}" for name, (total, kept) in units.items())
    lines = [f"## prune_speed — {datetime.now().isoformat(timespec='minutes')}", "",
             f"{run.name} vs the same run pruned (mlp 0.3, heads 0.25, by activation, biases compensated, kept MLP "
             f"units rounded down to a multiple of {args.round_to}: {widths_note}) and "
             f"healed (up to {args.heal_epochs} epochs at lr {args.heal_lr:g}, early stopping on validation "
             f"macro-F1, seeds {args.seeds}), fp32 in PyTorch eager and in ONNX Runtime. {machine()}. Speed: "
             f"{args.repeats} interleaved rounds, medians, spread min-max; the pruned rows time seed {seeds[0]}'s "
             "model; each speed-up is against the unpruned model in the same runtime.", "",
             "| shape | model | parameters | batch-1 p50 ms | batch-1 p95 ms | batch-32 rows/s | speed-up |",
             "|---|---|---:|---:|---:|---:|---:|"]
    speedups = {m: [] for m in models}
    for s in data:
        for m in models:
            unpruned_row = "unpruned derived, onnxruntime" if m.endswith("onnxruntime") else "unpruned derived"
            base = statistics.median(r["rows_per_s"] for r in results[(unpruned_row, s)])
            rs = results[(m, s)]
            thr = [r["rows_per_s"] for r in rs]
            speedups[m].append(statistics.median(thr) / base)
            lines.append(f"| {s} | {m} | {params[m]:,} | {statistics.median(r['p50'] for r in rs):.2f} | "
                         f"{statistics.median(r['p95'] for r in rs):.2f} | {statistics.median(thr):.0f} "
                         f"({min(thr):.0f}-{max(thr):.0f}) | {statistics.median(thr) / base:.2f}x |")
    lines += ["", f"Test macro-F1 ({len(short)} rows; the unpruned run is one model, the pruned one per heal seed):", "",
              "| model | before healing, per seed | healed, per seed | median | below unpruned (median / worst "
              "seed), points |", "|---|---|---|---:|---:|"]
    verdicts = []
    for m, f1s in quality.items():
        med = statistics.median(f1s)
        drop = "-" if m == "unpruned derived" else f"{(ref - med) * 100:+.1f} / {(ref - min(f1s)) * 100:+.1f}"
        lines.append(f"| {m} | {', '.join(f'{x:.4f}' for x in before.get(m, [])) or '-'} | "
                     f"{', '.join(f'{x:.4f}' for x in f1s)} | {med:.4f} | {drop} |")
        if m == "unpruned derived":
            continue
        for runtime in (m, f"{m}, onnxruntime"):
            if runtime not in speedups:
                continue
            met = min(speedups[runtime]) >= 1.3 and (ref - med) * 100 <= 2
            verdicts.append(f"- {runtime}: {' / '.join(f'{x:.2f}x' for x in speedups[runtime])} faster (short / long), "
                            f"{(ref - med) * 100:+.1f} points below the unpruned (median of seeds): goal "
                            f"{'met' if met else 'not met'} (>= 1.3x on both shapes at <= 2 points).")
    lines += ["", *verdicts, "", f"Re-run: `.venv/bin/python bench/prune_speed.py --run {run} --repeats {args.repeats} "
              f"--threads {args.threads} --heal-epochs {args.heal_epochs} --heal-lr {args.heal_lr:g} --seeds {args.seeds}"
              f" --round-to {args.round_to}" + (f" --distill {args.distill:g}" if args.distill else "")
              + (" --ablate" if args.ablate else "") + (" --exact-widths" if args.exact_widths else "") + "`", ""]
    text = "\n".join(lines)
    print(text)
    if not args.no_append:
        record("\n" + text)


if __name__ == "__main__":
    main()
