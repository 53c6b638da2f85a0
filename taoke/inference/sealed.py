"""Opening a sealed run: its weight files decrypted into memory only (never written), checked against the
hashes lineage.json recorded, and turned into a state dict the loaders take (formats/sealed.py has the file
format; ship/seal.py seals and unseals runs)."""

from __future__ import annotations

import hashlib
import io

import torch
from safetensors.torch import load as load_safetensors

from taoke.errors import ModelError
from taoke.formats.sealed import KEY_ENV, decrypt_file, resolve_key
from taoke.run import Run


def require_key(key: bytes | None, run: Run) -> bytes:
    if key is None:
        raise ModelError(f"{run.path}: the run is sealed; give its key with --key-file K or ${KEY_ENV}")
    return key


def open_sealed(run: Run, key: bytes) -> dict[str, bytes]:
    """{name under model/: plaintext} of a sealed run, checked against the hashes lineage.json recorded."""
    run.check_model_files()
    recorded = run.lineage.get("model_files") or {}
    plain = {}
    for name, entry in run.sealed["files"].items():
        data = decrypt_file(run.model_dir / entry["file"], name, key)
        if name in recorded and hashlib.sha256(data).hexdigest() != recorded[name]["sha256"]:
            raise ModelError(f"{run.model_dir / entry['file']}: decrypts to a file that is not the one the run "
                             "recorded")
        plain[name] = data
    return plain


def sealed_state(run: Run, key: bytes | None = None) -> dict[str, torch.Tensor] | None:
    """The model weights of a sealed run, decrypted in memory (None for a plain run). The key: `key`, else
    $TAOKE_SEAL_KEY."""
    if not run.sealed:
        return None
    return weights_state(open_sealed(run, require_key(key if key is not None else resolve_key(), run)))


def weights_state(weights: dict[str, bytes], folder: str = "") -> dict[str, torch.Tensor]:
    """The tensors of the decrypted weight files directly in `folder` (safetensors, or torch with weights_only)."""
    state: dict[str, torch.Tensor] = {}
    for name in sorted(weights):
        parent, _, base = name.rpartition("/")
        if parent != folder:
            continue
        if base.endswith(".safetensors"):
            state.update(load_safetensors(weights[name]))
        elif base.endswith((".bin", ".pt", ".pth")):
            state.update(torch.load(io.BytesIO(weights[name]), map_location="cpu", weights_only=True))
    if not state:
        raise ModelError("the sealed run holds no safetensors or torch weight files taoke can load")
    return state
