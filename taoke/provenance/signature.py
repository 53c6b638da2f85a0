"""Signed records: a run (or export) signed with an EC key pair through OpenSSF's `model-signing`.

    sign_run(run, private_key)         -> <run>/model.sig, a Sigstore bundle whose manifest holds the sha256 of
                                          every file of the run: model/ (weights, taoke.json, the card),
                                          lineage.json, recipe.yaml, report.md, metrics, plots
    verify_run_signature(run, public)  -> the signature checks and every file still hashes as signed, or a
                                          ModelError naming what changed (exit 2)

Keys are PEM files as openssl makes them (`openssl ecparam -name prime256v1 -genkey -noout -out key.pem`,
`openssl ec -in key.pem -pubout -out pub.pem`); nothing goes over the network. The run's live state is left
out of the manifest: status.json and the lock (they change when the run is merely opened or listed), resume
checkpoints, and the signature itself. A run is signed as it stands: sealing or unsealing it afterwards
changes its weight files, so sign again after either.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from model_signing import hashing, signing, verifying

from taoke.errors import ModelError
from taoke.run import LOCK, SIGNATURE, STATUS, Run

_LIVE_STATE = (STATUS, LOCK, "checkpoints", SIGNATURE)
_STAGING_PREFIX = ".signing-"


def _hashing_config(run_dir: Path, *extra: str) -> hashing.Config:
    stale = [p.name for p in run_dir.glob(_STAGING_PREFIX + "*")]   # left by a signing that was killed
    return hashing.Config().set_ignored_paths(paths=[*_LIVE_STATE, *stale, *extra], ignore_git_paths=False)


def _key(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"{path}: {what} key file not found")
    head = p.read_bytes()[:64]
    if b"-----BEGIN" not in head:
        raise ModelError(f"{path}: not a PEM key file; make an EC P-256 pair with openssl (see `taoke sign --help`)")
    return p


def signature_state(path: str | Path) -> str:
    """'signed' when the run holds a signature file, else 'unsigned' (whether it verifies needs the public key)."""
    return "signed" if (Path(path) / SIGNATURE).is_file() else "unsigned"


def sign_run(path: str | Path, private_key: str | Path) -> dict:
    """Sign a complete run with an EC private key; returns {"run", "signature", "files"}."""
    run = Run.open(path)
    if not run.complete:
        raise ModelError(f"{run.path}: run is not complete (state: {run.state}); only a finished record can be signed")
    run.check_model_files()   # never sign weights that differ from what the run recorded
    key = _key(private_key, "private")
    # the bundle is written in a staging folder the manifest leaves out, then renamed into place
    staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=run.path))
    try:
        config = signing.Config().use_elliptic_key_signer(private_key=key)
        config.set_hashing_config(_hashing_config(run.path, staging.name))
        try:
            config.sign(run.path, staging / SIGNATURE)
        except ValueError as e:   # a key model-signing cannot use (not EC, encrypted without a password)
            raise ModelError(f"{private_key}: cannot sign with this key ({str(e)[:160]})") from None
        os.replace(staging / SIGNATURE, run.path / SIGNATURE)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"run": str(run.path), "signature": str(run.path / SIGNATURE), "files": len(_signed_files(run.path))}


def verify_run_signature(path: str | Path, public_key: str | Path) -> dict:
    """Check the run's signature with the public key; ModelError when it fails or any signed file changed."""
    run_dir = Path(path)
    sig = run_dir / SIGNATURE
    if not sig.is_file():
        raise ModelError(f"{run_dir}: not signed (no {SIGNATURE}); sign it with `taoke sign {run_dir} --key KEY.pem`")
    key = _key(public_key, "public")
    config = verifying.Config().use_elliptic_key_verifier(public_key=key)
    config.set_hashing_config(_hashing_config(run_dir))
    try:
        config.verify(run_dir, sig)
    except ValueError as e:   # model-signing's word for a bad signature and for a manifest mismatch alike
        raise ModelError(f"{sig}: verification failed: {_mismatch(str(e))}") from None
    except Exception as e:  # noqa: BLE001 - a malformed bundle surfaces as json/protobuf/crypto errors
        raise ModelError(f"{sig}: not a readable signature ({e.__class__.__name__}: {str(e)[:200]})") from None
    return {"run": str(run_dir), "signature": str(sig), "verified": True, "files": len(_signed_files(run_dir))}


def _mismatch(message: str) -> str:
    """model-signing's mismatch report in a line: which files changed, appeared or went missing."""
    changed = re.findall(r"Hash mismatch for \\?'(.+?)\\?'", message)   # quotes escaped inside a list's repr
    extra = re.findall(r"Extra files found in model '[^']*': ([^\]\"]+)", message)
    missing = re.findall(r"Missing files in model '[^']*': ([^\]\"]+)", message)
    parts = [f"changed since signing: {', '.join(changed)}"] if changed else []
    parts += [f"not signed (added later): {extra[0]}"] if extra else []
    parts += [f"missing: {missing[0]}"] if missing else []
    return "; ".join(parts) or message[:300]


def _signed_files(run_dir: Path) -> list[Path]:
    live = {run_dir / p for p in _LIVE_STATE}
    return [p for p in run_dir.rglob("*") if p.is_file() and not any(p == q or q in p.parents for q in live)
            and not p.relative_to(run_dir).as_posix().startswith(_STAGING_PREFIX)]
