"""Text classification training: taoke vs HF Trainer on the same base, data, split and hyperparameters.

    .venv/bin/python bench/textcls_vs_hf.py [--data topics|passages] [--epochs 1] [--batch-size 32] [--lr 1e-4]
                                            [--max-length 64] [--repeat 3]

Each side runs in its own fresh subprocess (so peak RSS is its own); both get the rows of taoke's
seeded split, minilm-l6, the same epochs, batch size, learning rate, warmup, weight decay, max length
and seed. Two data shapes:
- `topics`: data/chatterbot/topics.csv, one-line openings of conversations (about 8 words) and their topic;
- `passages`: texts of a few sentences (three consecutive question/answer exchanges of one category of
  data/chatterbot-lm/text, about 45 words), labelled with the category; categories with fewer than 14
  passages are left out. Built from the shipped files into --tmp, deterministically.
Times two things per run: the training call alone, and the whole process (interpreter start, imports, data split
and tokenisation, model load, training, test-split prediction and macro-F1), and reports the median over
--repeat runs (peers interleaved) with the spread, plus peak RSS and test macro-F1; appends the table to
bench/RESULTS.md.

HF Trainer is run twice: with its defaults (fp32, random batches) and with bf16=True and
train_sampling_strategy="group_by_length", its own switches for what taoke does by default.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "text-topics.yaml"
PASSAGE_SOURCE = ROOT / "data" / "chatterbot-lm" / "text"
EXCHANGES_PER_PASSAGE = 3
MIN_PASSAGES = 14


def passages_csv(tmp: Path) -> Path:
    """The `passages` shape as a CSV (text, label): every EXCHANGES_PER_PASSAGE consecutive Q/A paragraphs of a
    category's text file joined into one text; categories with fewer than MIN_PASSAGES passages left out."""
    import csv

    rows = []
    for f in sorted(PASSAGE_SOURCE.glob("*.txt")):
        paras = [" ".join(p.split()) for p in f.read_text(encoding="utf-8").split("\n\n") if p.strip()]
        k = EXCHANGES_PER_PASSAGE
        texts = [" ".join(paras[i:i + k]) for i in range(0, len(paras) - k + 1, k)]
        if len(texts) >= MIN_PASSAGES:
            rows += [(t, f.stem) for t in texts]
    out = tmp / "passages.csv"
    tmp.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([("text", "label"), *rows])
    return out


def data_file(args) -> Path:
    return ROOT / "data" / "chatterbot" / "topics.csv" if args.data == "topics" else passages_csv(Path(args.tmp))


def shared_split(args):
    from taoke.data.prepare import prepare_data
    from taoke.recipe import load_recipe

    recipe = load_recipe(RECIPE, [f"data.train={data_file(args)}",
                                  f"preprocess=[{{normalize_text: {{}}}}, {{dedup: {{}}}}, "
                                  f"{{tokenize: {{max_length: {args.max_length}}}}}]"])
    return prepare_data(recipe)


def median_tokens(plan, tok) -> int:
    """Median tokens a training text (untruncated), for the record of the data shape."""
    from taoke.data.encode import text_column

    texts = text_column(plan.splits["train"], plan.spec["inputs"])
    return int(statistics.median(len(ids) for ids in tok(list(texts))["input_ids"]))


def worker_taoke(args) -> dict:
    import torch

    from taoke.data.encode import encode_frame
    from taoke.evaluate.metrics import classification_metrics
    from taoke.library import resolve
    from taoke.models.task_model import load_hf_classifier
    from taoke.recipe import TrainConfig
    from taoke.train.classifier import fit, predict
    from taoke.train.core import seed_everything
    from transformers import AutoTokenizer

    plan = shared_split(args)
    base = resolve("minilm-l6")
    seed_everything(args.seed)
    model = load_hf_classifier(base.path, len(plan.labels), plan.labels, regression=False)
    tok = AutoTokenizer.from_pretrained(base.path)
    meta = {"inputs": plan.spec["inputs"], "labels": plan.labels, "label_column": plan.spec["label_column"]}
    train = encode_frame(plan.splits["train"], meta, tok)
    test = encode_frame(plan.splits["test"], meta, tok)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, warmup_ratio=0.1,
                      weight_decay=0.01, seed=args.seed, max_grad_norm=1.0, checkpoint_every=None)
    t0 = time.perf_counter()
    fit(model, train, None, cfg, regression=False, quiet=True)
    seconds = time.perf_counter() - t0
    out = predict(model, test, 64)
    f1 = classification_metrics(test.targets.numpy(), out.argmax(-1).numpy())["macro_f1"]
    return {"train_seconds": seconds, "samples_per_s": len(train) * args.epochs / seconds, "macro_f1": f1,
            "train_rows": len(train), "classes": len(plan.labels), "median_tokens": median_tokens(plan, tok),
            "threads": torch.get_num_threads()}


