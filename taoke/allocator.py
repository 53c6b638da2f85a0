"""The memory allocator training runs under: mimalloc where the package ships it, else the C library's malloc.

Training allocates and frees the same few hundred activation buffers every step. glibc's malloc serves them
from one heap whose freed holes the next step's buffers do not fit, so its resident memory grows to about twice
what is live: LoRA SFT of smollm2-135m at 8 x 256 fp32 tokens (about 3 GB of saved activations a step) peaked at
7613 MB under glibc and 4448 MB under mimalloc, with the same held-out loss and no fewer tokens/s
(bench/sft_vs_hf.py, bench/RESULTS.md 2026-12-07T10:37, an AVX2-only CPU). Returning memory to the OS on every
free instead (a fixed glibc mmap threshold) costs a page fault per buffer: it about doubled the step time in a
probe. So mimalloc runs with purging off (MIMALLOC_PURGE_DELAY=-1): freed pages stay for the next step. Where
activations are small and loading or merging the model sets the peak, mimalloc's can be a little higher (3250
against 3024 MB for recipes/sft-lora.yaml's batch 2 at 4 steps, one run each).

An allocator has to be in place before the process allocates anything, so `taoke derive` re-executes itself
once with mimalloc preloaded (LD_PRELOAD, as PyTorch's own launcher `torch.backends.xeon.run_cpu` does with
jemalloc/tcmalloc) and puts the caller's LD_PRELOAD back for its child processes. TAOKE_ALLOCATOR=system keeps
the C library's malloc. `taoke.derive(...)` called from a program runs under that program's allocator (start
it with `preload_env()`'s environment to get mimalloc). The run records which allocator it ran under
(lineage.json `runtime.allocator`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

OPT_OUT = "TAOKE_ALLOCATOR"          # "system": no re-exec, the C library's malloc
_PRELOADED = "TAOKE_MIMALLOC"        # set in the re-executed process: the path preloaded
_CALLER_PRELOAD = "TAOKE_CALLER_LD_PRELOAD"   # the caller's LD_PRELOAD ("" when it had none)
SETTINGS = {"MIMALLOC_PURGE_DELAY": "-1"}     # keep freed pages for reuse (see the module docstring)


def mimalloc_library() -> Path | None:
    """libmimalloc.so from the cmeel-mimalloc package (installed on Linux x86-64), or None."""
    if not sys.platform.startswith("linux"):
        return None
    for folder in sys.path:
        lib = Path(folder or ".") / "cmeel.prefix" / "lib"
        for name in ("libmimalloc.so.3", "libmimalloc.so"):
            if (lib / name).is_file():
                return (lib / name).resolve()
    return None


def preload_env(env: dict | None = None) -> dict | None:
    """A copy of `env` (default os.environ) under which a new process starts with mimalloc, or None where it
    cannot (not Linux, package missing, TAOKE_ALLOCATOR=system)."""
    env = dict(os.environ if env is None else env)
    lib = mimalloc_library()
    if lib is None or env.get(OPT_OUT, "").lower() == "system":
        return None
    caller = env.get("LD_PRELOAD", "")
    env["LD_PRELOAD"] = f"{lib}:{caller}" if caller else str(lib)
    env[_CALLER_PRELOAD] = caller
    env[_PRELOADED] = str(lib)
    for key, value in SETTINGS.items():
        env.setdefault(key, value)
    return env


def active_allocator() -> str:
    """'mimalloc' when this process runs with it loaded, else 'system malloc'."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system malloc"
    return "mimalloc" if "libmimalloc" in maps else "system malloc"


def started_as_this_command() -> bool:
    """True when this process was started with the command line it is running (not main() called in-process)."""
    orig, args = list(getattr(sys, "orig_argv", []) or []), sys.argv[1:]
    return bool(args) and orig[-len(args):] == args


def restart_with_mimalloc() -> None:
    """Replace this process with the same command under mimalloc, once; returns where it does not (already
    restarted, opted out, unavailable, or main() called inside another program). In the restarted process,
    children get the caller's LD_PRELOAD back."""
    if os.environ.pop(_PRELOADED, None) is not None:
        caller = os.environ.pop(_CALLER_PRELOAD, "")
        if caller:
            os.environ["LD_PRELOAD"] = caller
        else:
            os.environ.pop("LD_PRELOAD", None)
        return
    env = preload_env()
    if env is None or active_allocator() == "mimalloc" or not started_as_this_command():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable] + list(sys.orig_argv[1:]), env)
    except OSError:   # no interpreter path to re-execute (embedded Python): train under the system malloc
        return
