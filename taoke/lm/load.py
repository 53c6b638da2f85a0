"""Load a causal LM and its tokenizer from any model reference, as a plain trainable transformers model.

transformers dequantizes a GGUF file but marks the model GGUF-quantized (Trainer refuses to train it,
save_pretrained refuses to save it), so we rebuild a plain model from the config and load the
dequantized weights into it. Dequantizing takes ~17 s; the plain model is cached as an HF directory
(safetensors + config + tokenizer + generation config) under $TAOKE_CACHE (default ~/.cache/taoke),
keyed by the GGUF file's size and mtime, so later loads take a second or two.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from taoke.errors import ModelError
from taoke.files import cache_root
from taoke.formats import hf_config
from taoke.formats.gguf_io import GGUFWeightReader
from taoke.hardware import pick_device
from taoke.library import BaseRef, resolve
from taoke.models.tokenizer import load_tokenizer


def _gguf_cache_dir(gguf: Path) -> Path:
    st = gguf.stat()
    # size + mtime is enough to notice a replaced file; hashing 100 MB on every load is not.
    return cache_root() / "gguf-plain" / f"{gguf.stem}-{st.st_size}-{int(st.st_mtime)}"


def _dequantize_gguf_to_dir(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF causal LM once and write it as a plain HF directory, atomically (rename of a temp dir)."""
    src = dict(pretrained_model_name_or_path=gguf.parent, gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(**src)
    quantized = AutoModelForCausalLM.from_pretrained(**src, dtype=torch.float32)
    config = AutoConfig.from_pretrained(**src)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    # Tied heads have no tensor of their own; anything else missing is a real conversion problem.
    missing = [k for k in missing if not (k.endswith("lm_head.weight") and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelError(f"{gguf}: dequantized weights do not fit the config (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    plain.generation_config = quantized.generation_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if out.exists():  # another process won the race; keep theirs
            return
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _as_base(ref: str | os.PathLike | BaseRef) -> BaseRef:
    return ref if isinstance(ref, BaseRef) else resolve(str(ref))


def plain_model_dir(ref: str | os.PathLike | BaseRef) -> Path:
    """The HF directory to load for a model reference; GGUF files are converted once into the cache."""
    base = _as_base(ref)
    if base.path is None:
        raise ModelError(f"{base.name}: a from-scratch architecture is not a pretrained causal LM")
    model_dir = base.model_dir
    gguf = base.path if base.format == "gguf" or base.path.suffix.lower() == ".gguf" else None
    if gguf is None and not (model_dir / "config.json").exists():
        gguf = next(iter(sorted(model_dir.glob("*.gguf"))), None)   # e.g. the model/ of a GGUF export
    if gguf is not None:
        target = _gguf_cache_dir(gguf)
        if not (target / "config.json").exists():
            GGUFWeightReader(gguf).close()   # a malformed file fails here with its name, not inside transformers
            _dequantize_gguf_to_dir(gguf, target)
        return target
    if not (model_dir / "config.json").exists():
        raise ModelError(f"{base.name}: {model_dir} has no config.json; a causal LM must be an HF directory or a "
                         "GGUF file")
    return model_dir


def adapter_only(model_dir: Path | None) -> bool:
    """A run saved as an adapter only: adapter_config.json and no config.json."""
    return model_dir is not None and (model_dir / "adapter_config.json").is_file() and \
        not (model_dir / "config.json").is_file()


def load_adapter_run(model_dir: Path, device=None, dtype=None):
    """Base (named in taoke.json) + the saved LoRA/DoRA adapter, merged in memory; the run's own tokenizer."""
    meta = model_dir / "taoke.json"
    try:
        base_ref = json.loads(meta.read_text())["adapter"]["base"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelError(f"{meta}: cannot tell which base this adapter belongs to ({err}); the run's "
                         "model/taoke.json must name it under adapter.base") from err
    model, _ = load_causal_lm(base_ref, device=device, dtype=dtype)
    tok = load_tokenizer(model_dir)
    if len(tok) > model.get_input_embeddings().weight.shape[0]:
        # the run added tokens: their rows are in the adapter (trainable tokens); make room for them
        model.resize_token_embeddings(len(tok), mean_resizing=False)
    from peft import PeftModel   # ~1.4 s to import: only for adapter-only runs

    try:
        model = PeftModel.from_pretrained(model, model_dir).merge_and_unload()
    except (RuntimeError, ValueError, KeyError) as err:
        raise ModelError(f"{model_dir}: the adapter does not fit its base {base_ref} ({str(err)[:200]}); "
                         "runs that change the architecture must be saved merged (adapt.merge: true)") from err
    return model.to(pick_device(device)), tok


def model_from_state(model_dir: Path, state: dict[str, torch.Tensor], dtype: torch.dtype | None = None):
    """A causal LM built from its config and given its weights from memory (a sealed run's, decrypted)."""
    config = AutoConfig.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = getattr(config.get_text_config(), "tie_word_embeddings", False)
    missing = [k for k in missing if not (tied and k.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise ModelError(f"{model_dir}: weights do not fit the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if tied:
        model.tie_weights()
    if (model_dir / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    return model


def load_causal_lm(ref: str | os.PathLike | BaseRef, device: str | torch.device | None = None,
                   dtype: torch.dtype | None = None, state: dict[str, torch.Tensor] | None = None):
    """(model, tokenizer) for a library name, HF dir, run dir or GGUF file; the model is plain and trainable.

    A run saved as an adapter only is loaded as its base with the adapter merged in. `state` gives the weights
    from memory instead of the directory's files (a sealed run, decrypted). dtype None means fp32:
    trainable master weights on every device; training autocasts to bf16 where the hardware runs it
    natively. Pass torch.bfloat16 for inference-only use on a GPU.
    """
    base = _as_base(ref)
    if adapter_only(base.model_dir):
        return load_adapter_run(base.model_dir, device, dtype)
    model_dir = plain_model_dir(base)
    config = hf_config(model_dir)
    archs = " ".join(getattr(config, "architectures", None) or [])
    if "CausalLM" not in archs and "LMHead" not in archs:
        raise ModelError(f"{base.name}: '{archs or config.model_type}' is not a causal language model")
    try:
        model = model_from_state(model_dir, state, dtype) if state is not None else \
            AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype or torch.float32)
    except (OSError, RuntimeError, ValueError) as e:  # weights that do not fit the config, unreadable files
        raise ModelError(f"{model_dir}: the weights cannot be loaded ({e.__class__.__name__}: "
                         f"{(str(e).splitlines() or [''])[0][:200]})") from None
    return model.to(pick_device(device)), load_tokenizer(model_dir)