def worker_hf(args, tuned: bool) -> dict:
    import numpy as np
    import torch
    from datasets import Dataset
    from sklearn.metrics import f1_score
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments)

    from taoke.data.encode import text_column
    from taoke.hardware import cpu_has_bf16   # bf16=True on a CPU without it is emulated: ~30x slower, not "tuned"
    from taoke.library import resolve

    plan = shared_split(args)
    base = resolve("minilm-l6")
    inputs = plan.spec["inputs"]
    label_id = {name: i for i, name in enumerate(plan.labels)}
    tok = AutoTokenizer.from_pretrained(base.path)

    def dataset(frame):
        ds = Dataset.from_dict({"text": text_column(frame, inputs),
                                "label": [label_id[v] for v in frame["label"].astype(str)]})
        return ds.map(lambda b: tok(b["text"], truncation=True, max_length=args.max_length), batched=True,
                      remove_columns=["text"])

    train, test = dataset(plan.splits["train"]), dataset(plan.splits["test"])
    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        base.path, num_labels=len(plan.labels), id2label=dict(enumerate(plan.labels)), label2id=label_id)
    targs = TrainingArguments(output_dir=str(Path(args.tmp) / ("hf-tuned" if tuned else "hf")),
                              num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
                              learning_rate=args.lr, warmup_steps=0.1, weight_decay=0.01, max_grad_norm=1.0,
                              lr_scheduler_type="linear", seed=args.seed, save_strategy="no", eval_strategy="no",
                              logging_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(),
                              bf16=tuned and cpu_has_bf16(), train_sampling_strategy="group_by_length" if tuned else "random", disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=targs, train_dataset=train, data_collator=DataCollatorWithPadding(tok))
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    pred = trainer.predict(test)
    f1 = f1_score(pred.label_ids, np.argmax(pred.predictions, -1), average="macro",
                  labels=list(range(len(plan.labels))), zero_division=0)
    return {"train_seconds": seconds, "samples_per_s": len(train) * args.epochs / seconds, "macro_f1": float(f1),
            "train_rows": len(train), "classes": len(plan.labels), "threads": torch.get_num_threads()}


def run_worker(name: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--data", args.data, "--epochs", str(args.epochs),
           "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--max-length", str(args.max_length),
           "--seed", str(args.seed), "--tmp", args.tmp]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name} worker failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_seconds"] = wall
    return result


def spread(values: list[float], fmt: str = ".1f") -> str:
    """median (min-max) of repeated runs."""
    med = statistics.median(values)
    return f"{med:{fmt}}" if len(values) == 1 else f"{med:{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


NAMES = {"taoke": "taoke", "hf": "HF Trainer (defaults: fp32)", "hf-tuned": "HF Trainer (bf16, group_by_length)"}


