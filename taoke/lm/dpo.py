"""Direct Preference Optimization (Rafailov et al. 2023), written out because TRL is an optional dependency.

loss = -log sigmoid(beta * ((log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))))

The reference model never doubles memory: with LoRA/DoRA it is the same model with adapters disabled
(`model.disable_adapter()`); for full or freeze training the reference log-probs are computed once,
before the first update, and kept as numbers.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from taoke.lm.data import encode_dpo
from taoke.lm.fast_lora import FastLoraForward
from taoke.lm.loss import body_and_head, shifted_targets, token_logprobs
from taoke.lm.pack import padded_batch
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
    """Sum of log p(label) over the labelled tokens of each row: [rows]."""
    body, head = body_and_head(model)
    hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).last_hidden_state
    h, y, keep = shifted_targets(hidden, batch["labels"])
    lp = token_logprobs(h, head, y)
    rows = torch.arange(keep.shape[0], device=keep.device)[:, None].expand_as(keep)[keep]
    return torch.zeros(keep.shape[0], dtype=lp.dtype, device=lp.device).index_add(0, rows, lp)


def _pair_batch(pairs: list[dict], pad_id: int, device) -> dict:
    """chosen rows then rejected rows, one padded batch."""
    rows = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    return {k: v.to(device) for k, v in padded_batch(rows, pad_id).items()}


def dpo_loss(pc, pr, rc, rr, beta: float):
    """(loss, reward accuracy, margin) from policy/reference log-probs of chosen and rejected."""
    logits = beta * ((pc - rc) - (pr - rr))
    d = logits.detach()
    return -F.logsigmoid(logits).mean(), float((d > 0).float().mean()), float(d.mean() / beta)


def _reference(model, batch):
    ctx = model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
    with torch.no_grad(), ctx:
        return sequence_logprobs(model, batch)


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
    groups = [train_pairs[i:i + n] for i in range(0, len(train_pairs), n)]
    model.train()
    resumed = checkpoint_position(checkpoint_dir) if resume and has_checkpoint(checkpoint_dir) else None
    if resumed is not None:
        choice = PrecisionChoice.restored(resumed)
    else:
        probe = _pair_batch(groups[0][:1], pad_id, device)   # one pair: the precision probe times its real step
        with FastLoraForward(model):   # the policy's step as it will run
            choice = choose_for_training(train.precision, device, model,
                                         lambda: sequence_logprobs(model, probe).sum())
    dtype = choice.dtype
    ref_cache = None
    if not peft:  # full/freeze: reference log-probs now, before any update (no second model in memory)
        model.eval()
        ref_cache = [_reference(model, _pair_batch(g, pad_id, device)) for g in groups]
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
    with FastLoraForward(model) as fused:  # the reference pass (adapters disabled, no autocast) keeps PEFT's forward
        hist.fused_lora_layers = len(fused.swapped)
        for step in range(first, n_steps + 1):
            losses, accs, margins = [], [], []
            for _ in range(train.grad_accum):
                k = gi % len(groups)
                gi += 1
                batch = _pair_batch(groups[k], pad_id, device)
                half = len(groups[k])
                ref = ref_cache[k] if ref_cache is not None else _reference(model, batch)
                with autocast(device, dtype):
                    pol = sequence_logprobs(model, batch)
                loss, acc, margin = dpo_loss(pol[:half], pol[half:], ref[:half], ref[half:], lm.beta)
                (loss / train.grad_accum).backward()
                losses.append(float(loss))
                accs.append(acc)
                margins.append(margin)
                hist.tokens += int(batch["attention_mask"].sum())
            check_finite_loss(sum(losses) / len(losses), step)
            optimizer_step(opt, sched, params, train.max_grad_norm)
            row = {"step": step, "loss": sum(losses) / len(losses), "reward_acc": sum(accs) / len(accs),
                   "margin": sum(margins) / len(margins), "lr": sched.get_last_lr()[0]}
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
        batch = _pair_batch(g, pad_id, device)
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
