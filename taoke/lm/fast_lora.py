"""A leaner forward for PEFT's plain LoRA Linear layers while training under autocast.

PEFT computes `base(x) + lora_B(lora_A(dropout(x.to(fp32)))) * scaling`: under bf16 autocast the input is
cast to fp32 and back to bf16 for every adapted layer, each of q/k/v casts the same normed input on its own,
and the scaling and the sum are two more passes over the output. Here the input is cast once (layers fed the
same tensor share the cast) and the bf16 base output is added to `scaling * (x A^T) B^T` in fp32. PEFT's
bf16 sum rounds the update at the output's precision, and early in training an update is a few bits below the
output: trained so, LoRA's held-out loss was 0.008 above fp32 training; with the update added in fp32 it is within
0.001 (bench/RESULTS.md, 2026-12-07). The adapted layers then return fp32 (the next matmul casts back). LoRA
dropout is applied, as PEFT applies it, to the adapter's input only (each layer draws its own mask, on the shared bf16
cast), so a recipe's default dropout keeps the fast path. The LoRA parameters, their names and PEFT's
merge/save are untouched; only `forward` is swapped, and put back on exit.

Layers this does not cover (DoRA, several active adapters, LoRA bias, merged weights) keep PEFT's forward.
On smollm2-135m LoRA r=16 on 2 CPU cores a bf16 step takes about as long with this forward as with PEFT's own
(bench/lora_step_cost.py, bench/RESULTS.md 2026-12-07): the fp32 update costs what the single cast saves, and what
this forward buys is the update's precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn


class _CastOnce:
    """x.to(dtype), reusing the last result while the same unmodified tensor comes in again (q, k, v)."""

    def __init__(self):
        self.src = self.out = None
        self.version = -1

    def __call__(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if x.dtype == dtype:
            return x
        if x is not self.src or x._version != self.version or self.out.dtype != dtype:
            self.src, self.version, self.out = x, x._version, x.to(dtype)
        return self.out

    def clear(self) -> None:
        self.src = self.out = None


def _plain_lora(layer: nn.Module) -> str | None:
    """The adapter name when `layer` is a PEFT LoRA Linear this forward computes exactly, else None."""
    if type(layer) is not LoraLinear or layer.fan_in_fan_out:  # merged/disabled: checked on each call
        return None
    if len(layer.active_adapters) != 1 or type(layer.base_layer) is not nn.Linear:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return None
    if type(layer.lora_dropout[name]) not in (nn.Identity, nn.Dropout) or layer.lora_B[name].bias is not None:
        return None
    return name


def _forward_for(layer: nn.Module, name: str, cast: _CastOnce):
    base, lora_a, lora_b = layer.base_layer, layer.lora_A[name], layer.lora_B[name]
    dropout = layer.lora_dropout[name]
    scaling = layer.scaling[name]
    original = layer.forward

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs or layer.merged or not torch.is_autocast_enabled(x.device.type):
            return original(x, *args, **kwargs)
        dtype = torch.get_autocast_dtype(x.device.type)
        xc = cast(x, dtype)
        flat = xc.reshape(-1, xc.shape[-1])
        with torch.autocast(x.device.type, enabled=False):
            bias = base.bias.to(dtype) if base.bias is not None else None
            out = F.linear(flat, base.weight.to(dtype), bias)
            if layer.disable_adapters:   # DPO's reference: the base alone, in the dtype the adapted forward gives
                return out.float().view(*x.shape[:-1], out.shape[-1])
            dropped = F.dropout(flat, dropout.p, training=True) if dropout.training and getattr(dropout, "p", 0) \
                else flat
            a = F.linear(dropped, lora_a.weight.to(dtype))
            # the base output rounded once, the adapter's update added to it in fp32: rounded into a bf16
            # output, an update a few bits below the output's (most are, early in training) is mostly lost.
            # The bf16 output is added into the fp32 update in place: no fp32 copy of it is made.
            out = torch.mm(a.float(), (lora_b.weight.float() * scaling).t()).add_(out)
        return out.view(*x.shape[:-1], out.shape[-1])

    return forward


class FastLoraForward:
    """Context manager: plain LoRA layers of `model` use the fused forward inside, PEFT's again after."""

    def __init__(self, model: nn.Module, enabled: bool = True):
        self.model, self.enabled = model, enabled
        self.cast = _CastOnce()
        self.swapped: list[nn.Module] = []

    def __enter__(self) -> "FastLoraForward":
        if not self.enabled:
            return self
        for layer in self.model.modules():
            name = _plain_lora(layer)
            if name is not None:
                layer.forward = _forward_for(layer, name, self.cast)
                self.swapped.append(layer)
        return self

    def __exit__(self, *exc) -> None:
        for layer in self.swapped:
            del layer.forward  # the instance attribute goes; the class's forward shows through again
        self.swapped = []
        self.cast.clear()
