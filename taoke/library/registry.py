"""User registry of named bases: a YAML file under $TAOKE_HOME (default ~/.taoke/models.yaml)."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from taoke.errors import ModelError
from taoke.utils import write_text_atomic


def registry_path() -> Path:
    home = Path(os.environ.get("TAOKE_HOME", Path.home() / ".taoke"))
    return home / "models.yaml"


def load_registry() -> dict[str, dict]:
    path = registry_path()
    if not path.exists():
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ModelError(f"{path}: not valid YAML ({e}). Fix or delete the file.") from e
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a mapping of name -> entry. Fix or delete the file.")
    return data


def add_model(name: str, path: str, license: str | None = None, description: str = "") -> dict:
    from taoke.library.builtin import BUILTIN, SCRATCH
    from taoke.library.resolve import resolve

    if name in BUILTIN or name in SCRATCH:
        raise ModelError(f"'{name}' is a built-in model name; choose another name.")
    target = Path(path).expanduser().resolve()
    if not target.exists():
        raise ModelError(f"{path}: no such file or directory.")
    base = resolve(str(target))  # validates that it is a loadable reference
    entry = {"path": str(target), "format": base.format, "license": license or base.license,
             "description": description}
    reg = load_registry()
    reg[name] = entry
    write_text_atomic(registry_path(), yaml.safe_dump(reg, sort_keys=True))
    return entry
