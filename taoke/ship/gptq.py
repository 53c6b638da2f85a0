"""GPTQ rounding for GGUF's Q4_0 blocks: each linear weight is quantised one input column at a time, and the rounding
error of every column is pushed onto the columns not yet quantised through the inverse Hessian of the layer's inputs
(Frantar et al., 2022), measured on training examples; each block's scale is searched as llama.cpp's
importance-matrix quantisation does. The blocks are plain Q4_0 (fp16 scale, 32 4-bit codes), so
llama.cpp runs them as it runs any Q4_0 file; only which codes are chosen changes.

Written here rather than taken from GPTQModel/AutoGPTQ: those pack their own int4 layouts (zero points, group scales
in their own grid) for their own kernels, which GGUF's Q4_0 blocks (scale = the block's largest value / -8, no
zero point) cannot hold.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from taoke.models.parts import real_tokens

BLOCK = 32   # Q4_0 elements per block (ggml's QK4_0)
DAMP = 0.01   # share of the Hessian's mean diagonal added to it before inverting (the GPTQ paper's 1%)
SCALE_SEARCH = True   # gptq_blocks: each block's scale by importance-weighted search (make_qx_quants candidates)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@torch.no_grad()
def input_hessians(model: nn.Module, batches) -> dict[str, torch.Tensor]:
    """2/n X^T X of the inputs each LLaMA projection saw over the batches' tokens (padding left out), by module
    name. Every projection sees the unquantised model's activations (one pass, as GPTQ's non-sequential variant)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    state = {"mask": None}

    def hook(name: str):
        def record(_module, args):
            x = real_tokens(args[0].detach().float(), state["mask"])
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in PROJECTIONS]
    device = next(model.parameters()).device
    try:
        for batch in batches:
            mask = batch.get("attention_mask")
            state["mask"] = mask.to(device) if mask is not None else None
            model(input_ids=batch["input_ids"].to(device), attention_mask=state["mask"])
    finally:
        for h in handles:
            h.remove()
    return {n: 2 * s / max(counts[n], 1) for n, s in sums.items()}


