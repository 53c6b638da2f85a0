"""User registry of named bases: a YAML file under $TAOKE_HOME (default ~/.taoke/models.yaml)."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from taoke.errors import ModelError
from taoke.files import write_text_atomic


def registry_path() -> Path:
    home = Path(os.environ.get("TAOKE_HOME", Path.home() / ".taoke"))
    return home / "models.yaml"


def load_registry() -> dict[str, dict]:
    path = registry_path()
    if not path.exists():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ModelError(f"{path}: not valid YAML ({e}). Fix or delete the file.") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) and isinstance(v.get("path"), str)
                                             for v in data.values()):
        raise ModelError(f"{path}: expected a mapping of name -> {{path: ..., ...}}. Fix or delete the file.")
    return data


def save_entry(name: str, entry: dict) -> None:
    reg = load_registry()
    reg[name] = entry
    write_text_atomic(registry_path(), yaml.safe_dump(reg, sort_keys=True))
