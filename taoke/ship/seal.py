"""Sealed weights: a run's weight files encrypted at rest, decrypted in memory only when the run is used.

`seal_run` encrypts every weight file under model/ with AES-256-GCM (cryptography) into `<file>.sealed` and
removes the plaintext; `open_sealed` decrypts them into memory for `taoke serve/predict/eval/chat`, so no
plaintext weight file is ever written; `unseal_run` writes the plain files back. The key is 32 random bytes
from a key file or the TAOKE_SEAL_KEY environment variable (hex or base64); it is never written into the
recipe, the lineage record or the sealed files.

A sealed file is

    MAGIC | header length (4 bytes, big-endian) | header JSON | ciphertext | GCM tag (16 bytes)

The header names the file (its path under model/), its plaintext size and sha256, and the file's own random
96-bit nonce; everything before the ciphertext is the associated data, so a file renamed, swapped with
another, or changed by one byte - and any wrong key - fails authentication and is refused (ModelError,
exit 2). lineage.json records the sealed state (`sealed`: each file's sealed name, size and sha256) through
Run.record_sealed; the plaintext hashes recorded when the run completed stay as they were and verify again
after `unseal`.

Deleting the plaintext when sealing does not scrub the disk blocks it occupied: seal on a machine you trust,
or on an encrypted volume, and copy the sealed run from there.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import os
import secrets
import struct
from pathlib import Path

import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from safetensors.torch import load as load_safetensors

from taoke.errors import ModelError
from taoke.files import atomic_path
from taoke.run import Run

KEY_ENV = "TAOKE_SEAL_KEY"
SUFFIX = ".sealed"
MAGIC = b"TAOKE-SEALED\x00\x01"
CHUNK = 16 << 20
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".onnx", ".onnx_data", ".onnx.data")


# ---------------------------------------------------------------------------------------------- keys

def parse_key(data: bytes, source: str) -> bytes:
    """32 raw bytes, or 64 hex digits, or base64 of 32 bytes (surrounding whitespace ignored)."""
    if len(data) == 32:          # a raw key (no text form of a 32-byte key is 32 characters long)
        return data
    text = data.strip().decode("ascii", errors="replace")
    try:
        if len(text) == 64:
            return bytes.fromhex(text)
        key = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_" if ("-" in text or "_" in text) else None,
                               validate=True)
        if len(key) == 32:
            return key
    except (ValueError, binascii.Error):
        pass
    raise ModelError(f"{source}: not an AES-256 key; expected 64 hex digits or base64 of 32 bytes "
                     "(make one with `taoke seal RUN --key-file K --new-key`)")


def resolve_key(key_file: str | Path | None = None) -> bytes | None:
    """The key from --key-file, else from $TAOKE_SEAL_KEY, else None."""
    if key_file is not None:
        p = Path(key_file)
        if not p.is_file():
            raise ModelError(f"{key_file}: key file not found")
        return parse_key(p.read_bytes(), str(key_file))
    env = os.environ.get(KEY_ENV)
    return parse_key(env.encode(), f"${KEY_ENV}") if env else None


def new_key(path: str | Path) -> bytes:
    """Write a fresh random key (hex) to a new file readable by its owner only."""
    p = Path(path)
    key = secrets.token_bytes(32)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ModelError(f"{path}: exists; --new-key never overwrites a key (drop --new-key to use it)") from None
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
    return key


def require_key(key: bytes | None, run: Run) -> bytes:
    if key is None:
        raise ModelError(f"{run.path}: the run is sealed; give its key with --key-file K or ${KEY_ENV}")
    return key


# ---------------------------------------------------------------------------------------------- files

def weight_files(model_dir: Path) -> list[str]:
    """Paths under model/ (posix, relative) of the weight files to seal."""
    return sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*")
                  if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def _header(name: str, size: int, sha256: str, nonce: bytes) -> bytes:
    head = json.dumps({"format": "taoke-sealed", "version": 1, "cipher": "AES-256-GCM", "name": name,
                       "bytes": size, "sha256": sha256, "nonce": nonce.hex()}, sort_keys=True).encode()
    return MAGIC + struct.pack(">I", len(head)) + head


def encrypt_file(src: Path, dst: Path, name: str, key: bytes, sha256: str) -> None:
    """Encrypt `src` into `dst` (temp file, then rename); `sha256` must be the plaintext's, checked as it streams."""
    nonce = secrets.token_bytes(12)
    aad = _header(name, src.stat().st_size, sha256, nonce)
    enc = Cipher(algorithms.AES(key), modes.GCM(nonce)).encryptor()
    enc.authenticate_additional_data(aad)
    digest = hashlib.sha256()
    with atomic_path(dst) as tmp, open(src, "rb") as fin, open(tmp, "wb") as fout:
        fout.write(aad)
        while block := fin.read(CHUNK):
            digest.update(block)
            fout.write(enc.update(block))
        fout.write(enc.finalize())
        fout.write(enc.tag)
        if digest.hexdigest() != sha256:
            raise ModelError(f"{src}: changed while it was being sealed; nothing was sealed, run seal again")


def decrypt_file(path: Path, name: str, key: bytes) -> bytes:
    """The plaintext of a sealed file, in memory; ModelError for a wrong key or any changed byte."""
    refused = ModelError(f"{path}: cannot be decrypted with this key: the key is wrong or the file was changed "
                         "after sealing")
    with open(path, "rb") as f:
        magic = f.read(len(MAGIC))
        if magic != MAGIC:
            raise ModelError(f"{path}: not a taoke sealed file (bad magic bytes); it was changed or replaced")
        (length,) = struct.unpack(">I", f.read(4))
        if length > 1 << 16:
            raise refused
        raw = f.read(length)
        try:
            head = json.loads(raw)
            nonce = bytes.fromhex(head["nonce"])
            size = int(head["bytes"])
        except (ValueError, KeyError, TypeError):
            raise refused from None
        if head.get("name") != name:
            raise ModelError(f"{path}: holds '{head.get('name')}', not '{name}'; sealed files were renamed or swapped")
        body = f.read()
    if len(body) != size + 16:
        raise refused
    dec = Cipher(algorithms.AES(key), modes.GCM(nonce, body[size:])).decryptor()
    dec.authenticate_additional_data(MAGIC + struct.pack(">I", length) + raw)
    view = memoryview(body)
    parts = [dec.update(view[i:min(i + CHUNK, size)]) for i in range(0, size, CHUNK)]
    try:
        parts.append(dec.finalize())
    except InvalidTag:
        raise refused from None
    plain = b"".join(parts)
    if hashlib.sha256(plain).hexdigest() != head["sha256"]:
        raise refused
    return plain


# ---------------------------------------------------------------------------------------------- runs

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
