"""Training smollm2-135m: taoke vs HF Trainer (+ PEFT) and TRL, in three methods (--method):

- lora (default): LoRA SFT, taoke's train_lm vs HF Trainer + PEFT (and TRL SFTTrainer when installed);
- full: full fine-tuning SFT, the same peers without adapters;
- dpo: DPO with LoRA, taoke's train_dpo vs TRL DPOTrainer (peers taoke,trl,trl-bf16) on
  data/chatterbot-lm/dpo_pairs.jsonl (short) or, with --data poems, pairs built from the poems (long: chosen is the
  poem written for the request, rejected the poem of another request); held-out DPO loss and preference accuracy
  from one evaluator (taoke.lm.dpo.evaluate_dpo) for every peer.

Same model, data (every 10th example held out), assistant-only labels, LoRA config, sequence length, batch
size (rows per step), steps, lr and schedule. Two data shapes: `--data chatterbot` (short dialog turns,
~40 tokens) and `--data poems` (an instruction and a Chinese poem, 110-300 tokens, data/poems-zh). Each peer runs in a fresh
subprocess so peak RSS does not mix. Held-out loss is computed by one function (taoke.lm.train.evaluate_lm,
exact per-token mean) for every peer. Prints a markdown table and appends it to bench/RESULTS.md.

    .venv/bin/python bench/sft_vs_hf.py --steps 40 --threads 2 --peers taoke,hf --repeat 3
    .venv/bin/python bench/sft_vs_hf.py --steps 40 --threads 2 --peers taoke,hf --repeat 3 --compile true --cold-cache
    .venv/bin/python bench/sft_vs_hf.py --data poems --batch 8 --steps 20 --threads 2 --dropout 0.05 --repeat 3
    .venv/bin/python bench/sft_vs_hf.py --method full --lr 2e-5 --data poems --batch 8 --steps 20 --threads 2
    .venv/bin/python bench/sft_vs_hf.py --method dpo --peers taoke,trl,trl-bf16 --lr 5e-5 --batch 8 --steps 20

The machine's speed drifts (shared cores), so --repeat interleaves the peers and the table reports medians,
the per-run ratios and every run. "steady" tokens/s leave out the first steps (warm-up, compiling).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from taoke.allocator import active_allocator, preload_env  # noqa: E402
from results import record  # noqa: E402
DATA = {"chatterbot": ROOT / "data" / "chatterbot" / "dialogs.jsonl", "poems": ROOT / "data" / "poems-zh" / "poems.jsonl"}
# lora_dropout defaults to 0, the default of PEFT, LLaMA-Factory and recipes/sft-lora.yaml (--dropout sets it)
LORA = dict(r=16, alpha=32)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DPO_DATA = ROOT / "data" / "chatterbot-lm" / "dpo_pairs.jsonl"
BETA = 0.1  # DPO temperature, TRL's default and the recipe's
# FLOP per trained token: forward 2N, input gradients 2N, weight gradients 2N where the weights train; DPO with
# LoRA adds the reference model's forward (adapters off) over the same tokens
FLOP_PER_TOKEN = {"lora": 4, "full": 6, "dpo": 6}
SKIP_STEPS = 5  # steady-state tokens/s starts after this many optimizer steps, for every peer
# --isa avx2: this CPU made to run as an AVX2-only one would (no AVX512, bf16 emulated), for every peer alike
AVX2_ONLY = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def rows_and_heldout(tok, seq_len, data):
    from taoke.lm.data import encode_conversations, read_conversations

    convs = read_conversations(DATA[data])
    train = [c for i, c in enumerate(convs) if i % 10]
    held = [c for i, c in enumerate(convs) if i % 10 == 0]
    return encode_conversations(tok, train, seq_len), encode_conversations(tok, held, seq_len)


# ---------------------------------------------------------------------------------------------- workers

def worker(peer: str, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from taoke.adapt.language import adapt_lm
    from taoke.hardware import peak_rss_mb
    from taoke.lm.load import load_causal_lm
    from taoke.lm.train import evaluate_lm, train_lm

    model, tok = load_causal_lm("smollm2-135m", device="cpu")
    if args.method == "dpo":
        return dpo_worker(peer, args, model, tok)
    train, held = rows_and_heldout(tok, args.seq_len, args.data)
    # the recipe blocks a taoke run of this benchmark would hold
    train_cfg, lm_cfg, adapt_cfg = recipe_blocks(peer, args)
    marks = []  # (seconds since training started, tokens so far) at the end of each optimizer step
    compiled = False
    if peer.startswith("taoke"):
        model, _ = adapt_lm(model, adapt_cfg)
        t0 = time.perf_counter()
        hist = train_lm(model, tok, train, train_cfg, lm_cfg, progress=False,
                        on_step=lambda row: marks.append((time.perf_counter() - t0, row["tokens"])))
        tokens, seconds, examples, model, compiled = hist.tokens, hist.seconds, None, hist.model, hist.compiled
        precision, probe = hist.precision, probe_speedup(hist)
    else:
        tokens, seconds, examples, model = _hf_train(peer, model, tok, train, args, marks)
        precision, probe = ("bf16" if peer.endswith("-bf16") else "fp32"), None
    train_rss = peak_rss_mb()  # the peak up to the end of training, before the shared evaluation
    held_loss = evaluate_lm(model, held, tok.pad_token_id, args.seq_len, batch_size=4)["loss"]
    n_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    return {"peer": peer, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "steady_tokens_per_s": steady_rate(marks), "compiled": compiled, "precision": precision,
            "precision_probe": probe, "held_out_loss": held_loss, "peak_rss_mb": peak_rss_mb(),
            "train_peak_rss_mb": train_rss, "examples": examples, "params": n_params,
            "allocator": active_allocator()}


def probe_speedup(hist) -> float | None:
    """bf16 / fp32 speed of the step that taoke's precision probe timed (None when nothing was measured)."""
    measured = (hist.precision_choice or {}).get("measured") or {}
    return measured.get("speedup")


