"""How steady taoke's precision probe is: bf16 / fp32 speed of the step each training loop times, probed repeatedly.

    .venv/bin/python bench/precision_probe.py [--probes 4] [--threads 2]

Loops choose bf16 only when the probe measures it at least MIN_SPEEDUP faster than fp32 (taoke.train.precision).
A probe whose figures straddle that threshold makes two runs of one recipe train in different precisions. Cases:
LoRA and full fine-tuning SFT on one packed 256-token row of chatterbot (what train_lm times), DPO on one pair and
on the first packed row of 8 pairs (what train_dpo timed before and times now). Prints the table; it records nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def probes(model, loss, n: int) -> list[float]:
    import torch

    from taoke.lm.fast_lora import FastLoraForward
    from taoke.train.precision import choose_for_training

    out = []
    for _ in range(n):
        with FastLoraForward(model):
            out.append(choose_for_training("auto", torch.device("cpu"), model, loss).measured["speedup"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--probes", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch

    from bench.sft_vs_hf import dpo_split, rows_and_heldout
    from taoke.adapt.language import adapt_lm
    from taoke.hardware import cpu_flags, cpu_has_bf16, machine_summary
    from taoke.lm.dpo import encode_pairs, pair_batch, sequence_logprobs
    from taoke.lm.load import load_causal_lm
    from taoke.lm.train import lm_loss_sum, make_batches
    from taoke.recipe import AdaptConfig
    from taoke.train.precision import MIN_SPEEDUP

    if not cpu_has_bf16():
        raise SystemExit("this CPU has no native bf16: every loop trains in fp32 without probing")
    torch.set_num_threads(args.threads)
    rows = []
    for method in ("lora", "full"):
        model, tok = load_causal_lm("smollm2-135m", device="cpu")
        cfg = AdaptConfig(method="full") if method == "full" else AdaptConfig(method="lora", r=16, alpha=32,
                                                                              dropout=0.0)
        model, _ = adapt_lm(model, cfg)
        model.train()
        if method == "lora":   # DPO trains LoRA too: the same adapted model
            pairs = encode_pairs(tok, dpo_split()[0][:8], 256)
            one = pair_batch(pairs[:1], tok.pad_token_id, "cpu", 256)
            row = {k: v[:1] for k, v in pair_batch(pairs, tok.pad_token_id, "cpu", 256).items()}
            for name, probe in (("DPO, one pair", one), ("DPO, first packed row of 8 pairs", row)):
                tokens = int((probe["segment"] >= 0).sum())
                rows.append((f"{name} ({tokens} tokens)",
                             probes(model, lambda p=probe: sequence_logprobs(model, p).sum(), args.probes)))
        train, _ = rows_and_heldout(tok, 256, "chatterbot")
        batch = make_batches(train, 256, 2, tok.pad_token_id, True, None)[0]
        probe = {k: v[:1, :256] for k, v in batch.items() if isinstance(v, torch.Tensor)}
        rows.append((f"SFT {method}, one packed row (256 tokens)",
                     probes(model, lambda: lm_loss_sum(model, probe)[0], args.probes)))
        del model
    flags = ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in cpu_flags())
    print(f"{machine_summary()} ({flags}); {args.threads} threads; {args.probes} probes each, each the best of its "
          f"timed steps; bf16 is chosen at >= {MIN_SPEEDUP}x\n")
    print("| probe | bf16 / fp32 per probe | min | median | under the threshold |")
    print("|---|---|---:|---:|---:|")
    for name, s in rows:
        print(f"| {name} | {', '.join(f'{x:.2f}' for x in s)} | {min(s):.2f} | {statistics.median(s):.2f} | "
              f"{sum(x < MIN_SPEEDUP for x in s)}/{len(s)} |")


if __name__ == "__main__":
    main()
