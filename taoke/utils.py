"""Small shared helpers: hashing, atomic writes, device choice."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temp path next to `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def pick_device(preference: str = "auto"):
    import torch

    if preference != "auto":
        return torch.device(preference)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def _glibc():
    """glibc through ctypes, or None off Linux or where it cannot be loaded."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Ask glibc malloc to keep freed blocks for reuse instead of returning them to the OS.

    Training frees and re-allocates the same large buffers every step (a 30k-row embedding's gradient is
    47 MB); glibc serves blocks over 32 MB with fresh mmaps, so each step page-faults them in again
    (~13 ms of a 100 ms MiniLM step here). PyTorch's CPU tuning guide swaps in jemalloc/tcmalloc for
    this; mallopt gets the same reuse in-process with nothing to install. No-op off glibc.
    """
    libc = _glibc()
    try:
        m_trim_threshold, m_mmap_max = -1, -4
        return libc is not None and bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 40))
    except AttributeError:
        return False


def release_freed_memory() -> None:
    """Return free heap pages to the OS (glibc malloc_trim), e.g. after training's activations are gone."""
    libc = _glibc()
    try:
        if libc is not None:
            libc.malloc_trim(0)
    except AttributeError:
        pass


def cpu_has_bf16() -> bool:
    """True when the CPU executes bf16 matmuls natively (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def machine_summary() -> str:
    """'N cores, CPU model' for benchmark records."""
    import os
    import platform

    cpu = platform.processor() or "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} cores, {cpu}"
