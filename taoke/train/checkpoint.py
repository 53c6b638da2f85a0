"""Resumable checkpoints: model (or its trainable part), optimizer, schedule, RNG and loop position, written
to a temp file and renamed, so a kill never leaves half a file; read back with weights_only=True."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from taoke.files import atomic_path

LAST = "last.pt"
BEST = "best.safetensors"


def save_checkpoint(directory: Path, model_state: dict, optimizer, scheduler, loop: dict) -> None:
    """Everything needed to continue as if never stopped."""
    state = {"model": model_state, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "loop": loop, "torch_rng": torch.get_rng_state()}
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / LAST) as tmp:
        torch.save(state, tmp)


def has_checkpoint(directory: Path | None) -> bool:
    return directory is not None and (directory / LAST).is_file()


def load_checkpoint(directory: Path, optimizer, scheduler) -> tuple[dict, dict]:
    """Restore optimizer, schedule and RNG; returns (model state, loop state) for the caller to apply."""
    # weights_only: a checkpoint is data, never code.
    state = torch.load(directory / LAST, weights_only=True, map_location="cpu")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return state["model"], state["loop"]


def checkpoint_position(directory: Path) -> dict:
    """The loop state of the last checkpoint (where a resumed run continues)."""
    return torch.load(directory / LAST, weights_only=True, map_location="cpu")["loop"]


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (an adapter's, or all of a full fine-tune), detached copies on the CPU."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def restore_trainable(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a trainable_state back in place (the optimizer keeps referring to the same tensors)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        raise RuntimeError(f"checkpoint holds other trainable parameters than the model "
                           f"({sorted(set(state) ^ set(params))[:3]})")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n])


def save_best(directory: Path, model: torch.nn.Module) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(directory / BEST) as tmp:
        save_file(state, str(tmp))


def load_best(directory: Path, model: torch.nn.Module) -> None:
    model.load_state_dict(load_file(str(directory / BEST)))
