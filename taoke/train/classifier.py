"""The classifier/regressor training loop: one function you can read top to bottom.

Batches of encoded examples, gradient accumulation, bf16 autocast where the hardware runs it faster,
per-epoch validation, early stopping on a named metric, resumable checkpoints and a rich progress bar;
the optimizer, schedule and step come from the shared core (train/core.py).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from taoke.hardware import keep_freed_memory, pick_device
from taoke.recipe import TrainConfig
from taoke.train.batches import Encoded, batch_indices, to_device
from taoke.train.checkpoint import has_checkpoint, load_best, load_checkpoint, save_best, save_checkpoint
from taoke.train.core import (check_finite_loss, make_optimizer, make_scheduler, optimizer_step, seed_everything,
                              total_steps, trainable)
from taoke.train.distill import mixed_loss
from taoke.train.embedding_rows import EmbeddingRowsHandle, compact_input_embedding
from taoke.train.precision import PrecisionChoice, autocast, choose_precision, inference_dtype


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)    # one row per epoch
    best_epoch: int = 0
    best_value: float | None = None
    monitor: str = "val_loss"
    seconds: float = 0.0
    samples_per_s: float = 0.0
    stopped_early: bool = False
    precision: str = "fp32"
    precision_choice: dict | None = None                 # why, and the measurement that chose it


def compute_loss(outputs: torch.Tensor, targets: torch.Tensor, regression: bool) -> torch.Tensor:
    outputs = outputs.float()
    if regression:
        return F.mse_loss(outputs.view(-1), targets.float().view(-1))
    return F.cross_entropy(outputs, targets)


@torch.no_grad()
def predict(model: torch.nn.Module, data: Encoded, batch_size: int = 64, device: torch.device | None = None,
            precision: str = "auto") -> torch.Tensor:
    """Model outputs for every row of `data`, in order, as fp32 on the CPU."""
    device = device or next(model.parameters()).device
    dtype = inference_dtype(precision, device)
    model.eval()
    outs = []
    for idx in batch_indices(data, batch_size, shuffle=False, bucket=False):
        batch = to_device(data.batch(idx), device)
        batch.pop("labels")
        with autocast(device, dtype):
            outs.append(model(**batch).float().cpu())
    return torch.cat(outs) if outs else torch.empty(0)


def _mean_length(data: Encoded) -> int:
    lengths = data.lengths()
    return max(1, round(sum(lengths) / max(len(lengths), 1)))


def _monitor_mode(metric: str, mode: str) -> str:
    if mode != "auto":
        return mode
    return "min" if any(k in metric for k in ("loss", "mae", "rmse", "mse")) else "max"


@dataclass
class LoopState:
    """Where training is: everything a resumed run needs to continue as if never stopped."""
    epoch: int = 1
    batch: int = 0                 # next batch index within the epoch
    step: int = 0
    seen: int = 0
    running: float = 0.0
    count: int = 0
    bad_epochs: int = 0
    best_value: float | None = None
    best_epoch: int = 0
    history: list = field(default_factory=list)
    epoch_gen_state: list | None = None   # batch-order generator state at the start of the epoch
    precision: str | None = None          # what autocast ran in (kept on resume)


def fit(model: torch.nn.Module, train: Encoded, val: Encoded | None, cfg: TrainConfig, *, regression: bool,
        evaluate: Callable[[torch.Tensor, torch.Tensor], dict] | None = None,
        augment: Callable[[dict], dict] | None = None, on_epoch: Callable[[dict], None] | None = None,
        on_step: Callable[[dict], None] | None = None, checkpoint_dir: Path | None = None,
        resume: bool = False, quiet: bool = False, teacher: torch.nn.Module | None = None) -> FitResult:
    """Train `model` in place; at the end it holds the weights of the best validation epoch.

    With `teacher` (and cfg.distill), the training loss mixes the labels with the teacher's outputs on the same
    batch; validation loss stays the label loss, so early stopping judges the labels.

    With `checkpoint_dir`, the full state is saved every `cfg.checkpoint_every` optimizer steps and at
    each epoch end; `resume=True` continues from the last checkpoint there, bit-identically on CPU.
    """
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    model.to(device)
    if teacher is not None:
        if cfg.distill is None:
            raise ValueError("a teacher needs cfg.distill (weight, temperature)")
        teacher.to(device).eval().requires_grad_(False)
    # Only the embedding rows the training text uses are trained; the result equals dense AdamW.
    rows = compact_input_embedding(model, train.ids, cfg.optimizer, cfg.weight_decay) if train.ids else None
    try:
        return _fit(model, train, val, cfg, regression=regression, evaluate=evaluate, augment=augment,
                    on_epoch=on_epoch, on_step=on_step, checkpoint_dir=checkpoint_dir, resume=resume, quiet=quiet,
                    rows=rows, teacher=teacher)
    finally:
        if rows is not None:
            rows.restore()


def _fit(model: torch.nn.Module, train: Encoded, val: Encoded | None, cfg: TrainConfig, *, regression: bool,
         evaluate, augment, on_epoch, on_step, checkpoint_dir: Path | None, resume: bool, quiet: bool,
         rows: EmbeddingRowsHandle | None, teacher: torch.nn.Module | None) -> FitResult:
    device = next(model.parameters()).device
    if device.type == "cpu":
        keep_freed_memory()
    choice = choose_precision(cfg.precision, device, model, cfg.batch_size * _mean_length(train))
    dtype = choice.dtype
    gen = torch.Generator().manual_seed(cfg.seed)

    steps_per_epoch = math.ceil(math.ceil(len(train) / cfg.batch_size) / cfg.grad_accum)
    n_steps = total_steps(cfg, steps_per_epoch)
    epochs = math.ceil(n_steps / steps_per_epoch)
    optimizer = make_optimizer(model, cfg)
    params = trainable(model)
    if rows is not None:
        rows.track_decay(optimizer)
    scheduler = make_scheduler(optimizer, cfg, n_steps)

    es = cfg.early_stopping
    monitor = es.metric if es else "val_loss"
    mode = _monitor_mode(monitor, es.mode if es else "auto")
    st = LoopState()
    if resume and has_checkpoint(checkpoint_dir):
        model_state, loop = load_checkpoint(checkpoint_dir, optimizer, scheduler)
        model.load_state_dict(model_state)
        st = LoopState(**loop)
        dtype = {"bf16": torch.bfloat16, "fp32": None}[st.precision or "fp32"]  # same numerics as before the stop
        choice = PrecisionChoice(dtype, "kept from before the run was resumed")
    st.precision = "bf16" if dtype is not None else "fp32"
    start = time.perf_counter()
    seen_at_start = st.seen

    def checkpoint(next_epoch: int, next_batch: int, epoch_gen_state) -> None:
        if checkpoint_dir is not None:
            st.epoch, st.batch, st.epoch_gen_state = next_epoch, next_batch, epoch_gen_state
            save_checkpoint(checkpoint_dir, model.state_dict(), optimizer, scheduler, asdict(st))

    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[rate]:.0f} samples/s"),
                        TimeElapsedColumn(), TimeRemainingColumn(), disable=quiet, transient=False)
    stop = False
    with progress:
        task = progress.add_task("train", total=n_steps, completed=st.step, loss=float("nan"), rate=0.0)
        for epoch in range(st.epoch, epochs + 1):
            model.train()
            if st.epoch_gen_state is not None and epoch == st.epoch:
                gen.set_state(torch.tensor(st.epoch_gen_state, dtype=torch.uint8))  # same batch order as before
            epoch_gen_state = gen.get_state().tolist()
            batches = batch_indices(train, cfg.batch_size, shuffle=True, generator=gen)
            first = st.batch if epoch == st.epoch else 0
            if first == 0:
                st.running, st.count = 0.0, 0
            for i in range(first, len(batches)):
                idx = batches[i]
                batch = to_device(train.batch(idx), device)
                if augment is not None:
                    batch = augment(batch)
                targets = batch.pop("labels")
                with autocast(device, dtype):
                    outputs = model(**batch)
                    if teacher is not None:
                        with torch.no_grad():
                            taught = teacher(**batch)
                loss = compute_loss(outputs, targets, regression)
                if teacher is not None:
                    loss = mixed_loss(loss, outputs, taught, regression, cfg.distill)
                loss = loss / cfg.grad_accum
                check_finite_loss(loss.item(), st.step + 1)
                loss.backward()
                st.running += loss.item() * cfg.grad_accum * len(idx)
                st.count += len(idx)
                st.seen += len(idx)
                if (i + 1) % cfg.grad_accum and i + 1 != len(batches):
                    continue
                optimizer_step(optimizer, scheduler, params, cfg.max_grad_norm)
                st.step += 1
                rate = (st.seen - seen_at_start) / (time.perf_counter() - start)
                train_loss = st.running / max(st.count, 1)
                progress.update(task, advance=1, loss=train_loss, rate=rate)
                if on_step is not None and (st.step % 10 == 0 or st.step == n_steps):
                    on_step({"step": st.step, "epoch": epoch, "train_loss": train_loss,
                             "lr": scheduler.get_last_lr()[0], "samples_per_s": rate})
                if st.step >= n_steps:
                    break
                if cfg.checkpoint_every and st.step % cfg.checkpoint_every == 0 and i + 1 < len(batches):
                    checkpoint(epoch, i + 1, epoch_gen_state)

            row = {"epoch": epoch, "step": st.step, "train_loss": st.running / max(st.count, 1)}
            if val is not None and len(val):
                outputs = predict(model, val, cfg.batch_size * 2, device, cfg.precision)
                row["val_loss"] = compute_loss(outputs, val.targets, regression).item()
                if evaluate is not None:
                    row.update({f"val_{k}": v for k, v in evaluate(outputs, val.targets).items()})
            st.history.append(row)
            if on_epoch is not None:
                on_epoch(row)

            value = row.get(monitor)
            if value is not None and (st.best_value is None or
                                      (value < st.best_value if mode == "min" else value > st.best_value)):
                st.best_value, st.best_epoch, st.bad_epochs = value, epoch, 0
                if checkpoint_dir is not None:
                    save_best(checkpoint_dir, model)
                else:
                    best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
            elif value is not None:
                st.bad_epochs += 1
                stop = bool(es and st.bad_epochs >= es.patience)
            checkpoint(epoch + 1, 0, gen.get_state().tolist())
            if stop or st.step >= n_steps:
                break

    if st.best_value is not None:  # end on the best validation epoch's weights
        if checkpoint_dir is not None:
            load_best(checkpoint_dir, model)
        else:
            model.load_state_dict(best_state)
    seconds = time.perf_counter() - start
    return FitResult(history=st.history, best_epoch=st.best_epoch, best_value=st.best_value, monitor=monitor,
                     seconds=seconds, samples_per_s=(st.seen - seen_at_start) / seconds if seconds else 0.0,
                     stopped_early=stop, precision=st.precision, precision_choice=choice.record())
