"""Direct Preference Optimization (Rafailov et al. 2023), written out because TRL is an optional dependency.

loss = -log sigmoid(beta * ((log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))))

The reference model never doubles memory: with LoRA/DoRA it is the same model with adapters disabled
(`model.disable_adapter()`); for full or freeze training the reference log-probs are computed once,
before the first update, and kept as numbers.
"""

from __future__ import annotations

import math
import random
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from taoke.lm.data import encode_dpo
from taoke.lm.fast_lora import FastLoraForward
from taoke.lm.frozen import FrozenInLowPrecision
from taoke.lm.loss import body_and_head, shifted_targets, token_logprobs
from taoke.lm.pack import concat_row, first_fit, padded_batch
from taoke.lm.train import LMHistory, model_device
from taoke.recipe import LMConfig, TrainConfig
from taoke.train.core import (check_finite_loss, make_optimizer, make_scheduler, optimizer_step, total_steps,
                              trainable)
from taoke.train.checkpoint import (checkpoint_position, has_checkpoint, load_checkpoint, restore_trainable,
                                    save_checkpoint, trainable_state)
from taoke.train.precision import PrecisionChoice, autocast, choose_for_training


def encode_pairs(tokenizer, pairs: list[dict], max_len: int) -> list[dict]:
    return [encode_dpo(tokenizer, p, max_len) for p in pairs]


def sequence_logprobs(model, batch: dict) -> torch.Tensor:
    """Sum of log p(label) over the labelled tokens of each sequence of a pair_batch: [sequences]."""
    body, head = body_and_head(model)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    hidden = body(**inputs, use_cache=False).last_hidden_state
    h, y, keep = shifted_targets(hidden, batch["labels"])
    lp = token_logprobs(h, head, y)
    sequence = batch["segment"][:, 1:][keep]   # the sequence of each predicted token
    return torch.zeros(int(batch["segment"].max()) + 1, dtype=lp.dtype, device=lp.device).index_add(0, sequence, lp)


def group_order(n_groups: int, seed: int, i: int) -> int:
    """Which group the i-th micro-batch takes: every epoch visits each group once, in an order of its own
    (fixed by seed and epoch, so a resumed run takes the same batches as an uninterrupted one)."""
    epoch, pos = divmod(i, n_groups)
    order = list(range(n_groups))
    random.Random(seed + 1 + epoch).shuffle(order)
    return order[pos]


def pair_batch(pairs: list[dict], pad_id: int, device, pack_len: int | None = None) -> dict:
    """The chosen sequences, then the rejected ones, as one batch; `segment` [rows, length] names each token's
    sequence (-1: padding). One sequence per row padded to the longest, or with `pack_len` packed first-fit
    (longest first) into rows of at most that many tokens, each sequence attending only to itself (position ids
    restart, as in pack.py). Packed, a batch is mostly real tokens; padded, the chosen and rejected answers of
    data/chatterbot-lm at 8 pairs per batch leave 60% of the positions padding."""
    seqs = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    if pack_len is None:
        batch = padded_batch(seqs, pad_id)
        segment = torch.arange(len(seqs))[:, None].expand_as(batch["input_ids"]).clone()
        batch["segment"] = segment.masked_fill(batch["attention_mask"] == 0, -1)
        return {k: v.to(device) for k, v in batch.items()}
    lengths = [len(s["input_ids"]) for s in seqs]
    bins = first_fit(lengths, max(pack_len, max(lengths)), sorted(range(len(seqs)), key=lambda i: -lengths[i]))
    width = max(sum(lengths[i] for i in b) for b in bins)
    rows = [concat_row([seqs[i] for i in b], width, pad_id, segments=b) for b in bins]
    return {k: torch.tensor([r[k] for r in rows], dtype=torch.long, device=device)
            for k in ("input_ids", "labels", "position_ids", "segment")}


def dpo_loss(pc, pr, rc, rr, beta: float):
    """(loss, reward accuracy, margin) from policy/reference log-probs of chosen and rejected."""
    logits = beta * ((pc - rc) - (pr - rr))
    d = logits.detach()
    return -F.logsigmoid(logits).mean(), float((d > 0).float().mean()), float(d.mean() / beta)


def _reference_logprobs(model, batch):
    """The reference's log-probs in the ambient precision: the model itself with its adapters disabled."""
    ctx = model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
    with torch.no_grad(), ctx:
        return sequence_logprobs(model, batch)


def _reference(model, batch, dtype=None):
    """The reference's log-probs in the precision the policy trains in (`dtype` under autocast, None: fp32): with
    the same numerics the policy starts equal to its reference (loss log 2, margin 0), with fp32 against a bf16
    policy every pair would start at a random margin of rounding error."""
    with autocast(model_device(model), dtype):
        return _reference_logprobs(model, batch)


