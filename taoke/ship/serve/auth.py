"""API keys: read from a file, held only as sha256 digests, checked in constant time, rate-limited per key.

The keys file has one key per line (blank lines and `#` comments are skipped):

    alice  sk-3f9c...            # key id, then the key
    batch  sha256:9a1e...  600   # or the key's sha256 (the file then holds no secret), and requests/minute
    sk-77ab...                   # a bare key: its id is the first 8 hex digits of its sha256

Keys are random tokens (`python -c "import secrets; print('sk-' + secrets.token_urlsafe(32))"`), so a plain
sha256 is the right digest (password hashes like scrypt exist to slow guessing of low-entropy secrets).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from taoke.errors import DataError

HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass
class ApiKey:
    id: str
    digest: bytes                  # sha256 of the key
    per_minute: float | None       # requests per minute; None = the server default


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def read_keys(path: str | Path) -> list[ApiKey]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path}: API keys file not found")
    keys, seen = [], set()
    for n, raw in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) > 3:
            raise DataError(f"{path}:{n}: expected 'KEY', 'ID KEY' or 'ID KEY REQUESTS_PER_MINUTE'")
        secret = parts[0] if len(parts) == 1 else parts[1]
        if secret.startswith("sha256:"):
            hexd = secret[len("sha256:"):].lower()
            if not HEX64.fullmatch(hexd):
                raise DataError(f"{path}:{n}: 'sha256:' must be followed by 64 hex digits")
            d = bytes.fromhex(hexd)
        else:
            if len(secret) < 16:
                raise DataError(f"{path}:{n}: key is {len(secret)} characters; use at least 16 random characters")
            d = digest(secret)
        key_id = parts[0] if len(parts) > 1 else d.hex()[:8]
        rate = None
        if len(parts) == 3:
            try:
                rate = float(parts[2])
            except ValueError:
                raise DataError(f"{path}:{n}: requests per minute must be a number, got '{parts[2]}'") from None
            if rate <= 0:
                raise DataError(f"{path}:{n}: requests per minute must be positive")
        if key_id in seen:
            raise DataError(f"{path}:{n}: key id '{key_id}' appears twice")
        seen.add(key_id)
        keys.append(ApiKey(key_id, d, rate))
    if not keys:
        raise DataError(f"{path}: no keys in the file")
    return keys


class KeyRing:
    """Identifies the key of a request; every stored digest is compared (no early exit) in constant time."""

    def __init__(self, keys: list[ApiKey], per_minute: float | None = None):
        self.keys = keys
        self.buckets = {k.id: TokenBucket(k.per_minute or per_minute) for k in keys if (k.per_minute or per_minute)}

    def identify(self, presented: str | None) -> ApiKey | None:
        if not presented:
            return None
        d = digest(presented)
        found = None
        for key in self.keys:
            if hmac.compare_digest(key.digest, d):
                found = key
        return found

    def admit(self, key: ApiKey) -> float:
        """0 if the key may make a request now, else the seconds until it may."""
        bucket = self.buckets.get(key.id)
        return bucket.take() if bucket else 0.0


class TokenBucket:
    """Rate limit: `per_minute` requests a minute, bursts up to the same number."""

    def __init__(self, per_minute: float):
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, per_minute)
        self.tokens = self.capacity
        self.stamp = time.monotonic()
        self.lock = threading.Lock()

    def take(self) -> float:
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= 1:
                self.tokens -= 1
                return 0.0
            return (1 - self.tokens) / self.rate


def bearer(header: str | None) -> str | None:
    """The key of an `Authorization: Bearer KEY` header."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def retry_seconds(wait: float) -> int:
    return max(1, math.ceil(wait))
