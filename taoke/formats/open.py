"""`open_weights(ref)`: a streaming reader for any model reference (library name, HF dir, run dir, weight file),
and `check_model_dir`, which vets an HF directory before transformers builds a model from it."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, PretrainedConfig

from taoke.errors import FormatError, ModelError
from taoke.files import read_json_object
from taoke.formats.base import WeightReader
from taoke.formats.gguf_io import GGUFWeightReader
from taoke.formats.hf_dir import check_config_sizes, index_shards, read_tokens, weight_bytes
from taoke.formats.safetensors_io import SafetensorsReader, read_header
from taoke.formats.torch_io import TorchReader
from taoke.library import BaseRef, resolve


def _reader_for_file(path: Path) -> WeightReader:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return SafetensorsReader([path])
    if suffix == ".gguf":
        return GGUFWeightReader(path)
    if suffix == ".onnx":
        from taoke.formats.onnx_io import OnnxReader   # onnx loads in ~0.5 s: only for ONNX files

        return OnnxReader(path)
    if suffix in (".bin", ".pt", ".pth"):
        return TorchReader([path])
    raise ModelError(f"{path}: unsupported weight file type '{suffix}'")


def _reader_for_dir(d: Path) -> WeightReader:
    if (d / "adapter_config.json").exists() and not (d / "config.json").exists():
        # A PEFT adapter's low-rank matrices alone would look "independent" of everything: refuse instead.
        base = read_json_object(d / "adapter_config.json", "adapter_config.json").get("base_model_name_or_path")
        raise ModelError(f"{d} holds only a LoRA/DoRA adapter (for base {str(base)[:200]!r}); its weights alone "
                         "cannot show derivation. Verify the merged model: derive with adapt.merge: true, or merge "
                         "the adapter into its base first.")
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


def check_model_dir(model_dir: str | Path) -> dict:
    """Validate an HF directory before any library allocates a model from it: config.json a JSON object whose
    sizes the weight files can hold, shard index entries inside the directory, every safetensors header sound.
    Returns the config ({} without config.json)."""
    model_dir = Path(model_dir)
    cfg_file = model_dir / "config.json"
    config = read_json_object(cfg_file, "config.json") if cfg_file.exists() else {}
    shards = index_shards(model_dir)
    for f in shards if shards is not None else sorted(model_dir.glob("*.safetensors")):
        read_header(f)
    stored = weight_bytes(model_dir)
    if config and stored:
        check_config_sizes(config, stored, cfg_file)
    return config


def hf_config(model_dir: str | Path) -> PretrainedConfig:
    """transformers' config of a vetted HF directory (check_model_dir first); its parse errors name the file."""
    check_model_dir(model_dir)
    try:
        return AutoConfig.from_pretrained(model_dir)
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
        raise FormatError(f"{Path(model_dir) / 'config.json'}: transformers cannot read this config "
                          f"({e.__class__.__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})") from None


def open_weights(ref) -> WeightReader:
    """Open a model reference (str, Path or BaseRef) for tensor-by-tensor reading."""
    base = ref if isinstance(ref, BaseRef) else resolve(str(ref))
    if base.path is None:
        raise ModelError(f"'{base.name}' is a from-scratch architecture: it has no weights to read")
    p = Path(base.path)
    try:
        reader = _reader_for_dir(p) if p.is_dir() else _reader_for_file(p)
    except OSError as e:  # symlink loops, permissions, files vanishing: name the file instead of a traceback
        raise FormatError(f"{e.filename or p}: cannot be read ({e.strerror or e})") from None
    model_dir = p if p.is_dir() else p.parent
    cfg_file = model_dir / "config.json"
    if cfg_file.exists() and reader.format != "gguf":
        reader.config = read_json_object(cfg_file, "config.json")
    if reader.tokens is None:
        reader.tokens = read_tokens(model_dir)
    reader.ref = base
    return reader
