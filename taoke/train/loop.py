"""The training loop: one function you can read top to bottom.

AdamW or SGD, warmup schedules from transformers, gradient accumulation, clipping, bf16 autocast
where the hardware has it, per-epoch validation, early stopping on a named metric, atomic
checkpoints, and a rich progress bar with loss and throughput.
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from taoke.recipe import TrainConfig
from taoke.train.batches import Encoded, batch_indices, to_device
from taoke.utils import cpu_has_bf16, pick_device


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)    # one row per epoch
    best_epoch: int = 0
    best_value: float | None = None
    monitor: str = "val_loss"
    seconds: float = 0.0
    samples_per_s: float = 0.0
    stopped_early: bool = False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# Below this size autocast's casts cost more than bf16 matmuls save on a CPU (measured on an 8x8 CNN).
BF16_MIN_PARAMS = 5_000_000


def autocast_dtype(precision: str, device: torch.device, num_params: int | None = None) -> torch.dtype | None:
    """bf16 where the hardware runs it natively and the model is big enough to gain; None means fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if num_params is not None and num_params < BF16_MIN_PARAMS:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_bf16() else None


def compute_loss(outputs: torch.Tensor, targets: torch.Tensor, regression: bool) -> torch.Tensor:
    outputs = outputs.float()
    if regression:
        return F.mse_loss(outputs.view(-1), targets.float().view(-1))
    return F.cross_entropy(outputs, targets)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # Biases and norm gains are not decayed (the usual transformer recipe).
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr)


@torch.no_grad()
def predict(model: torch.nn.Module, data: Encoded, batch_size: int = 64, device: torch.device | None = None,
            precision: str = "auto") -> torch.Tensor:
    """Model outputs for every row of `data`, in order, as fp32 on the CPU."""
    device = device or next(model.parameters()).device
    dtype = autocast_dtype(precision, device, sum(p.numel() for p in model.parameters()))
    model.eval()
    outs = []
    for idx in batch_indices(data, batch_size, shuffle=False, bucket=False):
        batch = to_device(data.batch(idx), device)
        batch.pop("labels")
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            outs.append(model(**batch).float().cpu())
    return torch.cat(outs) if outs else torch.empty(0)


def _monitor_mode(metric: str, mode: str) -> str:
    if mode != "auto":
        return mode
    return "min" if any(k in metric for k in ("loss", "mae", "rmse", "mse")) else "max"


def fit(model: torch.nn.Module, train: Encoded, val: Encoded | None, cfg: TrainConfig, *, regression: bool,
        evaluate: Callable[[torch.Tensor, torch.Tensor], dict] | None = None,
        augment: Callable[[dict], dict] | None = None, on_epoch: Callable[[dict], None] | None = None,
        on_step: Callable[[dict], None] | None = None, checkpoint_dir: Path | None = None,
        quiet: bool = False) -> FitResult:
    """Train `model` in place; at the end it holds the weights of the best validation epoch."""
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    model.to(device)
    dtype = autocast_dtype(cfg.precision, device, sum(p.numel() for p in model.parameters()))
    gen = torch.Generator().manual_seed(cfg.seed)

    steps_per_epoch = math.ceil(math.ceil(len(train) / cfg.batch_size) / cfg.grad_accum)
    total_steps = cfg.max_steps or steps_per_epoch * cfg.epochs
    epochs = math.ceil(total_steps / steps_per_epoch)
    optimizer = make_optimizer(model, cfg)
    from transformers import get_scheduler

    scheduler = get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=int(cfg.warmup_ratio * total_steps),
                              num_training_steps=total_steps)

    es = cfg.early_stopping
    monitor = es.metric if es else "val_loss"
    mode = _monitor_mode(monitor, es.mode if es else "auto")
    result = FitResult(monitor=monitor)
    best_state, bad_epochs, step, seen = None, 0, 0, 0
    start = time.perf_counter()

    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[rate]:.0f} samples/s"),
                        TimeElapsedColumn(), TimeRemainingColumn(), disable=quiet, transient=False)
    with progress:
        task = progress.add_task("train", total=total_steps, loss=float("nan"), rate=0.0)
        for epoch in range(1, epochs + 1):
            model.train()
            batches = batch_indices(train, cfg.batch_size, shuffle=True, generator=gen)
            running, count = 0.0, 0
            for i, idx in enumerate(batches):
                batch = to_device(train.batch(idx), device)
                if augment is not None:
                    batch = augment(batch)
                targets = batch.pop("labels")
                with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    outputs = model(**batch)
                loss = compute_loss(outputs, targets, regression) / cfg.grad_accum
                loss.backward()
                running += loss.item() * cfg.grad_accum * len(idx)
                count += len(idx)
                seen += len(idx)
                if (i + 1) % cfg.grad_accum and i + 1 != len(batches):
                    continue
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                rate = seen / (time.perf_counter() - start)
                progress.update(task, advance=1, loss=running / max(count, 1), rate=rate)
                if on_step is not None and (step % 10 == 0 or step == total_steps):
                    on_step({"step": step, "epoch": epoch, "train_loss": running / max(count, 1),
                             "lr": scheduler.get_last_lr()[0], "samples_per_s": rate})
                if step >= total_steps:
                    break

            row = {"epoch": epoch, "step": step, "train_loss": running / max(count, 1)}
            if val is not None and len(val):
                outputs = predict(model, val, cfg.batch_size * 2, device, cfg.precision)
                row["val_loss"] = compute_loss(outputs, val.targets, regression).item()
                if evaluate is not None:
                    row.update({f"val_{k}": v for k, v in evaluate(outputs, val.targets).items()})
            result.history.append(row)
            if on_epoch is not None:
                on_epoch(row)

            value = row.get(monitor)
            if value is None:
                best_state = None  # nothing to monitor: keep the last weights
            elif result.best_value is None or (value < result.best_value if mode == "min" else value > result.best_value):
                result.best_value, result.best_epoch, bad_epochs = value, epoch, 0
                best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
            else:
                bad_epochs += 1
                if es and bad_epochs >= es.patience:
                    result.stopped_early = True
                    break
            if checkpoint_dir is not None:
                save_checkpoint(checkpoint_dir, model, optimizer, scheduler, epoch, step, gen)
            if step >= total_steps:
                break

    if best_state is not None:
        model.load_state_dict(best_state)
    result.seconds = time.perf_counter() - start
    result.samples_per_s = seen / result.seconds if result.seconds else 0.0
    return result


def save_checkpoint(directory: Path, model, optimizer, scheduler, epoch: int, step: int,
                    gen: torch.Generator) -> None:
    """Everything needed to continue: written to a temp file, then renamed, so a kill never leaves half a file."""
    from taoke.utils import atomic_path

    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "epoch": epoch, "step": step, "torch_rng": torch.get_rng_state(), "gen_rng": gen.get_state()}
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / "last.pt") as tmp:
        torch.save(state, tmp)
