"""Sealed weights: a run's weight files encrypted at rest, decrypted in memory only when the run is used.

`seal_run` encrypts every weight file under model/ into `<file>.sealed` (formats/sealed.py has the format
and the keys) and removes the plaintext; `taoke serve/predict/eval/chat` open a sealed run in memory
(inference/sealed.py), so no plaintext weight file is ever written; `unseal_run` writes the plain files
back. lineage.json records the sealed state (`sealed`: each file's sealed name, size and sha256) through
Run.record_sealed; the plaintext hashes recorded when the run completed stay as they were and verify again
after `unseal`.

Deleting the plaintext when sealing does not scrub the disk blocks it occupied: seal on a machine you trust,
or on an encrypted volume, and copy the sealed run from there.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from taoke.errors import ModelError
from taoke.files import atomic_path
from taoke.formats.sealed import SUFFIX, encrypt_file
from taoke.inference.sealed import open_sealed
from taoke.run import Run

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".onnx", ".onnx_data", ".onnx.data")


def weight_files(model_dir: Path) -> list[str]:
    """Paths under model/ (posix, relative) of the weight files to seal."""
    return sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*")
                  if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def _adapter_only(model_dir: Path) -> bool:
    """A run saved as its adapter alone (LM: adapter files and no config.json; classifier: adapter not merged)."""
    if (model_dir / "adapter_config.json").is_file() and not (model_dir / "config.json").is_file():
        return True
    meta = model_dir / "taoke.json"
    adapter = json.loads(meta.read_text(encoding="utf-8")).get("adapter") if meta.is_file() else None
    return bool(adapter) and adapter.get("merged") is False


def seal_run(path: str | Path, key: bytes) -> dict:
    """Encrypt the run's weight files; returns {"run", "files": [names]}."""
    run = Run.open(path)
    if run.sealed:
        raise ModelError(f"{run.path}: already sealed")
    run.check_model_files()      # never seal weights that differ from what the run recorded
    recorded = run.lineage.get("model_files") or {}
    names = weight_files(run.model_dir)
    if not names:
        raise ModelError(f"{run.model_dir}: no weight files to seal")
    if _adapter_only(run.model_dir):
        raise ModelError(f"{run.path}: the run saved only its adapter (adapt.merge: false); taoke opens sealed "
                         "runs that hold the whole model. Derive it with adapt.merge: true to seal it.")
    missing = [n for n in names if n not in recorded]
    if missing:
        raise ModelError(f"{run.path}: {missing[0]} is not recorded in lineage.json; only recorded runs can be sealed")
    sealed = {}
    for name in names:
        src = run.model_dir / name
        dst = run.model_dir / (name + SUFFIX)
        encrypt_file(src, dst, name, key, recorded[name]["sha256"])
        sealed[name] = {"file": name + SUFFIX, "bytes": dst.stat().st_size,
                        "sha256": hashlib.sha256(dst.read_bytes()).hexdigest()}
    run.record_sealed({"cipher": "AES-256-GCM", "files": sealed})
    for name in names:
        (run.model_dir / name).unlink()
    return {"run": str(run.path), "files": names}


def unseal_run(path: str | Path, key: bytes) -> dict:
    """Write the plain weight files back (each checked against its recorded sha256) and drop the sealed ones."""
    run = Run.open(path)
    if not run.sealed:
        raise ModelError(f"{run.path}: not sealed")
    plain = open_sealed(run, key)        # all files decrypt and verify before anything is written
    for name, data in plain.items():
        with atomic_path(run.model_dir / name) as tmp:
            Path(tmp).write_bytes(data)
    files = run.sealed["files"]
    run.record_sealed(None)
    for entry in files.values():
        (run.model_dir / entry["file"]).unlink()
    run.check_model_files()
    return {"run": str(run.path), "files": sorted(plain)}