def table(runs: dict[str, list[dict]]) -> list[str]:
    """One row per peer: medians (min-max) over the runs; ratios are medians of the per-round ratios."""
    lines = ["| run | train s | samples/s | whole process s | peak RSS MB | test macro-F1 | taoke speed-up: training "
             "| taoke speed-up: whole process |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    ours = runs["taoke"]
    from taoke.hardware import cpu_has_bf16

    native_bf16 = cpu_has_bf16()
    for key, rs in runs.items():
        train_ratio = [a["samples_per_s"] / b["samples_per_s"] for a, b in zip(ours, rs)]
        whole_ratio = [b["wall_seconds"] / a["wall_seconds"] for a, b in zip(ours, rs)]
        f1 = sorted({round(r["macro_f1"], 4) for r in rs})
        name = NAMES[key] if key != "hf-tuned" or native_bf16 else "HF Trainer (group_by_length; no bf16: emulated here)"
        lines.append(f"| {name} | {spread([r['train_seconds'] for r in rs])} | "
                     f"{spread([r['samples_per_s'] for r in rs])} | {spread([r['wall_seconds'] for r in rs])} | "
                     f"{statistics.median(r['peak_rss_mb'] for r in rs):.0f} | {' / '.join(map(str, f1))} | "
                     f"{spread(train_ratio, '.2f')}x | {spread(whole_ratio, '.2f')}x |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", choices=["taoke", "hf", "hf-tuned"])
    ap.add_argument("--data", choices=["topics", "passages"], default="topics")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each peer, interleaved; medians are reported")
    ap.add_argument("--tmp", default="/tmp/taoke-bench")
    ap.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = ap.parse_args()

    if args.worker:
        sys.path.insert(0, str(ROOT))
        if args.worker == "taoke":
            # start as `taoke derive` does: its CLI imported, then re-executed under its allocator (taoke/allocator.py),
            # so the whole-process time includes that second start
            import taoke.cli  # noqa: F401
            from taoke.allocator import restart_with_mimalloc
            restart_with_mimalloc()
        result = worker_taoke(args) if args.worker == "taoke" else worker_hf(args, args.worker == "hf-tuned")
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        from taoke.allocator import active_allocator
        result["allocator"] = active_allocator()
        print(json.dumps(result))
        return

    runs: dict[str, list[dict]] = {name: [] for name in NAMES}
    for i in range(args.repeat):
        for name in NAMES:
            runs[name].append(run_worker(name, args))
            print(f"round {i + 1}/{args.repeat} {name}: whole process {runs[name][-1]['wall_seconds']:.1f} s, "
                  f"training {runs[name][-1]['train_seconds']:.1f} s", file=sys.stderr, flush=True)
    import torch
    import transformers

    from taoke.hardware import KERNEL_FLAGS, cpu_flags, machine_summary

    first = runs["taoke"][0]
    shape = ("data/chatterbot/topics.csv (one-line openings)" if args.data == "topics" else
             f"passages of {EXCHANGES_PER_PASSAGE} Q/A exchanges of data/chatterbot-lm/text")
    flags = ", ".join(sorted(set(KERNEL_FLAGS) & cpu_flags())) or "none of note"
    lines = [f"### textcls_vs_hf — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC", "",
             f"Command: `.venv/bin/python bench/textcls_vs_hf.py --data {args.data} --epochs {args.epochs} "
             f"--batch-size {args.batch_size} --lr {args.lr} --max-length {args.max_length} --repeat {args.repeat}`",
             "",
             f"machine: {machine_summary()}; CPU flags: {flags}; "
             f"torch {torch.__version__}, transformers {transformers.__version__}", "",
             f"minilm-l6 full fine-tune on {shape} ({first['train_rows']} train rows, {first['classes']} classes, "
             f"median {first['median_tokens']} tokens a text), {args.epochs} epochs, batch {args.batch_size}, "
             f"lr {args.lr}, max length {args.max_length}, seed {args.seed}; {args.repeat} runs per peer, "
             "interleaved: median (min-max). Whole process: the subprocess from start to exit (imports, split, "
             "tokenisation, model load, training, test prediction). taoke's process starts as `taoke derive` does: "
             f"it re-executes itself under {first.get('allocator', '?')} (taoke/allocator.py), HF's runs under the "
             "C library's malloc.", "", *table(runs), ""]
    text = "\n".join(lines)
    print(text)
    if not args.no_record:
        results_md = ROOT / "bench" / "RESULTS.md"
        if not results_md.exists():
            results_md.write_text("# Benchmark results\n\nAppended by the scripts in bench/; newest last.\n\n")
        with open(results_md, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
