"""Which precision to run a model in: bf16 autocast where this machine runs it faster, otherwise fp32.

On a GPU that supports bf16 the answer is bf16. On a CPU it depends on the chip and the shapes: with
AVX512-BF16 or AMX, bf16 matmuls run 2-3x faster than fp32; without them torch emulates bf16 and is
10-300x slower. So "auto" times the model's own largest matmul in both precisions (forward and the two
backward products, casts included, as autocast does them) and keeps bf16 only when it wins.
"""

from __future__ import annotations

import functools
import time

import torch

from taoke.hardware import cpu_has_bf16

# Below this size autocast's casts cost more than bf16 matmuls save on a CPU (measured on an 8x8 CNN).
BF16_MIN_PARAMS = 5_000_000
# bf16 must beat fp32 by this factor on the probe to be chosen (it also costs casts outside matmuls).
MIN_SPEEDUP = 1.15


def _largest_linear(model: torch.nn.Module) -> tuple[int, int] | None:
    shapes = [tuple(m.weight.shape) for m in model.modules()
              if isinstance(m, torch.nn.Linear) and m.weight.device.type == "cpu"]
    return max(shapes, key=lambda s: s[0] * s[1]) if shapes else None


@functools.lru_cache(maxsize=32)
def bf16_speedup(tokens: int, d_out: int, d_in: int) -> float:
    """fp32 time / bf16 time of one linear layer's forward + backward matmuls for `tokens` rows."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, d_in, generator=gen)
    w = torch.randn(d_out, d_in, generator=gen)

    def one(dtype: torch.dtype) -> float:
        t0 = time.perf_counter()
        xc, wc = x.to(dtype), w.to(dtype)
        y = xc @ wc.T
        _ = y @ wc, y.T @ xc  # grad wrt input and wrt weight
        return time.perf_counter() - t0

    timings = {}
    for dtype in (torch.float32, torch.bfloat16):
        one(dtype)  # warm-up: kernel selection
        timings[dtype] = min(one(dtype) for _ in range(3))
    return timings[torch.float32] / max(timings[torch.bfloat16], 1e-9)


def autocast_dtype(precision: str, device: torch.device, model: torch.nn.Module | None = None,
                   tokens: int = 512) -> torch.dtype | None:
    """torch.bfloat16 to run under autocast, or None for fp32. `tokens`: rows per matmul in a typical batch."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type != "cpu" or not cpu_has_bf16():
        return None
    if model is None:
        return torch.bfloat16
    if sum(p.numel() for p in model.parameters()) < BF16_MIN_PARAMS:
        return None
    shape = _largest_linear(model)
    if shape is None:  # convolutions only: autocast gains little on CPU and the probe would not show it
        return None
    # Bounded probe (~0.1 s): rows rounded to a power of two so nearby batch sizes share one cached
    # result, and at most 4096 output units (a 49k-row LM head would take seconds; speed-ups match).
    tokens = max(16, min(512, 1 << max(tokens - 1, 1).bit_length()))
    d_out, d_in = shape
    return torch.bfloat16 if bf16_speedup(tokens, min(d_out, 4096), d_in) >= MIN_SPEEDUP else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """The autocast context for a choice made by autocast_dtype."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
