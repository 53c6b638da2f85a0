"""A fine-tuned MiniLM classifier in PyTorch eager fp32 vs its ONNX exports in ONNX Runtime (fp32, int8).

    .venv/bin/python bench/export_speed.py [--run RUN] [--repeats 5] [--threads 2]

Without --run it derives text-topics (full fine-tune of minilm-l6) into runs/bench-topics first. The run is
exported with `taoke.export` (fp32 and int8) unless the exports exist beside it. All three engines score the
same rows: the run's test split, in two shapes: as is (short chat lines, ~10 tokens) and "long" (each text
repeated to fill max_length 128 tokens). Per engine and shape: batch-1 latency p50/p95 over the rows, batch-32
throughput (rows/s), and test-split macro-F1 (short shape; labels of the long shape are not meaningful).
Engines run interleaved, `repeats` times; medians with the min-max spread. Appends to bench/RESULTS.md.
Goal (issue 13): int8 >= 2x PyTorch fp32 batch-32 throughput at <= 1 point macro-F1 loss.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from results import record  # noqa: E402


def machine() -> str:
    from taoke.hardware import cpu_flags, cpu_model

    flags = cpu_flags()
    keep = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "avx_vnni")
            if f in flags]
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip().split("load average:")[-1]
    return (f"{torch.get_num_threads()} threads on {cpu_model()} ({', '.join(keep) or 'no AVX2'}); load average "
            f"{load.strip()}; torch {torch.__version__}, onnxruntime {ort.__version__}")


def ensure_runs(run: Path | None) -> tuple[Path, Path, Path]:
    import taoke

    if run is None:
        run = ROOT / "runs" / "bench-topics"
        if not taoke.Run.is_run(run):
            taoke.derive(ROOT / "recipes" / "text-topics.yaml", out=run, quiet=True)
    exports = []
    for quant in (None, "int8"):
        out = run.parent / (f"{run.name}-onnx" + (f"-{quant}" if quant else ""))
        if not taoke.Run.is_run(out):
            taoke.export(run, "onnx", quant, out, quiet=True)
        exports.append(out)
    return run, exports[0], exports[1]


def shapes(predictor) -> dict:
    """Encoded test rows: as they are, and each text repeated up to 128 tokens."""
    from taoke.data.encode import encode_frame

    frame, _ = predictor.split_frame("test")
    col = predictor.meta["inputs"]["column"]
    meta = {**predictor.meta, "inputs": {**predictor.meta["inputs"], "max_length": 128}}
    long = frame.assign(**{col: [" ".join([t] * 40) for t in frame[col].astype(str)]})
    return {"short": encode_frame(frame, predictor.meta, predictor.tokenizer),
            "long (128 tokens)": encode_frame(long, meta, predictor.tokenizer)}


def ort_predictor(export: Path, threads: int):
    """taoke's predictor for an ONNX export, its session pinned to `threads` intra-op threads."""
    from taoke.inference import load

    p = load(export, device="cpu")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    p.model = ort.InferenceSession(str(Path(export) / "model" / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    return p


def engines(run: Path, fp32: Path, int8: Path, threads: int) -> dict:
    from taoke.inference import load

    torch.set_num_threads(threads)
    return {"pytorch fp32 (eager)": load(run, device="cpu"), "onnxruntime fp32": ort_predictor(fp32, threads),
            "onnxruntime int8": ort_predictor(int8, threads)}


def run_rows(predictor, encoded, rows: list[int]) -> torch.Tensor:
    """One forward of these rows, the predictor's own way (PyTorch: fp32, no autocast)."""
    from taoke.inference.onnx_runtime import OnnxPredictor
    from taoke.train.classifier import predict
    from taoke.train.batches import Encoded

    sub = Encoded(encoded.kind, encoded.targets[rows], ids=[encoded.ids[i] for i in rows], pad_id=encoded.pad_id)
    if isinstance(predictor, OnnxPredictor):
        predictor.batch_size = len(rows)
        return predictor.forward(sub)
    return predict(predictor.model, sub, batch_size=len(rows), precision="fp32")


def measure(predictor, encoded) -> dict:
    n = len(encoded)
    lat = []
    for i in range(n):
        t = time.perf_counter()
        run_rows(predictor, encoded, [i])
        lat.append((time.perf_counter() - t) * 1000)
    t = time.perf_counter()
    outs = [run_rows(predictor, encoded, list(range(s, min(s + 32, n)))) for s in range(0, n, 32)]
    thr = n / (time.perf_counter() - t)
    pred = torch.cat(outs).argmax(-1).numpy()
    return {"p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95)), "rows_per_s": thr,
            "pred": pred}


def macro_f1(pred, targets) -> float:
    from sklearn.metrics import f1_score
    return float(f1_score(targets, pred, average="macro"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", type=Path)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    run, fp32, int8 = ensure_runs(args.run)
    eng = engines(run, fp32, int8, args.threads)
    data = shapes(next(iter(eng.values())))
    results = {(e, s): [] for e in eng for s in data}
    for _ in range(args.repeats):                      # interleaved: every engine in every round
        for s, encoded in data.items():
            for e, p in eng.items():
                results[(e, s)].append(measure(p, encoded))
    lines = [f"## export_speed — {datetime.now().isoformat(timespec='minutes')}", "",
             f"Run {run.name} (MiniLM-L6 fine-tuned, {len(data['short'])} test rows). {machine()}. "
             f"{args.repeats} interleaved rounds; medians, spread min-max.", "",
             "| shape | engine | batch-1 p50 ms | batch-1 p95 ms | batch-32 rows/s | vs PyTorch | test macro-F1 |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for s, encoded in data.items():
        base = statistics.median(r["rows_per_s"] for r in results[(next(iter(eng)), s)])
        for e in eng:
            rs = results[(e, s)]
            thr = [r["rows_per_s"] for r in rs]
            f1 = macro_f1(rs[0]["pred"], encoded.targets.numpy()) if s == "short" else None
            lines.append(f"| {s} | {e} | {statistics.median(r['p50'] for r in rs):.2f} | "
                         f"{statistics.median(r['p95'] for r in rs):.2f} | {statistics.median(thr):.0f} "
                         f"({min(thr):.0f}-{max(thr):.0f}) | {statistics.median(thr) / base:.2f}x | "
                         + (f"{f1:.4f}" if f1 is not None else "-") + " |")
    lines += ["", f"Re-run: `.venv/bin/python bench/export_speed.py --run {run} --repeats {args.repeats} "
                  f"--threads {args.threads}`", ""]
    text = "\n".join(lines)
    print(text)
    if not args.no_append:
        record("\n" + text)


if __name__ == "__main__":
    main()
