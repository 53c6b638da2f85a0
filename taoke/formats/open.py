"""`open_weights(ref)`: a streaming reader for any model reference (library name, HF dir, run dir, weight file)."""

from __future__ import annotations

import json
from pathlib import Path

from taoke.errors import ModelError
from taoke.formats.base import WeightReader
from taoke.formats.gguf_io import GGUFWeightReader
from taoke.formats.onnx_io import OnnxReader
from taoke.formats.safetensors_io import SafetensorsReader
from taoke.formats.torch_io import TorchReader
from taoke.library import BaseRef, resolve


def _read_tokens(model_dir: Path) -> list[str] | None:
    """Vocabulary (id -> token) from tokenizer.json or vocab.txt, for aligning shared tokens."""
    tj = model_dir / "tokenizer.json"
    if tj.exists():
        try:
            vocab = json.loads(tj.read_text()).get("model", {}).get("vocab")
            added = json.loads(tj.read_text()).get("added_tokens", [])
        except (json.JSONDecodeError, OSError):
            vocab, added = None, []
        if isinstance(vocab, dict):
            ids = {int(i): t for t, i in vocab.items()}
            ids.update({int(a["id"]): a["content"] for a in added if "id" in a})
            n = max(ids) + 1 if ids else 0
            return [ids.get(i, f"<unk:{i}>") for i in range(n)]
    vt = model_dir / "vocab.txt"
    if vt.exists():
        return vt.read_text(encoding="utf-8", errors="replace").splitlines()
    return None


def _reader_for_file(path: Path) -> WeightReader:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return SafetensorsReader([path])
    if suffix == ".gguf":
        return GGUFWeightReader(path)
    if suffix == ".onnx":
        return OnnxReader(path)
    if suffix in (".bin", ".pt", ".pth"):
        return TorchReader([path])
    raise ModelError(f"{path}: unsupported weight file type '{suffix}'")


def _reader_for_dir(d: Path) -> WeightReader:
    if (d / "adapter_config.json").exists() and not (d / "config.json").exists():
        # A PEFT adapter's low-rank matrices alone would look "independent" of everything: refuse instead.
        base = json.loads((d / "adapter_config.json").read_text()).get("base_model_name_or_path")
        raise ModelError(f"{d} holds only a LoRA/DoRA adapter (for base {base!r}); its weights alone cannot show "
                         "derivation. Verify the merged model: derive with adapt.merge: true, or merge the adapter "
                         "into its base first.")
    if list(d.glob("*.safetensors")):
        return SafetensorsReader.from_dir(d)
    bins = sorted(d.glob("pytorch_model*.bin")) or sorted(d.glob("*.bin")) + sorted(d.glob("*.pt"))
    if bins:
        return TorchReader(bins)
    for pattern in ("*.gguf", "*.onnx"):
        files = sorted(d.glob(pattern))
        if files:
            return _reader_for_file(files[0])
    raise ModelError(f"{d}: no weight files (.safetensors, .bin, .pt, .gguf, .onnx) found")


def open_weights(ref) -> WeightReader:
    """Open a model reference (str, Path or BaseRef) for tensor-by-tensor reading."""
    base = ref if isinstance(ref, BaseRef) else resolve(str(ref))
    if base.path is None:
        raise ModelError(f"'{base.name}' is a from-scratch architecture: it has no weights to read")
    p = Path(base.path)
    reader = _reader_for_dir(p) if p.is_dir() else _reader_for_file(p)
    model_dir = p if p.is_dir() else p.parent
    cfg_file = model_dir / "config.json"
    if cfg_file.exists() and reader.format != "gguf":
        try:
            reader.config = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ModelError(f"{cfg_file}: invalid JSON ({e})") from e
    if reader.tokens is None:
        reader.tokens = _read_tokens(model_dir)
    reader.ref = base
    return reader
