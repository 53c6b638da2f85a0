"""Attention over packed rows: transformers' SDPA with its block-diagonal mask vs taoke's per-example SDPA.

Rows are packed from the real chatterbot dialogs with SmolLM2's tokenizer (taoke.lm.pack), at SmolLM2's
attention shape (9 query heads, 3 KV heads, head dim 64), bf16, forward + backward. Both paths are called
the way the model calls them (transformers.integrations.sdpa_attention.sdpa_attention_forward with the mask
transformers builds from position_ids; taoke.lm.varlen with the segments), and their outputs are compared.

    .venv/bin/python bench/packed_attention.py --threads 2 --seq-lens 256,1024
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class _Attn(torch.nn.Module):
    num_key_value_groups, is_causal = 3, True


def packed_rows(seq_len: int, rows: int):
    from taoke.lm.data import encode_conversations, read_conversations
    from taoke.lm.pack import pack_rows, packed_batch
    from tests.lm_helpers import smollm_tokenizer

    tok = smollm_tokenizer()
    encoded = encode_conversations(tok, read_conversations(ROOT / "data/chatterbot/dialogs.jsonl"), seq_len)
    return packed_batch(pack_rows(encoded, seq_len, tok.pad_token_id, seed=0)[:rows])["position_ids"]


def block_mask(position_ids):
    doc = (position_ids == 0).cumsum(1)
    same = doc[:, :, None] == doc[:, None, :]
    return (same & torch.ones_like(same[0]).tril())[:, None]


def timed(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq-lens", default="256,1024")
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from taoke.lm.varlen import _varlen_attention, segments_from_positions

    module = _Attn().train()
    print("| seq_len | examples per row | transformers SDPA + block mask ms | taoke per-example ms | ratio |")
    print("|---|---|---|---|---|")
    for n in map(int, args.seq_lens.split(",")):
        pos = packed_rows(n, args.rows)
        mask, segments = block_mask(pos), segments_from_positions(pos)
        q = torch.randn(args.rows, 9, n, 64, dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(args.rows, 3, n, 64, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))

        def run(varlen: bool):
            if varlen:
                out, _ = _varlen_attention(module, q, k, v, None, scaling=0.125, taoke_segments=segments)
            else:
                out, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.125)
            out.float().square().sum().backward()
            return out.detach()

        diff = (run(False).float() - run(True).float()).abs().max().item()
        masked, per_example = timed(lambda: run(False), args.reps), timed(lambda: run(True), args.reps)
        print(f"| {n} | {sum(map(len, segments)) / len(segments):.1f} | {masked * 1e3:.1f} | {per_example * 1e3:.1f} | "
              f"{masked / per_example:.2f}x |  (max |diff| {diff:.3f}, bf16)")


if __name__ == "__main__":
    main()