def train_dpo(model, tokenizer, train_pairs: list[dict], train: TrainConfig, lm: LMConfig, *,
              eval_pairs: list[dict] | None = None, on_step=None, checkpoint_dir: Path | None = None,
              resume: bool = False) -> LMHistory:
    """Train an adapted model on encoded pairs (encode_pairs); returns LMHistory (steps with loss, reward_acc).
    Checkpoints and `resume` as train_lm has them."""
    if not train_pairs:
        raise ValueError("no DPO pairs")
    torch.manual_seed(train.seed)
    if train.threads:
        torch.set_num_threads(train.threads)
    peft = hasattr(model, "disable_adapter")
    device = model_device(model)
    pad_id = tokenizer.pad_token_id
    n = train.batch_size
    pack_len = lm.seq_len if lm.packing else None
    shuffled = list(train_pairs)   # pair files are often sorted (by topic, by source): mix before grouping
    random.Random(train.seed).shuffle(shuffled)
    groups = [shuffled[i:i + n] for i in range(0, len(shuffled), n)]
    model.train()
    resumed = checkpoint_position(checkpoint_dir) if resume and has_checkpoint(checkpoint_dir) else None
    if resumed is not None:
        choice = PrecisionChoice.restored(resumed)
    else:
        # the precision probe times a real step: the first packed row of the first batch (one pair when padded).
        # One pair alone (~100 tokens) shows less of bf16's gain than the rows DPO trains on (bench/precision_probe.py:
        # 1.32-1.35x against 1.66-1.70x for a 226-token row); with it one benchmark run chose fp32 at 3/4 the speed
        if pack_len:
            probe = {k: v[:1] for k, v in pair_batch(groups[0], pad_id, device, pack_len).items()}
        else:
            probe = pair_batch(groups[0][:1], pad_id, device)

        def step_loss():   # the step as it runs: the policy's forward and backward and, with adapters, the
            loss = sequence_logprobs(model, probe).sum()   # reference's forward in the same precision
            return loss + _reference_logprobs(model, probe).sum() if peft else loss

        with FastLoraForward(model):
            choice = choose_for_training(train.precision, device, model, step_loss)
    dtype = choice.dtype
    ref_cache = None
    if not peft:  # full/freeze: reference log-probs now, before any update (no second model in memory)
        model.eval()
        ref_cache = [_reference(model, pair_batch(g, pad_id, device, pack_len), dtype) for g in groups]
    n_steps = total_steps(train, math.ceil(len(groups) / train.grad_accum))
    params = trainable(model)
    opt = make_optimizer(model, train)
    sched = make_scheduler(opt, train, n_steps)
    hist = LMHistory(precision=choice.name, precision_choice=choice.record())
    model.train()
    start, gi, first = time.perf_counter(), 0, 1
    if resumed is not None:   # after the reference log-probs above, which come from the model before any update
        state, loop = load_checkpoint(checkpoint_dir, opt, sched)
        restore_trainable(model, state)
        gi, first, hist.steps, hist.tokens = loop["pairs_batch"], loop["step"] + 1, loop["steps"], loop["tokens"]
        start -= loop["seconds"]
    # frozen weights held in bf16 while training runs in bf16, as train_lm holds them (same numerics for policy and
    # reference, no per-forward casts)
    with FrozenInLowPrecision(model, dtype), FastLoraForward(model) as fused:
        hist.fused_lora_layers = len(fused.swapped)
        for step in range(first, n_steps + 1):
            losses, accs, margins = [], [], []
            for _ in range(train.grad_accum):
                k = group_order(len(groups), train.seed, gi)
                gi += 1
                batch = pair_batch(groups[k], pad_id, device, pack_len)
                half = len(groups[k])
                ref = ref_cache[k] if ref_cache is not None else _reference(model, batch, dtype)
                with autocast(device, dtype):
                    pol = sequence_logprobs(model, batch)
                loss, acc, margin = dpo_loss(pol[:half], pol[half:], ref[:half], ref[half:], lm.beta)
                (loss / train.grad_accum).backward()
                losses.append(float(loss.detach()))
                accs.append(acc)
                margins.append(margin)
                hist.tokens += int((batch["segment"] >= 0).sum())   # real tokens, packed or padded
            check_finite_loss(sum(losses) / len(losses), step)
            optimizer_step(opt, sched, params, train.max_grad_norm)
            row = {"step": step, "loss": sum(losses) / len(losses), "reward_acc": sum(accs) / len(accs),
                   "margin": sum(margins) / len(margins), "lr": sched.get_last_lr()[0], "tokens": hist.tokens}
            hist.steps.append(row)
            if on_step:
                on_step(row)
            if checkpoint_dir is not None and train.checkpoint_every and step % train.checkpoint_every == 0 \
                    and step < n_steps:
                save_checkpoint(checkpoint_dir, trainable_state(model), opt, sched, {
                    "step": step, "pairs_batch": gi, "steps": hist.steps, "tokens": hist.tokens,
                    "seconds": time.perf_counter() - start, "precision": choice.name,
                    "precision_measured": choice.measured})
    hist.seconds = time.perf_counter() - start
    if eval_pairs:
        hist.evals.append({"step": n_steps, **evaluate_dpo(model, tokenizer, eval_pairs, lm.beta)})
    model.eval()
    hist.model = model
    return hist


@torch.no_grad()
def evaluate_dpo(model, tokenizer, pairs: list[dict], beta: float = 0.1,
                 batch_size: int = 8) -> dict:
    """Preference accuracy of the policy itself (chosen more likely than rejected), and, with adapters,
    the DPO loss and reward accuracy against the adapter-free reference."""
    model.eval()
    device = model_device(model)
    pad_id = tokenizer.pad_token_id
    wins, total, losses, raccs = 0, 0, [], []
    for i in range(0, len(pairs), batch_size):
        g = pairs[i:i + batch_size]
        batch = pair_batch(g, pad_id, device)
        pol = sequence_logprobs(model, batch)
        half = len(g)
        wins += int((pol[:half] > pol[half:]).sum())
        total += half
        if hasattr(model, "disable_adapter"):
            ref = _reference(model, batch)
            loss, acc, _ = dpo_loss(pol[:half], pol[half:], ref[:half], ref[half:], beta)
            losses.append(float(loss) * half); raccs.append(acc * half)
    out = {"preference_acc": wins / max(total, 1)}
    if losses:
        out.update(dpo_loss=sum(losses) / total, reward_acc=sum(raccs) / total)
    return out
