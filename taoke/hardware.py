"""The machine a run uses: which device, what the CPU can do, and glibc's hold on freed memory."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import resource
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from taoke.allocator import active_allocator


def pick_device(preference: str | torch.device | None = "auto") -> torch.device:
    """The one device picker: CUDA when present, else the CPU; an explicit choice ('cpu', 'cuda:1') is kept."""
    if preference not in (None, "auto"):
        return torch.device(preference)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo), empty where unknown."""
    line = next((ln for ln in _cpuinfo().splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[1].split()) if ":" in line else set()


# oneDNN's ISA caps below its first bf16 ISA: with ONEDNN_MAX_CPU_ISA (or the older DNNL_ name) set to one of these,
# torch's bf16 matmuls are emulated even on a CPU that has AVX512-BF16 or AMX (users set it to pin kernels)
ISA_CAPS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI"}


def isa_cap() -> str | None:
    """The oneDNN ISA cap set in the environment, upper-cased (None when unset)."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return cap.strip().upper() if cap else None


def cpu_has_bf16() -> bool:
    """True when the CPU executes bf16 matmuls natively (AVX512-BF16 or AMX) and no oneDNN ISA cap forbids them."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"}) and isa_cap() not in ISA_CAPS_WITHOUT_BF16


def cpu_model() -> str:
    return next((ln.split(":", 1)[1].strip() for ln in _cpuinfo().splitlines() if ln.startswith("model name")),
                platform.processor() or "unknown CPU")


# the flags that decide which kernels a CPU can run for training (bf16/int8 matmuls, vector width)
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8",
                "avx_vnni")


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1 << 20) if sys.platform == "darwin" else peak / 1024, 1)


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def runtime_record(device: torch.device) -> dict:
    """How this process runs: device, CPU model and kernel flags, cores, threads, library versions."""
    rec = {"device": str(device), "cpu": cpu_model(), "cpu_flags": sorted(set(KERNEL_FLAGS) & cpu_flags()),
           "cores": os.cpu_count(), "threads": torch.get_num_threads(),
           # the vector ISA ATen dispatches to, and any oneDNN cap: why the same CPU can run slower kernels
           "kernels": {"aten": torch.backends.cpu.get_cpu_capability(), "onednn_isa_cap": isa_cap()},
           "allocator": active_allocator(),   # taoke/allocator.py: why peak RSS differs between runs
           "versions": {p: _version(p) for p in ("torch", "transformers", "peft")}}
    if device.type == "cuda":
        rec["gpu"] = torch.cuda.get_device_name(device)
    return rec


def machine_summary() -> str:
    """'N cores, CPU model' for benchmark records."""
    return f"{os.cpu_count()} cores, {cpu_model()}"


def _glibc():
    """glibc through ctypes, or None off Linux or where it cannot be loaded."""
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