def q4_0_scales(w: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
    """ggml's Q4_0 scale of each row of a [rows, 32] group: its largest-magnitude value / -8 (in fp32: ggml rounds
    with it, and stores it as fp16). With `importance` (one weight per column), the scale whose rounding leaves
    the least importance-weighted error among llama.cpp's make_qx_quants candidates (and their least-squares
    refits)."""
    idx = w.abs().argmax(dim=1, keepdim=True)
    m = w.gather(1, idx)
    if importance is None:
        return m / -8

    def error(d):
        return ((w - (q4_0_codes(w, d) - 8) * fp16(d)) ** 2 * importance).sum(1, keepdim=True)

    best, best_err = m / -8, error(m / -8)
    for k in range(-9, 10):
        d = m / -(8 + 0.1 * k)
        q = q4_0_codes(w, d) - 8
        refit = (importance * w * q).sum(1, keepdim=True) / (importance * q * q).sum(1, keepdim=True).clamp_min(1e-30)
        refit = torch.where(refit == 0, d, refit)
        for cand in ((refit,) if k == 0 else (d, refit)):   # k == 0's d is max/-8, the starting best
            e = error(cand)
            better = e < best_err
            best, best_err = torch.where(better, cand, best), torch.where(better, e, best_err)
    return best


def q4_0_codes(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """The 4-bit codes of column `x` under scales `d`, rounded as ggml rounds (trunc(x / d + 8.5), clipped)."""
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    return torch.trunc(x * inv + 8.5).clamp(0, 15)


def fp16(d: torch.Tensor) -> torch.Tensor:
    return d.to(torch.float16).float()


@torch.no_grad()
def gptq_q4_0(weight: torch.Tensor, hessian: torch.Tensor, damp: float = DAMP,
              block: int = 128, search: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0 scales [rows, cols/32] (fp16) and codes [rows, cols] (uint8, 0..15) for one weight, by GPTQ, columns in
    their own order (act-order with static block scales measured worse on SmolLM2, one sample: 12.1% vs 9.9%). search:
    each block's scale by importance-weighted search (q4_0_scales), the importance being the Hessian's diagonal."""
    w = weight.detach().float().clone()
    rows, cols = w.shape
    if cols % BLOCK:
        raise ValueError(f"GPTQ Q4_0: {cols} input columns do not split into blocks of {BLOCK}")
    h = hessian.to(w.device, torch.float32).clone()
    dead = h.diagonal() == 0   # inputs that never fire carry no error: any code does
    h[dead, dead] = 1
    w[:, dead] = 0
    h.diagonal().add_(damp * h.diagonal().mean())
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    scales = torch.zeros(rows, cols // BLOCK, device=w.device)
    codes = torch.zeros(rows, cols, device=w.device)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(rows, i2 - i1, device=w.device), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if (i1 + i) % BLOCK == 0:   # a new Q4_0 block: its scale from the columns as updated so far
                d = q4_0_scales(w1[:, i:i + BLOCK], h.diagonal()[i1 + i:i1 + i + BLOCK] if search else None)
                scales[:, (i1 + i) // BLOCK] = d.squeeze(1)
            q = q4_0_codes(w1[:, i:i + 1], d)
            codes[:, i1 + i] = q.squeeze(1)
            err = (w1[:, i] - ((q - 8) * fp16(d)).squeeze(1)) / hinv1[i, i]   # what llama.cpp will multiply
            w1[:, i:] -= err.unsqueeze(1) @ hinv1[i:i + 1, i:]
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return scales.cpu().numpy().astype(np.float16), codes.cpu().numpy().astype(np.uint8)


def pack_q4_0(scales: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """GGUF's Q4_0 bytes [rows, cols/32 * 18]: per block the fp16 scale, then codes j and j+16 in one byte."""
    rows, cols = codes.shape
    q = codes.reshape(rows, cols // BLOCK, 2, BLOCK // 2)
    nibbles = q[:, :, 0, :] | (q[:, :, 1, :] << np.uint8(4))
    d = np.ascontiguousarray(scales.astype(np.float16)).view(np.uint8).reshape(rows, cols // BLOCK, 2)
    return np.concatenate([d, nibbles], axis=-1).reshape(rows, -1)


def dequantized(scales: np.ndarray, codes: np.ndarray) -> torch.Tensor:
    """The weight the Q4_0 blocks stand for (what llama.cpp multiplies with)."""
    d = torch.from_numpy(scales.astype(np.float32)).repeat_interleave(BLOCK, dim=1)
    return (torch.from_numpy(codes.astype(np.float32)) - 8) * d


@torch.no_grad()
def gptq_blocks(model: nn.Module, batches, search: bool = SCALE_SEARCH, progress=None) -> dict[str, np.ndarray]:
    """Q4_0 bytes of every LLaMA projection weight of `model`, by GPTQ on the calibration batches (HF tensor names,
    rows in HF order); the model is left as it was. Every projection's Hessian comes from one pass of the unquantised
    model (GPTQ's one-shot variant: on SmolLM2 the sequential one, inputs from the blocks before as quantised,
    measured no better: 9.9-11.4% against 8.6-11.2% over three calibration samples). `progress(done, total)` is
    called after each weight."""
    hessians = input_hessians(model, batches)
    modules = dict(model.named_modules())
    out, total = {}, len(hessians)
    for i, name in enumerate(sorted(hessians)):
        weight = modules[name].weight
        if weight.shape[1] % BLOCK == 0:   # other widths are written F16 by the GGUF writer
            out[f"{name}.weight"] = pack_q4_0(*gptq_q4_0(weight, hessians.pop(name), search=search))
        if progress:
            progress(i + 1, total)
    return out
