"""Which precision to run a model in: bf16 autocast where this machine runs it faster, otherwise fp32.

On a GPU that supports bf16 the answer is bf16. On a CPU it depends on the chip and the shapes: with
AVX512-BF16 or AMX, bf16 matmuls run 2-3x faster than fp32; without them torch emulates bf16 and is
10-300x slower, so such a CPU always gets fp32. Where the CPU has native bf16, "auto" measures: a
training loop hands `choose_precision` its real step (the model, adapters and loss it will train, on a
slice of its first batch) and bf16 is kept only when that step runs faster in it; without a step (the
classifier loop) the model's own largest matmul is timed in both precisions (forward and the two backward
products, casts included, as autocast does them). The choice and its measurement are recorded in the run's
`runtime`. Evaluation and prediction time nothing (inference_dtype): fp32 on a CPU, so their numbers do not
depend on how busy the machine was.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Callable

import torch

from taoke.hardware import cpu_has_bf16, isa_cap

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


def step_speedup(step: Callable[[torch.dtype | None], None], repeats: int = 3) -> dict:
    """Time a real training step (forward + backward; `step(None)` in fp32, `step(torch.bfloat16)` under
    autocast), interleaved after one warm-up each; returns the best seconds of each and their ratio. Three
    repeats, not two: with two, a full fine-tune of SmolLM2-135M that ran 1.5x faster in bf16 measured under
    MIN_SPEEDUP once and trained in fp32 (bench/RESULTS.md, sft_vs_hf --method full of 2026-12-05 15:39);
    bench/precision_probe.py shows how steady each loop's probe is."""
    best = {None: float("inf"), torch.bfloat16: float("inf")}
    for dtype in best:
        step(dtype)   # warm-up: kernel selection, first-touch allocations
    for _ in range(repeats):
        for dtype in best:
            t0 = time.perf_counter()
            step(dtype)
            best[dtype] = min(best[dtype], time.perf_counter() - t0)
    return {"fp32_s": round(best[None], 4), "bf16_s": round(best[torch.bfloat16], 4),
            "speedup": round(best[None] / max(best[torch.bfloat16], 1e-9), 3)}


@dataclass
class PrecisionChoice:
    """What autocast runs in (None = fp32), why, and the measurement that decided it (if any)."""

    dtype: torch.dtype | None
    reason: str
    measured: dict | None = None

    @property
    def name(self) -> str:
        return "bf16" if self.dtype is not None else "fp32"

    def record(self) -> dict:
        return {"precision": self.name, "reason": self.reason, "measured": self.measured}

    @classmethod
    def restored(cls, loop: dict) -> "PrecisionChoice":
        """What a resumed run keeps: the numerics it had before it stopped (its checkpoint's loop state), not a
        new measurement."""
        return cls(torch.bfloat16 if loop.get("precision") == "bf16" else None, "kept from before the run was resumed",
                   loop.get("precision_measured"))


def choose_precision(precision: str, device: torch.device, model: torch.nn.Module | None = None,
                     tokens: int = 512, step: Callable[[torch.dtype | None], None] | None = None) -> PrecisionChoice:
    """The precision for `precision` (auto | bf16 | fp32) on `device`. `tokens`: rows per matmul in a typical
    batch (for the matmul probe); `step`: the training step to time instead (see step_speedup)."""
    if precision == "fp32":
        return PrecisionChoice(None, "train.precision: fp32")
    if precision == "bf16":
        return PrecisionChoice(torch.bfloat16, "train.precision: bf16")
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return PrecisionChoice(torch.bfloat16 if ok else None, "GPU " + ("supports" if ok else "lacks") + " bf16")
    if device.type != "cpu" or not cpu_has_bf16():
        why = f"ONEDNN_MAX_CPU_ISA={isa_cap()} caps it" if isa_cap() else "neither AVX512-BF16 nor AMX"
        return PrecisionChoice(None, f"no native bf16 on this CPU ({why}): bf16 is emulated")
    if model is None:
        return PrecisionChoice(torch.bfloat16, "CPU has native bf16")
    if sum(p.numel() for p in model.parameters()) < BF16_MIN_PARAMS:
        return PrecisionChoice(None, f"model under {BF16_MIN_PARAMS:,} parameters: casts cost more than bf16 saves")
    if step is not None:
        measured = {"probe": "training step", **step_speedup(step)}
    else:
        shape = _largest_linear(model)
        if shape is None:  # convolutions only: autocast gains little on CPU and the probe would not show it
            return PrecisionChoice(None, "no linear layers to run in bf16")
        # Bounded probe (~0.1 s): rows rounded to a power of two so nearby batch sizes share one cached
        # result, and at most 4096 output units (a 49k-row LM head would take seconds; speed-ups match).
        tokens = max(16, min(512, 1 << max(tokens - 1, 1).bit_length()))
        d_out, d_in = shape
        measured = {"probe": f"matmul {tokens}x{d_in} @ {d_in}x{min(d_out, 4096)}",
                    "speedup": round(bf16_speedup(tokens, min(d_out, 4096), d_in), 3)}
    won = measured["speedup"] >= MIN_SPEEDUP
    return PrecisionChoice(torch.bfloat16 if won else None,
                           f"measured: bf16 {measured['speedup']:.2f}x fp32 ({'>=' if won else '<'} {MIN_SPEEDUP})",
                           measured)


def choose_for_training(precision: str, device: torch.device, model: torch.nn.Module,
                        loss: Callable[[], torch.Tensor]) -> PrecisionChoice:
    """choose_precision timing the training step itself: `loss()` is the loop's forward on a slice of its
    first batch. The random state is restored after every timed step (dropout draws do not shift the run)
    and the gradients are cleared, so the run trains as if nothing had been measured."""
    def step(dtype: torch.dtype | None) -> None:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            with autocast(device, dtype):
                value = loss()
            if value.requires_grad:   # a slice with no trainable path to its loss times the forward only
                value.backward()
        model.zero_grad(set_to_none=True)

    return choose_precision(precision, device, model, step=step)


def inference_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """What evaluation and prediction run in: torch.bfloat16 under autocast, or None for fp32. No timing here:
    "auto" is bf16 on a GPU that supports it and fp32 on a CPU, so a run's recorded test metrics, `taoke eval` and
    `taoke predict` give the same numbers however busy the machine is. (A timing probe reads the load: under
    load it measured bf16 at 0.60x fp32 on an AMX CPU where bf16 runs ~3x faster, so a run's recorded accuracy
    and its `taoke eval` could run in different precisions and disagree.)"""
    if precision == "auto" and device.type == "cpu":
        return None
    return choose_precision(precision, device).dtype   # no model given: nothing is timed


def autocast(device: torch.device, dtype: torch.dtype | None):
    """The autocast context for a choice made by choose_precision or inference_dtype."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
