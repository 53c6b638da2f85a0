"""Where a bf16 LoRA training step's time goes: taoke's fused forward against PEFT's own, and SDPA's share.

    .venv/bin/python bench/lora_step_cost.py [--data poems|chatterbot] [--batch 8] [--seq-len 256] [--rounds 4]

One process, smollm2-135m with LoRA r=16 on the seven projections, frozen weights in bf16, bf16 autocast: the step
`train_lm` runs (forward, chunked cross-entropy, backward) on packed rows of the bench's data, timed with
(a) taoke's fused LoRA forward (the adapter's update added in fp32, fp32 outputs) and (b) PEFT's own LoRA forward
(the update summed into the bf16 output), interleaved round by round; medians and spread. Then
torch's CPU scaled-dot-product attention alone, forward and backward, on the model's attention shape in bf16 and
fp32 (causal), times the layer count: the part of a step no LoRA forward can change.
Appends its section to bench/RESULTS.md (--no-record: print only).
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from results import record  # noqa: E402

FORWARDS = {"fused": True, "peft": False}   # FastLoraForward enabled or not


def timed_batches(batches: list[dict], r: int) -> list[dict]:
    """The two batches round `r` trains on (every forward gets the same ones)."""
    return [batches[(2 * r) % len(batches)], batches[(2 * r + 1) % len(batches)]]


def step_times(model, batches, rounds: int) -> dict[str, list[float]]:
    """Seconds per training step for each forward, `rounds` interleaved rounds of two steps each."""
    import torch

    from taoke.lm.fast_lora import FastLoraForward
    from taoke.lm.loss import lm_loss_sum

    def step(batch):
        with torch.autocast("cpu", torch.bfloat16):
            loss_sum, _ = lm_loss_sum(model, batch)
        loss_sum.backward()
        model.zero_grad(set_to_none=True)

    times = {name: [] for name in FORWARDS}
    for r in range(rounds + 1):   # round 0 warms both up and is not kept
        for name, fused in FORWARDS.items():
            with FastLoraForward(model, enabled=fused):
                t = time.perf_counter()
                for b in timed_batches(batches, r):
                    step(b)
                if r:
                    times[name].append((time.perf_counter() - t) / 2)
    return times


def sdpa_times(batch: int, heads: int, seq: int, head_dim: int, dtype, reps: int = 6) -> tuple[list, list]:
    """Forward and backward seconds of causal SDPA on (batch, heads, seq, head_dim), `reps` of each after two
    warm-up calls."""
    import torch
    import torch.nn.functional as F

    q, k, v = (torch.randn(batch, heads, seq, head_dim, dtype=dtype, requires_grad=True) for _ in range(3))
    fwd, bwd = [], []
    for i in range(reps + 2):
        t0 = time.perf_counter()
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        t1 = time.perf_counter()
        out.sum().backward()
        if i >= 2:
            fwd.append(t1 - t0)
            bwd.append(time.perf_counter() - t1)
    return fwd, bwd


def spread(xs: list[float], scale: float = 1.0, digits: int = 3) -> str:
    """median (min-max) of xs * scale."""
    m, lo, hi = (scale * v for v in (statistics.median(xs), min(xs), max(xs)))
    return f"{m:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", choices=("poems", "chatterbot"), default="poems")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    import torch

    from bench.sft_vs_hf import TARGETS, rows_and_heldout
    from taoke.adapt.language import adapt_lm
    from taoke.hardware import cpu_flags, machine_summary
    from taoke.lm.frozen import FrozenInLowPrecision
    from taoke.lm.load import load_causal_lm
    from taoke.lm.train import make_batches
    from taoke.recipe import AdaptConfig

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tok = load_causal_lm("smollm2-135m", device="cpu")
    rows, _ = rows_and_heldout(tok, args.seq_len, args.data)
    model, _ = adapt_lm(model, AdaptConfig(method="lora", target_modules=TARGETS, r=16, alpha=32, dropout=0.0))
    model.train()
    batches = make_batches(rows, args.seq_len, args.batch, tok.pad_token_id, True, seed=0)
    with FrozenInLowPrecision(model, torch.bfloat16):
        times = step_times(model, batches, args.rounds)
    # tokens a step over the batches the kept rounds trained on (round 0 is the warm-up)
    timed = [b for r in range(1, args.rounds + 1) for b in timed_batches(batches, r)]
    tokens = statistics.mean(int(b["n_real"]) for b in timed)

    cfg = model.config
    heads, head_dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    attn = {name: sdpa_times(args.batch, heads, args.seq_len, head_dim, dtype)
            for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32))}
    layers = cfg.num_hidden_layers
    fused, peft = statistics.median(times["fused"]), statistics.median(times["peft"])
    flags = ", ".join(sorted({"amx_bf16", "avx512_bf16", "avx512f", "avx2"} & cpu_flags()))
    lines = [
        "", f"## lora_step_cost — {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%dT%H:%M')}", "",
        f"smollm2-135m LoRA r=16 on {', '.join(TARGETS)}, frozen weights bf16, bf16 autocast; {args.data} packed "
        f"rows, batch {args.batch} x {args.seq_len} (~{tokens:.0f} tokens a step); {args.rounds} interleaved rounds "
        f"of 2 steps per forward after a warm-up round; threads {args.threads}. {machine_summary()}; CPU flags: "
        f"{flags}. Command: `.venv/bin/python bench/lora_step_cost.py --data {args.data} --batch {args.batch} "
        f"--seq-len {args.seq_len} --rounds {args.rounds}`.", "",
        "| LoRA forward | s / step, median (min-max) | tokens/s | vs PEFT's |", "|---|---:|---:|---:|",
        f"| taoke fused (update added in fp32) | {spread(times['fused'])} | {tokens / fused:.1f} | "
        f"{peft / fused:.2f}x |",
        f"| PEFT's own (update summed in bf16) | {spread(times['peft'])} | {tokens / peft:.1f} | 1.00x |", "",
        f"| causal SDPA, ({args.batch}, {heads}, {args.seq_len}, {head_dim}) | forward ms, median (min-max) | "
        f"backward ms, median (min-max) | x {layers} layers, s | share of a fused step |", "|---|---:|---:|---:|---:|",
    ]
    for name, (f, b) in attn.items():
        both = layers * (statistics.median(f) + statistics.median(b))
        lines.append(f"| {name} | {spread(f, 1000, 1)} | {spread(b, 1000, 1)} | {both:.3f} | {both / fused:.0%} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_record:
        record(text)


if __name__ == "__main__":
    main()
