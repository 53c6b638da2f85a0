"""Sequence packing: many short examples per fixed-length row, none attending to another.

Each example keeps its own position_ids (restarting at 0). Passed with position_ids and no
attention_mask, transformers (>= 4.56, masking_utils.find_packed_sequence_indices) builds the
block-diagonal causal mask from the position resets, for SDPA and eager attention alike; a test
checks packed and unpacked losses agree. The first label of every example is dropped because in a
packed row it would otherwise be predicted from the previous example's last token.
"""

from __future__ import annotations

import random

import torch

from taoke.lm.data import IGNORE


def pack_rows(rows: list[dict], seq_len: int, pad_id: int, seed: int | None = None) -> list[dict]:
    """Greedy first-fit packing into rows of exactly seq_len tokens (longer examples are truncated).

    The tail of a row is padding with labels -100 and its own position run, so it forms a separate
    segment that no real token attends to.
    """
    order = list(range(len(rows)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    lengths = [min(len(ex["input_ids"]), seq_len) for ex in rows]
    # first fit over the last few open bins: near-optimal fill without an O(n^2) scan
    bins = first_fit(lengths, seq_len, order, window=8)
    return [concat_row([rows[i] for i in b], seq_len, pad_id) for b in bins]


def first_fit(lengths: list[int], capacity: int, order: list[int], window: int | None = None) -> list[list[int]]:
    """Indices taken in `order`, each put in the first bin (of the last `window` opened, or of all) with room for
    its length; bins hold at most `capacity` tokens."""
    bins: list[list[int]] = []
    space: list[int] = []
    for i in order:
        n = lengths[i]
        start = 0 if window is None else max(0, len(bins) - window)
        b = next((b for b in range(start, len(bins)) if space[b] >= n), None)
        if b is None:
            bins.append([])
            space.append(capacity)
            b = len(bins) - 1
        bins[b].append(i)
        space[b] -= n
    return bins


def concat_row(examples: list[dict], seq_len: int, pad_id: int, segments: list[int] | None = None) -> dict:
    """One packed row of seq_len tokens; with `segments`, also each token's segment id (-1: padding)."""
    ids, labels, pos, seg = [], [], [], []
    for k, ex in enumerate(examples):
        n = min(len(ex["input_ids"]), seq_len)
        ids += ex["input_ids"][:n]
        labels += [IGNORE] + list(ex["labels"][1:n])
        pos += list(range(n))
        seg += [segments[k] if segments is not None else k] * n
    n_real = len(ids)
    pad = seq_len - n_real
    ids += [pad_id] * pad
    labels += [IGNORE] * pad
    pos += list(range(pad))
    row = {"input_ids": ids, "labels": labels, "position_ids": pos, "n_real": n_real}
    if segments is not None:
        row["segment"] = seg + [-1] * pad
    return row


def packed_batch(rows: list[dict], device=None) -> dict:
    """Tensors for packed rows: no attention_mask, so the model derives the block mask from position_ids."""
    return {k: torch.tensor([r[k] for r in rows], dtype=torch.long, device=device)
            for k in ("input_ids", "labels", "position_ids")}


def padded_batch(rows: list[dict], pad_id: int, device=None) -> dict:
    """Tensors for unpacked rows, right-padded to the longest, with an attention mask."""
    n = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        k = len(r["input_ids"])
        ids[i, :k] = torch.tensor(r["input_ids"])
        labels[i, :k] = torch.tensor(r["labels"])
        mask[i, :k] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def batches(rows: list[dict], batch_size: int, seed: int | None = None) -> list[list[dict]]:
    order = list(range(len(rows)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    return [[rows[i] for i in order[k:k + batch_size]] for k in range(0, len(order), batch_size)]
