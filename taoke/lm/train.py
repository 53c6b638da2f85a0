"""Train a causal LM (continued pretraining or SFT): a plain loop you can read top to bottom.

The model comes in adapted (adapt/language.py). Sequence packing, chunked cross-entropy over labelled
positions only, gradient accumulation normalised by the labelled tokens of the whole step, bf16 autocast
where the hardware runs it faster, frozen weights held in bf16, PEFT's plain LoRA layers through a fused
forward, optionally compiled decoder layers; the optimizer, schedule and step come from the shared core.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from taoke.hardware import release_freed_memory
from taoke.lm.compiled import CompiledDecoder, want_compile
from taoke.lm.data import IGNORE
from taoke.lm.fast_lora import FastLoraForward
from taoke.lm.frozen import FrozenInLowPrecision
from taoke.lm.loss import lm_loss_sum
from taoke.lm.pack import batches, pack_rows, packed_batch, padded_batch
from taoke.models.parts import find_stack
from taoke.recipe import LMConfig, TrainConfig
from taoke.train.core import (check_finite_loss, make_optimizer, make_scheduler, optimizer_step, total_steps,
                              trainable)
from taoke.train.checkpoint import (checkpoint_position, has_checkpoint, load_checkpoint, restore_trainable,
                                    save_checkpoint, trainable_state)
from taoke.train.precision import PrecisionChoice, autocast, choose_for_training, inference_dtype


@dataclass
class LMHistory:
    steps: list[dict] = field(default_factory=list)   # step, loss, lr, tokens, tokens_per_s
    evals: list[dict] = field(default_factory=list)   # step, loss, perplexity
    model: torch.nn.Module | None = None              # the trained model (a PeftModel for lora/dora)
    tokens: int = 0                                   # non-padding tokens seen
    seconds: float = 0.0
    compiled: bool = False                            # whether the decoder layers ran under torch.compile
    precision: str = "fp32"                           # what autocast ran in
    precision_choice: dict | None = None              # why, and the measurement that chose it
    fused_lora_layers: int = 0                        # LoRA layers that ran the fused forward (fast_lora.py)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def make_batches(rows: list[dict], seq_len: int, batch_size: int, pad_id: int, packing: bool,
                 seed: int | None) -> list[dict]:
    """Packed (or padded) micro-batches as tensor dicts, each with its count of real tokens."""
    if packing:
        packed = pack_rows(rows, seq_len, pad_id, seed=seed)
        out = []
        for group in batches(packed, batch_size):
            b = packed_batch(group)
            b["n_real"] = sum(r["n_real"] for r in group)
            out.append(b)
        return out
    cut = [{"input_ids": r["input_ids"][:seq_len], "labels": r["labels"][:seq_len]} for r in rows]
    out = []
    for group in batches(cut, batch_size, seed=seed):
        b = padded_batch(group, pad_id)
        b["n_real"] = int(b["attention_mask"].sum())
        out.append(b)
    return out


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}


def train_lm(model, tokenizer, train_rows: list[dict], train: TrainConfig, lm: LMConfig, *,
             eval_rows: list[dict] | None = None, on_step: Callable[[dict], None] | None = None,
             progress: bool = True, checkpoint_dir: Path | None = None, resume: bool = False) -> LMHistory:
    """Train an adapted model on tokenized rows ({input_ids, labels}); returns the history with the trained
    model in .model (and, with eval_rows, its held-out loss at the end in .evals).

    With `checkpoint_dir`, every train.checkpoint_every steps the trainable weights, optimizer, schedule, RNG
    and data position are saved; `resume` continues from there exactly as if never stopped."""
    if not train_rows:
        raise ValueError("no training rows after tokenization")
    random.seed(train.seed)
    torch.manual_seed(train.seed)
    if train.threads:
        torch.set_num_threads(train.threads)
    device = model_device(model)
    pad_id = tokenizer.pad_token_id

    unshuffled = make_batches(train_rows, lm.seq_len, train.batch_size, pad_id, lm.packing, seed=None)
    model.train()
    resumed = checkpoint_position(checkpoint_dir) if resume and has_checkpoint(checkpoint_dir) else None
    if resumed is not None:
        choice = PrecisionChoice.restored(resumed)
    else:
        # the precision probe times the real step on one row of the first batch, cut to 256 tokens (~1 s a step)
        probe_rows = _to({k: v[:1, :256] for k, v in unshuffled[0].items() if isinstance(v, torch.Tensor)}, device)
        with FastLoraForward(model):   # the step as it will run: fused LoRA forward under bf16
            choice = choose_for_training(train.precision, device, model, lambda: lm_loss_sum(model, probe_rows)[0])
    dtype = choice.dtype
    n_steps = total_steps(train, math.ceil(len(unshuffled) / train.grad_accum))
    compile_layers = want_compile(lm.compile, device, n_steps, lm.packing)
    params = trainable(model)
    opt = make_optimizer(model, train)
    sched = make_scheduler(opt, train, n_steps)

    position = {"epoch": 0, "index": 0}   # micro-batches consumed in the current epoch

    def micro_batches():
        while True:  # a fresh shuffle (and packing) per epoch
            epoch_batches = make_batches(train_rows, lm.seq_len, train.batch_size, pad_id, lm.packing,
                                         seed=train.seed + position["epoch"])
            while position["index"] < len(epoch_batches):
                position["index"] += 1
                yield epoch_batches[position["index"] - 1]
            position["epoch"], position["index"] = position["epoch"] + 1, 0

    stream = micro_batches()
    hist = LMHistory(precision=choice.name, precision_choice=choice.record())
    bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                   TimeElapsedColumn(), disable=not progress, transient=False)
    start = time.perf_counter()

    def probe():  # one forward and backward that compiles the layers (and shows a failure before training)
        try:
            with autocast(device, dtype):
                loss_sum, _ = lm_loss_sum(model, _to(unshuffled[0], device))
            loss_sum.backward()
        finally:
            model.zero_grad(set_to_none=True)

    # frozen base weights live in bf16 while training runs in bf16 (same numerics, less memory and copying; DoRA
    # keeps fp32, see FrozenInLowPrecision). Compiled layers get PEFT's own LoRA forward: inductor fuses its casts
    # and sums itself.
    with FrozenInLowPrecision(model, dtype), \
            CompiledDecoder(find_stack(model).blocks, compile_layers, probe) as compiled, \
            FastLoraForward(model, enabled=not compiled.active) as fused:
        hist.compiled = compiled.active
        hist.fused_lora_layers = len(fused.swapped)
        first = 1
        if resumed is not None:   # after the set-up above (whose compile probe draws random numbers)
            state, loop = load_checkpoint(checkpoint_dir, opt, sched)
            restore_trainable(model, state)
            position.update(epoch=loop["epoch"], index=loop["index"])
            hist.steps, hist.tokens, first = loop["steps"], loop["tokens"], loop["step"] + 1
            start -= loop["seconds"]
        with bar:
            task = bar.add_task("train", total=n_steps, info="", completed=first - 1)
            for step in range(first, n_steps + 1):
                group = [next(stream) for _ in range(train.grad_accum)]
                # normalise by the labelled tokens of the whole optimizer step, so packing and accumulation
                # do not change what one step optimises
                n_targets = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in group)
                loss_total = 0.0
                for b in group:
                    with autocast(device, dtype):
                        loss_sum, _ = lm_loss_sum(model, _to(b, device))
                    (loss_sum / max(n_targets, 1)).backward()
                    loss_total += float(loss_sum.detach())
                    hist.tokens += b["n_real"]
                check_finite_loss(loss_total / max(n_targets, 1), step)
                grad_norm = optimizer_step(opt, sched, params, train.max_grad_norm)
                elapsed = time.perf_counter() - start
                row = {"step": step, "loss": loss_total / max(n_targets, 1), "lr": sched.get_last_lr()[0],
                       "grad_norm": grad_norm, "tokens": hist.tokens, "tokens_per_s": hist.tokens / elapsed}
                hist.steps.append(row)
                bar.update(task, advance=1, info=f"loss {row['loss']:.4f}  {row['tokens_per_s']:.0f} tok/s")
                if on_step:
                    on_step(row)
                if checkpoint_dir is not None and train.checkpoint_every and step % train.checkpoint_every == 0 \
                        and step < n_steps:
                    save_checkpoint(checkpoint_dir, trainable_state(model), opt, sched, {
                        "step": step, **position, "steps": hist.steps, "tokens": hist.tokens,
                        "seconds": time.perf_counter() - start, "precision": choice.name,
                        "precision_measured": choice.measured})
        hist.seconds = time.perf_counter() - start
    if eval_rows:   # after the frozen weights are back in fp32 and the layers eager: as `taoke eval` runs the model
        hist.evals.append({"step": n_steps, **evaluate_lm(model, eval_rows, pad_id, lm.seq_len,
                                                          precision=train.precision)})
    if device.type == "cpu":
        release_freed_memory()  # hand the training activations' memory back before what comes next
    model.eval()
    hist.model = model
    return hist


@torch.no_grad()
def evaluate_lm(model, rows: list[dict], pad_id: int, seq_len: int = 512, batch_size: int = 8,
                precision: str = "auto") -> dict:
    """Mean token loss over labelled positions and its perplexity (packed, which the packing test shows is exact)."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    dtype = inference_dtype(precision, device)
    total, n = 0.0, 0
    for b in make_batches(rows, seq_len, batch_size, pad_id, packing=True, seed=None):
        with autocast(device, dtype):
            loss_sum, k = lm_loss_sum(model, _to(b, device))
        total += float(loss_sum)
        n += k
    if was_training:
        model.train()
    loss = total / max(n, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": n}
