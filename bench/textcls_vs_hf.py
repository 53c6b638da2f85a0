"""Text classification training: taoke vs HF Trainer on the same base, data, split and hyperparameters.

    .venv/bin/python bench/textcls_vs_hf.py [--epochs 3] [--batch-size 16] [--lr 1e-4]

Each side runs in its own fresh subprocess (so peak RSS is its own); both get the rows of taoke's
seeded split of data/chatterbot/topics.csv, minilm-l6, the same epochs, batch size, learning rate,
warmup, weight decay, max length and seed. Prints wall time, training samples/s, peak RSS and test
macro-F1 for each, and the samples/s ratio; appends the table to bench/RESULTS.md.

HF Trainer is run twice: with its defaults (fp32, random batches) and with bf16=True and
train_sampling_strategy="group_by_length", its own switches for what taoke does by default.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "text-topics.yaml"


def shared_split(max_length: int):
    from taoke.data.prepare import prepare_data
    from taoke.recipe import load_recipe

    recipe = load_recipe(RECIPE, [f"preprocess=[{{normalize_text: {{}}}}, {{dedup: {{}}}}, "
                                     f"{{tokenize: {{max_length: {max_length}}}}}]"])
    plan = prepare_data(recipe)
    return plan


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

    plan = shared_split(args.max_length)
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
            "train_rows": len(train), "threads": torch.get_num_threads()}


def worker_hf(args, tuned: bool) -> dict:
    import numpy as np
    import torch
    from datasets import Dataset
    from sklearn.metrics import f1_score
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments)

    from taoke.data.encode import text_column
    from taoke.library import resolve

    plan = shared_split(args.max_length)
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
                              bf16=tuned, train_sampling_strategy="group_by_length" if tuned else "random", disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=targs, train_dataset=train, data_collator=DataCollatorWithPadding(tok))
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    pred = trainer.predict(test)
    f1 = f1_score(pred.label_ids, np.argmax(pred.predictions, -1), average="macro",
                  labels=list(range(len(plan.labels))), zero_division=0)
    return {"train_seconds": seconds, "samples_per_s": len(train) * args.epochs / seconds, "macro_f1": float(f1),
            "train_rows": len(train), "threads": torch.get_num_threads()}


def run_worker(name: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--epochs", str(args.epochs), "--batch-size",
           str(args.batch_size), "--lr", str(args.lr), "--max-length", str(args.max_length), "--seed", str(args.seed),
           "--tmp", args.tmp]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name} worker failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_seconds"] = wall
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", choices=["taoke", "hf", "hf-tuned"])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tmp", default="/tmp/taoke-bench")
    ap.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = ap.parse_args()

    if args.worker:
        sys.path.insert(0, str(ROOT))
        result = worker_taoke(args) if args.worker == "taoke" else worker_hf(args, args.worker == "hf-tuned")
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return

    results = {name: run_worker(name, args) for name in ("taoke", "hf", "hf-tuned")}
    import torch
    import transformers

    from taoke.hardware import machine_summary

    lines = [f"### textcls_vs_hf — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC", "",
             f"machine: {machine_summary()}; torch {torch.__version__}, transformers {transformers.__version__}", "",
             f"minilm-l6 full fine-tune on data/chatterbot/topics.csv ({results['taoke']['train_rows']} train rows), "
             f"{args.epochs} epochs, batch {args.batch_size}, lr {args.lr}, max length {args.max_length}, seed "
             f"{args.seed}", "",
             "| run | train s | samples/s | peak RSS MB | test macro-F1 | taoke speed-up |",
             "|---|---:|---:|---:|---:|---:|"]
    names = {"taoke": "taoke", "hf": "HF Trainer (defaults: fp32)", "hf-tuned": "HF Trainer (bf16, group_by_length)"}
    for key, r in results.items():
        ratio = results["taoke"]["samples_per_s"] / r["samples_per_s"]
        lines.append(f"| {names[key]} | {r['train_seconds']:.1f} | {r['samples_per_s']:.1f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['macro_f1']:.4f} | {ratio:.2f}x |")
    lines.append("")
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
