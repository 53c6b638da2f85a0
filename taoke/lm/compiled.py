"""Compile the decoder layers with torch.compile for a long training run, and fall back to eager if it fails.

Inductor fuses what eager runs as separate passes over the activations (RMSNorm, rotary, SwiGLU, the
dtype casts of autocast, LoRA's scaling and sum): on smollm2-135m LoRA on 2 CPU cores that is ~10% more
tokens/s (bench/RESULTS.md). All layers share one compiled graph (transformers' layers are the same code),
but the first compile takes ~30 s on such a CPU (much less once inductor's on-disk cache has it), so `auto`
compiles only runs long enough to win it back. Compilation needs a C++ compiler on a CPU and triton on a
GPU; when it fails, training goes on eagerly with a warning.
"""

from __future__ import annotations

import importlib.util
import shutil
import warnings
from typing import Callable

import torch

from taoke.errors import RecipeError

COMPILE_MIN_STEPS = 300  # `auto`: at ~1.3 s/step and ~10% saved, 300 steps repay a cold ~30 s compile


def toolchain_ready(device: torch.device) -> bool:
    """Whether inductor can build kernels here: a C++ compiler for CPU, triton for CUDA."""
    if device.type == "cuda":
        return importlib.util.find_spec("triton") is not None
    if device.type == "cpu":
        return any(shutil.which(c) for c in ("c++", "g++", "clang++"))
    return False


def want_compile(setting: bool | str, device: torch.device, total_steps: int, packing: bool) -> bool:
    """Resolve the `compile` option (true | false | auto) for this run."""
    if setting in (False, "false"):
        return False
    if setting in (True, "true"):
        return True
    if setting != "auto":
        raise RecipeError(f"lm.compile '{setting}': choose true, false or auto")
    # packed batches all have one shape, so one graph serves the whole run
    return packing and total_steps >= COMPILE_MIN_STEPS and toolchain_ready(device)


class CompiledDecoder:
    """Context manager: the decoder layers run compiled inside (when asked and when it works), eagerly after.

    `probe` runs one forward and backward on a real batch right after compiling, so a missing compiler or an
    op inductor cannot lower shows up here, where training can still go on eagerly, and not mid-run.
    """

    def __init__(self, layers: torch.nn.ModuleList, enabled: bool, probe: Callable[[], None]):
        self.layers, self.enabled, self.probe = layers, enabled, probe
        self.active = False

    def __enter__(self) -> "CompiledDecoder":
        if not self.enabled:
            return self
        for layer in self.layers:
            layer.compile(dynamic=None)  # static shapes first; a second shape (a short last batch) goes dynamic
        try:
            self.probe()
            self.active = True
        except Exception as err:  # noqa: BLE001 - any compile failure means: train eagerly
            self._uncompile()
            warnings.warn(f"torch.compile failed ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                          f"training eagerly. Set lm.compile: false to skip the attempt.", stacklevel=2)
        return self

    def _uncompile(self) -> None:
        for layer in self.layers:
            layer._compiled_call_impl = None  # what nn.Module.compile set; torch has no public inverse

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._uncompile()
        self.active = False