def recipe_blocks(peer, args):
    """The train, lm and adapt blocks a taoke recipe of this benchmark would hold."""
    from taoke.recipe import AdaptConfig, LMConfig, TrainConfig

    train_cfg = TrainConfig(lr=args.lr, max_steps=args.steps, batch_size=args.batch, warmup_ratio=0.1,
                            scheduler="cosine", max_grad_norm=1.0, weight_decay=0.0, seed=args.seed,
                            threads=args.threads,
                            precision="fp32" if peer == "taoke-fp32" else "auto")
    lm_cfg = LMConfig(seq_len=args.seq_len, compile=args.compile, beta=BETA)
    adapt_cfg = (AdaptConfig(method="full") if args.method == "full" else
                 AdaptConfig(method="lora", target_modules=TARGETS, r=LORA["r"], alpha=LORA["alpha"],
                             dropout=args.dropout))
    return train_cfg, lm_cfg, adapt_cfg


def poem_pairs() -> list[dict]:
    """DPO pairs of the long shape, from data/poems-zh: the request; chosen, the poem written for it; rejected, the
    poem of the request half the file away (a real poem, on another title, often in another form)."""
    from taoke.lm.data import read_conversations

    convs = read_conversations(DATA["poems"])
    half = len(convs) // 2
    return [{"prompt": c[:-1], "chosen": c[-1]["content"], "rejected": convs[(i + half) % len(convs)][-1]["content"]}
            for i, c in enumerate(convs)]


def dpo_split(data: str) -> tuple[list[dict], list[dict]]:
    from taoke.lm.data import read_dpo_pairs

    pairs = poem_pairs() if data == "poems" else read_dpo_pairs(DPO_DATA)
    return [p for i, p in enumerate(pairs) if i % 10], [p for i, p in enumerate(pairs) if i % 10 == 0]


def dpo_worker(peer: str, args, model, tok) -> dict:
    from taoke.adapt.language import adapt_lm
    from taoke.hardware import peak_rss_mb
    from taoke.lm.dpo import encode_pairs, evaluate_dpo, train_dpo

    train, held = dpo_split(args.data)
    marks = []
    if peer.startswith("taoke"):
        train_cfg, lm_cfg, adapt_cfg = recipe_blocks(peer, args)
        model, _ = adapt_lm(model, adapt_cfg)
        t0 = time.perf_counter()
        hist = train_dpo(model, tok, encode_pairs(tok, train, args.seq_len), train_cfg, lm_cfg,
                         on_step=lambda row: marks.append((time.perf_counter() - t0, row["tokens"])))
        tokens, seconds, model, precision = hist.tokens, hist.seconds, hist.model, hist.precision
        probe = probe_speedup(hist)
    else:
        tokens, seconds, model = _trl_dpo(peer, model, tok, train, args, marks)
        precision, probe = ("bf16" if peer.endswith("-bf16") else "fp32"), None
    train_rss = peak_rss_mb()
    ev = evaluate_dpo(model, tok, encode_pairs(tok, held, args.seq_len), beta=BETA)
    n_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    return {"peer": peer, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "steady_tokens_per_s": steady_rate(marks), "compiled": False, "precision": precision,
            "precision_probe": probe, "held_out_loss": ev["dpo_loss"],
            "preference_acc": ev["preference_acc"], "reward_acc": ev["reward_acc"], "peak_rss_mb": peak_rss_mb(),
            "train_peak_rss_mb": train_rss, "examples": args.steps * args.batch, "params": n_params,
            "allocator": active_allocator()}


