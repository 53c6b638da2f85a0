"""Sealed weight files: a file encrypted at rest with AES-256-GCM (cryptography), and the keys that open it.

A sealed file is

    MAGIC | header length (4 bytes, big-endian) | header JSON | ciphertext | GCM tag (16 bytes)

The header names the file (its path under model/), its plaintext size and sha256, and the file's own random
96-bit nonce; everything before the ciphertext is the associated data, so a file renamed, swapped with
another, or changed by one byte - and any wrong key - fails authentication and is refused (ModelError,
exit 2). The key is 32 random bytes from a key file or the TAOKE_SEAL_KEY environment variable (hex or
base64); it is never written into the recipe, the lineage record or the sealed files.

Sealing and unsealing runs: ship/seal.py; opening a sealed run in memory: inference/sealed.py.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import secrets
import struct
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from taoke.errors import ModelError
from taoke.files import atomic_path

KEY_ENV = "TAOKE_SEAL_KEY"
SUFFIX = ".sealed"
MAGIC = b"TAOKE-SEALED\x00\x01"
CHUNK = 16 << 20


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


# ---------------------------------------------------------------------------------------------- files

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
        prefix = f.read(4)
        if len(prefix) != 4:
            raise refused
        (length,) = struct.unpack(">I", prefix)
        if length > 1 << 16:
            raise refused
        raw = f.read(length)
        try:
            head = json.loads(raw)
            nonce = bytes.fromhex(head["nonce"])
            size = int(head["bytes"])
            want = str(head["sha256"])
        except (ValueError, KeyError, TypeError):
            raise refused from None
        if head.get("name") != name:
            raise ModelError(f"{path}: holds '{head.get('name')}', not '{name}'; sealed files were renamed or swapped")
        body = f.read()
    if len(body) != size + 16 or len(nonce) != 12:
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
    if hashlib.sha256(plain).hexdigest() != want:
        raise refused
    return plain
