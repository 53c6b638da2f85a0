"""Measured inference latency of a model (for reports that compare model sizes): median of repeated forwards."""

from __future__ import annotations

import statistics
import time

import torch

from taoke.train.batches import Encoded


def row_batches(encoded: Encoded, rows: int = 16) -> list[dict]:
    """The first `rows` rows of an encoded split, one per batch (batch-1 latency)."""
    return [{k: v for k, v in encoded.batch([i]).items() if k != "labels"} for i in range(min(rows, len(encoded)))]


@torch.no_grad()
def latency_ms(model: torch.nn.Module, batches: list[dict], repeats: int = 2) -> dict:
    """Median and p95 of the time of one forward per batch, repeated, fp32, on the model's device."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    model(**batches[0])   # warm-up: first-call allocations are not latency
    times = []
    for _ in range(repeats):
        for b in batches:
            t = time.perf_counter()
            model(**b)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t) * 1000)
    model.train(was_training)
    q = statistics.quantiles(times, n=20) if len(times) >= 2 else times * 2
    return {"ms_p50": statistics.median(times), "ms_p95": q[-1], "device": device.type, "threads":
            torch.get_num_threads(), "rows": len(batches), "repeats": repeats}