def steady_rate(marks: list[tuple[float, int]], skip: int = SKIP_STEPS) -> float:
    """Tokens/s from the end of step `skip` to the last step: one-time costs (warm-up, compiling) left out."""
    if len(marks) <= skip + 1:
        return float("nan")
    (t_a, n_a), (t_b, n_b) = marks[skip - 1], marks[-1]
    return (n_b - n_a) / (t_b - t_a)


class _TokenCounter:
    """Counts non-padding tokens fed to the model (attention_mask sum) without touching the training math.

    Batches are counted in the order they are collated, so the tokens of the first k steps are known even
    though accelerate's dataloader collates one batch ahead."""

    def __init__(self):
        self.per_batch: list[int] = []

    def __call__(self, collate):
        def wrapped(features):
            batch = collate(features)
            self.per_batch.append(int(batch["attention_mask"].sum()))
            return batch
        return wrapped


def _step_marks(counter: "_TokenCounter", marks: list, t0: list[float]):
    """A TrainerCallback appending (seconds, tokens of the steps so far) at each optimizer step's end."""
    from transformers import TrainerCallback

    class Marks(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            marks.append((time.perf_counter() - t0[0], sum(counter.per_batch[:state.global_step])))

    return Marks()


def _hf_args(peer, args) -> dict:
    """TrainingArguments shared by every HF/TRL peer: the recipe's schedule, the peer's own defaults otherwise."""
    return dict(output_dir="/tmp/taoke-bench-hf", per_device_train_batch_size=args.batch, max_steps=args.steps,
                learning_rate=args.lr, warmup_steps=int(0.1 * args.steps), lr_scheduler_type="cosine",
                max_grad_norm=1.0, weight_decay=0.0, logging_steps=max(1, args.steps // 4), save_strategy="no",
                report_to=[], seed=args.seed, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
                bf16=peer.endswith("-bf16"))


def _lora_config(dropout: float):
    from peft import LoraConfig

    return LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=dropout, target_modules=TARGETS,
                      task_type="CAUSAL_LM")


def _timed_train(trainer, counter, marks, steps):
    """Run trainer.train() with step marks; (non-padding tokens of the trained steps, seconds)."""
    t0 = [0.0]
    trainer.add_callback(_step_marks(counter, marks, t0))
    t0[0] = time.perf_counter()
    trainer.train()
    return sum(counter.per_batch[:steps]), time.perf_counter() - t0[0]


def _trl_dpo(peer, model, tok, train, args, marks):
    """TRL's DPOTrainer with the same LoRA, data and schedule; the reference is the model with adapters off."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    ds = Dataset.from_list([{"prompt": p["prompt"], "chosen": [{"role": "assistant", "content": p["chosen"]}],
                             "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in train])
    trainer = DPOTrainer(model=model, args=DPOConfig(**_hf_args(peer, args), beta=BETA, max_length=args.seq_len),
                         train_dataset=ds, processing_class=tok, peft_config=_lora_config(args.dropout))
    counter = _TokenCounter()
    trainer.data_collator = counter(trainer.data_collator)
    tokens, seconds = _timed_train(trainer, counter, marks, args.steps)
    return tokens, seconds, trainer.model


def _hf_train(peer, model, tok, train, args, marks):
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    # completion_mask carries the assistant-only loss mask into TRL's collator (it rebuilds labels from it)
    ds = Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"],
                             "attention_mask": [1] * len(r["input_ids"]),
                             "completion_mask": [int(x != -100) for x in r["labels"]]} for r in train])
    common = _hf_args(peer, args)
    counter = _TokenCounter()
    lora = None if args.method == "full" else _lora_config(args.dropout)
    if peer in ("hf", "hf-bf16"):
        ds = ds.remove_columns("completion_mask")
        if lora is not None:
            model = get_peft_model(model, lora)
        collate = counter(DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100))
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=ds, data_collator=collate)
    else:
        from trl import SFTConfig, SFTTrainer

        trainer = SFTTrainer(model=model, args=SFTConfig(**common, max_length=args.seq_len, packing=False,
                                                         dataset_text_field=None),
                             train_dataset=ds, processing_class=tok, peft_config=lora)
        trainer.data_collator = counter(trainer.data_collator)
        model = trainer.model
    tokens, seconds = _timed_train(trainer, counter, marks, args.steps)
    return tokens, seconds, args.steps * args.batch, trainer.model


# ---------------------------------------------------------------------------------------------- driver

# (m, k, n) matmuls the peak is the best of: square ones, and the tall ones a training step is made of (rows of
# 2048 tokens). A single 1024^3 matmul under-reads AMX: 1448 GFLOP/s bf16 where 4096 x 1024 x 1024 gives 3517
# on the same Xeon (2026-12-06), which had MFU figures read ~2x too high
PEAK_SHAPES = [(1024, 1024, 1024), (2048, 2048, 2048), (4096, 1024, 1024), (2048, 576, 1536), (2048, 1536, 576)]


def matmul_peak(threads: int, dtype_name: str, shapes=PEAK_SHAPES, reps: int = 20) -> float:
    """Best-of-reps FLOP/s over `shapes` of matmuls in the given dtype on this machine, same thread count."""
    import torch

    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    best_rate = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        a @ b
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
        best_rate = max(best_rate, 2 * m * k * n / best)
    return best_rate


def run_peer(peer, args) -> dict:
    out = Path(f"/tmp/taoke-bench-{peer}-{os.getpid()}.json")
    cmd = [sys.executable, __file__, "--worker", peer, "--out", str(out), "--steps", str(args.steps),
           "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--lr", str(args.lr),
           "--threads", str(args.threads), "--compile", args.compile, "--data", args.data, "--dropout", str(args.dropout),
           "--method", args.method, "--seed", str(args.seed)]
    env, cache = dict(os.environ), None
    if peer.startswith("taoke") and peer != "taoke-sysmalloc":
        # the allocator `taoke derive` runs training under (taoke/allocator.py); taoke-sysmalloc: the C library's
        env = preload_env(env) or env
    if args.cold_cache:  # inductor's on-disk cache starts empty: the compile is paid in full in this run
        cache = env["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="taoke-bench-inductor-")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if cache:
        shutil.rmtree(cache, ignore_errors=True)
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"peer": peer, "error": " | ".join(tail)[-300:]}
    return json.loads(out.read_text())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for every peer (1 is fastest when the "
                                                           "machine is shared; set to the core count otherwise)")
    ap.add_argument("--peers", default="taoke,hf,hf-bf16,trl",
                    help="hf: HF Trainer+PEFT defaults (fp32); hf-bf16: the same with bf16=True; "
                         "taoke-fp32: taoke with train.precision fp32; taoke-sysmalloc: taoke under the C "
                         "library's malloc (TAOKE_ALLOCATOR=system) instead of the mimalloc `taoke derive` uses")
    ap.add_argument("--method", default="lora", choices=sorted(FLOP_PER_TOKEN),
                    help="lora: LoRA SFT; full: full fine-tuning SFT; dpo: DPO with LoRA on the chatterbot pairs "
                         "(peers taoke,trl,trl-bf16; the ratios are against trl)")
    ap.add_argument("--data", default="chatterbot", choices=sorted(DATA),
                    help="SFT data (lora, full); dpo: chatterbot = the shipped pairs, poems = pairs built from "
                         "the poems")
    ap.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout, the same for every peer")
    ap.add_argument("--compile", default="false", choices=["auto", "true", "false"],
                    help="taoke's train.compile (torch.compile of the decoder layers)")
    ap.add_argument("--cold-cache", action="store_true", help="give every run an empty torch.compile cache")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run the peers this many times, interleaved, and report medians (the machine drifts)")
    ap.add_argument("--isa", default="native", choices=["native", "avx2"],
                    help="avx2: cap oneDNN, ATen and MKL at AVX2 (bf16 then emulated) in every process, to measure "
                         "what a CPU without AVX512 and native bf16 gets")
    ap.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    ap.add_argument("--seed", type=int, default=0, help="every peer's seed (initialisation, data order, dropout): "
                    "rerun with others to see how far held-out loss moves with them alone")
    ap.add_argument("--worker")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.isa == "avx2":   # before torch loads: the workers inherit it, the matmul peak below runs under it
        os.environ.update(AVX2_ONLY)
    if args.worker:
        Path(args.out).write_text(json.dumps(worker(args.worker, args)))
        return

    import importlib.util

    import torch
    import transformers
    import peft

    peers = [p for p in args.peers.split(",") if not p.startswith("trl") or importlib.util.find_spec("trl")]
    from taoke.hardware import KERNEL_FLAGS, cpu_flags, cpu_has_bf16, cpu_model

    load_before = os.getloadavg()[0]
    native_bf16 = cpu_has_bf16()   # without it the bf16 "peak" is emulation: no MFU against it

    def peak_pair() -> tuple[float, float]:
        # emulated bf16 runs at ~1 GFLOP/s, so its probe alone would take ~12 minutes: not timed (nan)
        bf16 = matmul_peak(args.threads, "bfloat16") if native_bf16 else float("nan")
        return bf16, matmul_peak(args.threads, "float32")

    # the peak is taken before and after the runs and the higher kept: one slow spell must not inflate MFU
    peaks = [peak_pair()]
    runs = {p: [] for p in peers}
    for _ in range(args.repeat):  # interleaved, so a slow spell of the machine hits every peer alike
        for p in peers:
            runs[p].append(run_peer(p, args))
    peaks.append(peak_pair())
    peak_bf16, peak_fp32 = max(p[0] for p in peaks), max(p[1] for p in peaks)

    def med(rs, key):
        return statistics.median(r[key] for r in rs)

    ok = {p: [r for r in rs if "error" not in r] for p, rs in runs.items()}
    # the peer every ratio is against: TRL for DPO, else HF's default, else the first peer that is not taoke
    others = [p for p in peers if not p.startswith("taoke")]
    baseline = "trl" if args.method == "dpo" else "hf" if "hf" in peers or not others else others[0]
    base_runs = ok.get(baseline) or []
    loss_name = "held-out DPO loss | held-out preference acc" if args.method == "dpo" else "held-out loss"
    lines = [f"| peer | non-pad tokens/s | vs {baseline} | steady tokens/s | steady vs {baseline} | per-run steady "
             f"vs {baseline} | MFU (bf16 peak) | MFU (fp32 peak) | peak RSS MB training | peak RSS MB incl. eval | "
             f"{loss_name} | tokens seen |", "|---|---|---|---|---|---|---|---|---|---|---|---|"
             + ("---|" if args.method == "dpo" else "")]
    for p in peers:
        rs = ok[p]
        if not rs:
            lines.append(f"| {p} | failed: {runs[p][0]['error']} |" + " |" * (11 + (args.method == "dpo")))
            continue
        rate, steady = med(rs, "tokens_per_s"), med(rs, "steady_tokens_per_s")
        ratio = rate / med(base_runs, "tokens_per_s") if base_runs else float("nan")
        steady_ratio = steady / med(base_runs, "steady_tokens_per_s") if base_runs else float("nan")
        per_run = [a["steady_tokens_per_s"] / b["steady_tokens_per_s"] for a, b in zip(runs[p], runs.get(baseline, []))
                   if "error" not in a and "error" not in b]
        spread = f"{min(per_run):.2f}-{max(per_run):.2f}x" if per_run else ""
        flops = FLOP_PER_TOKEN[args.method] * rs[0]["params"] * steady
        mfu_bf16 = f"{flops / peak_bf16:.1%}" if native_bf16 else "n/a"
        quality = f"{med(rs, 'held_out_loss'):.4f}"
        if args.method == "dpo":
            quality += f" | {med(rs, 'preference_acc'):.3f}"
        precisions = "/".join(sorted({r["precision"] for r in rs}))   # runs of one peer may choose differently
        name = f"{p} ({precisions}{', compiled' if rs[0].get('compiled') else ''}, {rs[0].get('allocator', '?')})"
        lines.append(f"| {name} | {rate:.1f} | {ratio:.2f}x | {steady:.1f} | {steady_ratio:.2f}x | {spread} | "
                     f"{mfu_bf16} | {flops / peak_fp32:.1%} | {max(r['train_peak_rss_mb'] for r in rs):.0f} | "
                     f"{max(r['peak_rss_mb'] for r in rs):.0f} | {quality} | {rs[0]['tokens']} |")
    lines.append("")
    for p in peers:  # every run, so the spread behind the medians is on record
        lines.append(f"- {p} per run (tokens/s, steady tokens/s, precision): " + ", ".join(
            f"{r['tokens_per_s']:.1f} / {r['steady_tokens_per_s']:.1f} / {r['precision']}"
            + (f" (probe: bf16 {r['precision_probe']:.2f}x fp32)" if r.get("precision_probe") else "")
            if "error" not in r else "failed" for r in runs[p]))
    cpu = cpu_model()
    dpo_pairs = (f"built from {DATA['poems'].relative_to(ROOT)} (chosen: the poem for the request; rejected: the poem "
                 "of the request half the file away)" if args.data == "poems" else str(DPO_DATA.relative_to(ROOT)))
    what = {"lora": f"LoRA SFT smollm2-135m (r={LORA['r']}, alpha={LORA['alpha']}, dropout={args.dropout}, all "
                    f"linear projections), data {args.data} ({DATA[args.data].relative_to(ROOT)})",
            "full": f"Full fine-tuning SFT smollm2-135m, data {args.data} ({DATA[args.data].relative_to(ROOT)})",
            "dpo": f"DPO (beta {BETA}) with LoRA smollm2-135m (r={LORA['r']}, alpha={LORA['alpha']}, "
                   f"dropout={args.dropout}, all linear projections), pairs {dpo_pairs} (every 10th held out); "
                   f"batch = pairs, tokens = chosen + rejected"}[args.method]
    head = (f"\n## sft_vs_hf --method {args.method} — {datetime.datetime.now().isoformat(timespec='minutes')}\n\n"
            f"{what}, "
            f"steps={args.steps}, batch={args.batch} rows, seq_len={args.seq_len}, lr={args.lr}, "
            f"seed={args.seed}, threads={args.threads}, "
            f"taoke compile={args.compile}{' (cold cache)' if args.cold_cache else ''}, {args.repeat} interleaved run(s) per peer (medians; RSS: the largest). "
            f"Machine: {os.cpu_count()} cores, {cpu}, native bf16: {cpu_has_bf16()}; "
            + (f"run as an AVX2-only CPU ({', '.join(f'{k}={v}' for k, v in AVX2_ONLY.items())}: no AVX512, bf16 "
               f"emulated; the fp32 peak is the one that counts); " if args.isa == "avx2" else "")
            + f"matmul peak (best over {len(PEAK_SHAPES)} shapes, before and after the runs) bf16 "
              + (f"{peak_bf16 / 1e9:.1f} GFLOP/s" if native_bf16 else "not timed (emulated)")
              + f", fp32 {peak_fp32 / 1e9:.1f} GFLOP/s. "
            f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}"
            + (f", trl {__import__('trl').__version__}" if any(p.startswith("trl") for p in peers) else "") + ".\n"
            + ("DPO: TRL pads each batch of pairs to its longest sequence; taoke packs the chosen and rejected "
               "sequences into rows of seq_len tokens (lm.packing, its default), each attending only to itself. "
               "Held-out DPO loss and preference accuracy: same evaluator (taoke.lm.dpo.evaluate_dpo, padded) for "
               "all. " if args.method == "dpo" else
               "taoke packs rows of seq_len tokens; HF/TRL pad each batch of examples to its longest, so at equal "
               "steps and batch taoke sees more tokens. Held-out loss: same evaluator for all. ")
            + f"MFU: {FLOP_PER_TOKEN[args.method]}N FLOP per token (the matmul precision each peer trained in is "
              "beside its name; a run in bf16 can pass 100% of the fp32 peak). tokens/s: whole training call; "
              "steady: from the "
              f"end of step {SKIP_STEPS} on (warm-up and compiling left out). CPU flags: "
              f"{', '.join(sorted(set(KERNEL_FLAGS) & cpu_flags()))}; load average before / after: {load_before:.1f} / "
              f"{os.getloadavg()[0]:.1f}.\n\n")
    text = head + "\n".join(lines) + "\n"
    print(text)
    if args.no_record:
        return
    record(text)


if __name__ == "__main__":
    main()
