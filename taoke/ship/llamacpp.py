"""Real llama.cpp from Python: the prebuilt binaries of the npm package node-llama-cpp (no compiler needed),
driven by the small node script beside this file (llamacpp_check.mjs) through one JSON request.

node-llama-cpp is installed by `make llama` (part of `make setup`) into .node/ at the repository root, a
git-ignored folder; TAOKE_NODE_MODULES points at another node_modules folder that holds it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from taoke.errors import ModelError

PINNED = "3.21.1"
SCRIPT = Path(__file__).with_name("llamacpp_check.mjs")
REPO_MODULES = Path(__file__).resolve().parents[2] / ".node" / "node_modules"


def node_modules() -> Path:
    """The node_modules folder holding node-llama-cpp; ModelError saying how to install it when there is none."""
    folder = Path(os.environ.get("TAOKE_NODE_MODULES") or REPO_MODULES)
    if shutil.which("node") is None:
        raise ModelError("the llama.cpp check needs node (https://nodejs.org) on PATH; install it, or export with "
                         "--no-check to skip the check.")
    if not (folder / "node-llama-cpp" / "package.json").is_file():
        raise ModelError(f"node-llama-cpp is not installed in {folder}: run `make llama` (npm i -E "
                         f"node-llama-cpp@{PINNED} into .node/), set TAOKE_NODE_MODULES, or export with --no-check.")
    return folder


def run_llamacpp(gguf: Path, *, tokenize: list[str] = (), greedy: list[dict] = (), nll: list[dict] = (),
                 threads: int = 1, timeout: float = 1800) -> dict:
    """Load `gguf` in llama.cpp and answer the request (see llamacpp_check.mjs); ModelError when llama.cpp fails.

    One thread by default: llama.cpp's worker threads spin at each barrier, and on a CPU shared with other work
    two threads ran 60x slower than one here (the check needs correctness, not speed; the bench sets threads)."""
    modules = node_modules()
    request = {"model": str(Path(gguf).resolve()), "threads": threads,
               "tokenize": list(tokenize), "greedy": list(greedy), "nll": list(nll)}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False, encoding="utf-8") as f:
        json.dump(request, f)
    try:
        proc = subprocess.run(["node", str(SCRIPT), f.name, str(modules)], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ModelError(f"{gguf}: llama.cpp did not answer within {timeout:.0f} s.") from None
    finally:
        os.unlink(f.name)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1][:300]
        raise ModelError(f"{gguf}: llama.cpp (node-llama-cpp) could not run it: {tail}")
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise ModelError(f"{gguf}: unreadable answer from the llama.cpp check: {proc.stdout[:200]!r}") from None


def cpu_features(system_info: str | None) -> list[str]:
    """The CPU features llama.cpp's kernels use, from its system info ("CPU : AVX2 = 1 | AVX512 = 0 | ...")."""
    parts = (part.partition("=") for part in (system_info or "").split("|"))
    return [name.rsplit(":", 1)[-1].strip() for name, _, on in parts if on.strip() == "1"]
