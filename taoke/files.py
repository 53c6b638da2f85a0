"""File helpers shared by every stage: content hashes and atomic writes (temp file or directory, then rename)."""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from taoke.errors import FormatError


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cache_root() -> Path:
    """Where taoke keeps what it can recompute (dequantized GGUF models, file hashes): $TAOKE_CACHE or ~/.cache/taoke."""
    return Path(os.environ.get("TAOKE_CACHE", Path.home() / ".cache" / "taoke")).expanduser()


def cached_sha256(path: str | Path) -> str:
    """sha256 of a file, remembered by (path, size, mtime): re-hashing a model on every load costs seconds."""
    path = Path(path).resolve()
    st = path.stat()
    key = hashlib.sha256(str(path).encode()).hexdigest()[:32]
    entry = cache_root() / "file-hashes" / f"{key}.json"
    stamp = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    try:
        cached = json.loads(entry.read_text())
        if {k: cached.get(k) for k in stamp} == stamp and isinstance(cached.get("sha256"), str):
            return cached["sha256"]
    except (OSError, ValueError):
        pass
    digest = sha256_file(path)
    try:
        write_json_atomic(entry, {**stamp, "sha256": digest})
    except OSError:  # a read-only cache only costs speed
        pass
    return digest


def contained_path(directory: Path, entry: object, source: Path, what: str) -> Path:
    """`directory / entry` for a relative path read from `source`; refused unless it stays inside `directory`.

    The check is on the path as written (no '..' out, not absolute), not on where symlinks lead: the HF cache
    stores every file of a snapshot as a symlink into a shared blobs folder."""
    if not isinstance(entry, str) or not entry or "\x00" in entry:
        raise FormatError(f"{source}: {what} {str(entry)[:80]!r} is not a file name")
    norm = posixpath.normpath(entry.replace("\\", "/"))
    if norm.startswith(("/", "../")) or norm == ".." or (len(norm) > 1 and norm[1] == ":"):
        raise FormatError(f"{source}: {what} {entry[:120]!r} points outside {directory}; taoke reads only files "
                          "inside the model's own directory")
    return Path(directory) / norm


def read_json_object(path: Path, what: str = "JSON file") -> dict:
    """A JSON object from a file, or a FormatError naming the file (bad bytes, bad JSON, not an object)."""
    try:
        obj = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise FormatError(f"{path}: not a valid {what} ({str(e)[:120]})") from None
    except OSError as e:
        raise FormatError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: a {what} must be a JSON object, not {type(obj).__name__}")
    return obj


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def current_umask() -> int:
    """The process umask, read without changing it where the OS tells it (os.umask can only set it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore at once
    os.umask(mask)
    return mask


def _give_user_mode(path: str | Path, directory: bool = False) -> None:
    """mkstemp/mkdtemp create 0600/0700 (private temp files); a file we rename into place gets the mode any
    file the user creates gets: 0666 (0777 for directories) less the umask."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temp path next to `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        _give_user_mode(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(path: str | Path):
    """Yield an empty temp directory next to `path`; rename it to `path` only if the block succeeds, so a
    failure never leaves a directory that looks complete. `path` must not exist (or be an empty directory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        _give_user_mode(tmp, directory=True)
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        os.rename(tmp, path)  # fails (rather than merging) if something appeared at `path` meanwhile
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_jsonl_atomic(path: str | Path, rows: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
