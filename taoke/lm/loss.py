"""Cross-entropy over a large vocabulary without materialising [tokens x vocab] logits.

The model body gives hidden states; only positions with a label are kept, and the lm_head matmul,
log-softmax and its gradient are done a chunk of tokens at a time. Hand-written (in the spirit of
Liger-Kernel's fused linear cross-entropy, which is GPU/Triton-only) because no CPU library does it:
the forward pass computes the gradients too, so the backward pass is a multiply and no logits are
recomputed or kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from taoke.lm.data import IGNORE
from taoke.models.parts import unwrap

CHUNK_ELEMENTS = 1 << 25  # logits per chunk (32M floats = 128 MB): big enough for fast matmuls


def chunk_tokens_for(vocab: int, chunk_elements: int = CHUNK_ELEMENTS) -> int:
    return max(16, chunk_elements // max(vocab, 1))


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, target_i); grads computed chunk by chunk during the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, compute_dtype):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight.to(compute_dtype)
        acc = torch.promote_types(compute_dtype, torch.float32)  # softmax in at least fp32
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], chunk):
                h = hidden[s:s + chunk].to(compute_dtype)
                t = targets[s:s + chunk]
                logits = (h @ w.T).to(acc)
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
                if need_h or need_w:
                    # d(CE)/d(logits) = softmax - onehot, computed in place over the logits buffer
                    g = logits.sub_(lse[:, None]).exp_()
                    g[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                    g = g.to(compute_dtype)
                    if need_h:
                        grad_h[s:s + chunk] = (g @ w).to(hidden.dtype)
                    if need_w:
                        grad_w += (g.T @ h).to(acc)
        ctx.save_for_backward(grad_h if need_h else None, grad_w if need_w else None)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.dtypes[1]) if grad_w is not None else None
        return gh, gw, None, None, None


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             chunk: int | None = None) -> torch.Tensor:
    """Summed CE of hidden [N, H] through a bias-free head weight [V, H] against targets [N] (all valid)."""
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0
    chunk = chunk or chunk_tokens_for(weight.shape[0])
    if torch.is_autocast_enabled(hidden.device.type):
        compute_dtype = torch.get_autocast_dtype(hidden.device.type)
    else:
        compute_dtype = hidden.dtype
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk, compute_dtype)


def token_logprobs(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor,
                   chunk: int | None = None) -> torch.Tensor:
    """log p(target_i) per token [N], chunked; each chunk is checkpointed so its logits are freed."""
    chunk = chunk or chunk_tokens_for(head.weight.shape[0])

    def piece(h, t):
        logits = head(h).float()
        return logits.gather(1, t[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)

    outs = []
    for s in range(0, hidden.shape[0], chunk):
        h, t = hidden[s:s + chunk], targets[s:s + chunk]
        outs.append(checkpoint(piece, h, t, use_reentrant=False) if torch.is_grad_enabled() else piece(h, t))
    return torch.cat(outs) if outs else hidden.new_zeros(0)


# ---------------------------------------------------------------------------------------------- model glue

def body_and_head(model: torch.nn.Module):
    """(decoder body returning last_hidden_state, lm_head module) of a transformers causal LM."""
    lm = unwrap(model)
    body = getattr(lm, lm.base_model_prefix, None)
    head = lm.get_output_embeddings()
    if body is None or head is None:
        raise TypeError(f"{type(lm).__name__}: cannot find its decoder body and lm_head")
    return body, head


def _plain_head(model, head) -> bool:
    """True when logits are exactly hidden @ head.weight.T (no bias, soft-capping, scaling or adapter on the head)."""
    cfg = unwrap(model).config
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return False
    return type(head) is torch.nn.Linear and head.bias is None


def shifted_targets(hidden: torch.Tensor, labels: torch.Tensor):
    """Hidden states at positions that predict a label, and those labels (the causal shift)."""
    h, y = hidden[:, :-1], labels[:, 1:]
    keep = y != IGNORE
    return h[keep], y[keep], keep


def lm_loss_sum(model, batch: dict, chunk: int | None = None) -> tuple[torch.Tensor, int]:
    """(sum of token CE over labelled positions, number of those positions) for one batch."""
    body, head = body_and_head(model)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    hidden = body(**inputs, use_cache=False).last_hidden_state
    h, y, _ = shifted_targets(hidden, batch["labels"])
    if _plain_head(model, head):
        return linear_cross_entropy_sum(h, head.weight, y, chunk), int(y.numel())
    return -token_logprobs(h, head, y, chunk).sum(), int(y.numel())


def reference_loss_sum(model, batch: dict) -> tuple[torch.Tensor, int]:
    """The plain transformers path (full logits), used by tests and as a yardstick."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    logits = model(**inputs, use_cache=False).logits.float()
    y = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")
    return loss, int((y != IGNORE).sum())
