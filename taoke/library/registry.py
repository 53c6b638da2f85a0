"""User registry of named bases: a YAML file under $TAOKE_HOME (default ~/.taoke/models.yaml)."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from taoke.errors import ModelError
from taoke.files import write_text_atomic
from taoke.names import name_problem


def registry_path() -> Path:
    home = Path(os.environ.get("TAOKE_HOME", Path.home() / ".taoke"))
    return home / "models.yaml"


def load_registry() -> dict[str, dict]:
    """name -> {path, format, license, description}. Names obey the name rule (so a name is never a path) and
    paths are absolute, as `taoke models add` writes them: a hand-edited entry that breaks either is refused."""
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
    for name, entry in data.items():
        problem = name_problem(name)
        if problem:
            raise ModelError(f"{path}: entry {str(name)[:60]!r}: {problem}. Rename or remove the entry.")
        if not Path(entry["path"]).expanduser().is_absolute():
            raise ModelError(f"{path}: entry '{name}' has the relative path {entry['path'][:100]!r}, which would mean "
                             "a different model in every working directory. Give an absolute path.")
    return data


def save_entry(name: str, entry: dict) -> None:
    reg = load_registry()
    reg[name] = entry
    write_text_atomic(registry_path(), yaml.safe_dump(reg, sort_keys=True))
