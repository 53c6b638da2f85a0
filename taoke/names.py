"""User-given names (recipe/run names, registered model names): one rule, so each becomes a safe file name."""

from __future__ import annotations

MAX_CHARS = 100
MAX_BYTES = 200   # a run directory is <name>-<time>[-n]; file systems allow 255 bytes per path component
RULE = f"1-{MAX_CHARS} letters, digits, '.', '_' or '-' (at most {MAX_BYTES} bytes as UTF-8), not starting with '.' or '-'"


def name_problem(name: object) -> str | None:
    """Why `name` is not a valid name, or None when it is."""
    if not isinstance(name, str) or not name:
        return f"a name must be {RULE}"
    shown = repr(name[:40] + ("..." if len(name) > 40 else ""))
    if len(name) > MAX_CHARS or len(name.encode("utf-8")) > MAX_BYTES:
        return f"name {shown} is too long ({len(name)} characters, {len(name.encode('utf-8'))} bytes); use {RULE}"
    bad = next((c for c in name if not (c.isalnum() or c in "._-")), None)
    if bad is not None or name[0] in ".-":
        what = f"character {bad!r}" if bad is not None else f"leading {name[0]!r}"
        return f"name {shown} has a {what}; use {RULE}"
    return None
