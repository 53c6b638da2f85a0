"""A task model: any classifier/regressor taoke trains, with one interface and one on-disk format.

Every task model is an nn.Module whose `forward(**inputs)` returns logits (or predictions for
regression) and whose head can be read and replaced with `get_head` / `set_head`.

On disk, `model/` holds `taoke.json` (task, architecture, labels, input preprocessing, head edits)
next to the weights. Transformer models are saved with `save_pretrained`, so plain transformers
loads them (`AutoModelForSequenceClassification`) whenever the head is the stock one.
"""

from __future__ import annotations

import difflib
import inspect
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForSequenceClassification
from transformers.utils import logging as hf_logging

from taoke.version import __version__
from taoke.errors import FormatError, ModelError, RecipeError
from taoke.files import atomic_path, write_json_atomic
from taoke.formats import check_model_dir, hf_config
from taoke.formats.safetensors_io import read_header
from taoke.library import resolve
from taoke.models import scratch
from taoke.models.meta import META_FILE, read_meta
from taoke.models.scratch import build_scratch
from taoke.models.tokenizer import load_tokenizer
from taoke.models.widths import resize_bert_attention

HEAD_ATTRS = ("classifier", "score", "head")


class HFClassifier(nn.Module):
    """Wraps a transformers *ForSequenceClassification model so it takes **inputs and returns logits."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf

    def forward(self, **inputs) -> torch.Tensor:
        inputs.pop("labels", None)
        return self.hf(**inputs).logits

    def features(self, **inputs) -> torch.Tensor:
        """The pooled vector the head reads (used for probes and diagnostics)."""
        out = self.hf.base_model(**{k: v for k, v in inputs.items() if k != "labels"})
        return mean_pool(out.last_hidden_state, inputs["attention_mask"])


def mean_pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


def head_owner(model: nn.Module) -> tuple[nn.Module, str]:
    owner = model.hf if isinstance(model, HFClassifier) else model
    for attr in HEAD_ATTRS:
        if isinstance(getattr(owner, attr, None), nn.Module):
            return owner, attr
    raise ModelError(f"{type(owner).__name__} has no recognisable head ({', '.join(HEAD_ATTRS)}).")


def get_head(model: nn.Module) -> nn.Module:
    owner, attr = head_owner(model)
    return getattr(owner, attr)


def set_head(model: nn.Module, head: nn.Module) -> None:
    owner, attr = head_owner(model)
    setattr(owner, attr, head)


def head_io(model: nn.Module) -> tuple[int, int]:
    """(input features, outputs) of the head, whatever stack of layers it has become."""
    head = get_head(model)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ModelError(f"head {type(head).__name__} has no Linear layer; cannot edit it.")
    return linears[0].in_features, linears[-1].out_features


def build_head(in_features: int, outputs: int, hidden: list[int] | None = None, dropout: float = 0.0,
               activation: str = "relu") -> nn.Module:
    if not hidden:
        return nn.Linear(in_features, outputs)
    act = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}[activation]
    layers, d = [], in_features
    for h in hidden:
        layers += [nn.Linear(d, h), act(), nn.Dropout(dropout)]
        d = h
    layers.append(nn.Linear(d, outputs))
    return nn.Sequential(*layers)


def apply_head_spec(model: nn.Module, spec: dict | None) -> None:
    """Rebuild the head from its recorded spec (used when loading an edited model)."""
    if not spec:
        return
    in_f, _ = head_io(model)
    set_head(model, build_head(in_f, spec["outputs"], spec.get("hidden"), spec.get("dropout", 0.0),
                               spec.get("activation", "relu")))


def scratch_kwargs(arch: str, recipe_cfg: dict, derived: dict) -> dict:
    """Merge recipe sizes with data-derived ones, rejecting unknown keys by name."""
    cls = {"cnn": scratch.CNN, "mlp": scratch.MLP, "lstm": scratch.RNNClassifier, "gru": scratch.RNNClassifier,
           "transformer": scratch.TransformerClassifier}[arch]
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "num_outputs", "cell")]
    for key in recipe_cfg:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" Did you mean 'model.{close[0]}'?" if close else ""
            raise RecipeError(f"unknown key 'model.{key}' for scratch:{arch}.{hint} Valid: {', '.join(allowed)}.")
    merged = {**{k: v for k, v in derived.items() if k in allowed}, **recipe_cfg}
    return merged


def load_hf_classifier(path: Path, num_labels: int, labels: list[str] | None, regression: bool,
                       dropout: float | None = None) -> HFClassifier:
    config = hf_config(path)
    config.num_labels = num_labels
    if labels:
        config.id2label = dict(enumerate(labels))
        config.label2id = {name: i for i, name in enumerate(labels)}
    config.problem_type = "regression" if regression else "single_label_classification"
    if dropout is not None:
        for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout", "dropout"):
            if hasattr(config, key):
                setattr(config, key, dropout)
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = getattr(config, "eos_token_id", None) or 0
    # The fresh head is expected to be missing from the base; silence transformers' warning about it.
    hf_level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        hf = AutoModelForSequenceClassification.from_pretrained(path, config=config)
    except (ValueError, KeyError) as e:
        raise ModelError(f"{path}: architecture '{config.model_type}' cannot be loaded for sequence "
                         f"classification ({str(e)[:200]}).") from None
    except (OSError, RuntimeError) as e:  # weights that do not fit the config, unreadable files
        raise ModelError(f"{path}: the weights cannot be loaded ({e.__class__.__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    finally:
        hf_logging.set_verbosity(hf_level)
    return HFClassifier(hf)


def save_task_model(model: nn.Module, out_dir: Path, meta: dict, tokenizer=None) -> None:
    """Write model/ : weights + taoke.json (+ tokenizer). Files are written to temp names, then renamed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"format": "taoke-task-model", "taoke_version": __version__, **meta}
    adapter = meta.get("adapter")
    if isinstance(model, HFClassifier) and adapter:
        # LoRA/DoRA: the adapter always; with merge, also the merged full model (plain transformers loads it).
        if adapter["merged"]:
            model.hf.save_pretrained(out_dir / "adapter")
            model.hf = model.hf.merge_and_unload()
            model.hf.save_pretrained(out_dir, safe_serialization=True)
        else:
            model.hf.save_pretrained(out_dir)
    elif isinstance(model, HFClassifier):
        model.hf.config.taoke = {"task": meta["task"]}
        model.hf.save_pretrained(out_dir, safe_serialization=True)
    else:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        with atomic_path(out_dir / "model.safetensors") as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    write_json_atomic(out_dir / META_FILE, meta)


def _stored_elements(weights: Path) -> int:
    return sum(math.prod(e["shape"]) for e in read_header(weights)[1].values())


def _build_scratch_checked(model_dir: Path, meta: dict) -> nn.Module:
    """A from-scratch architecture as taoke.json describes it, built only after counting its weights on the meta
    device: sizes the weight file cannot hold are refused instead of allocated."""
    arch, cfg = meta["arch"].split(":", 1)[1], meta.get("arch_config")
    try:
        with torch.device("meta"):
            probe = build_scratch(arch, meta["num_outputs_base"], cfg)
            apply_head_spec(probe, meta.get("head"))
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        raise FormatError(f"{model_dir / META_FILE}: arch_config does not build scratch:{arch} ({str(e)[:160]})") \
            from None
    need, stored = sum(t.numel() for t in probe.state_dict().values()), _stored_elements(model_dir / "model.safetensors")
    if need > stored:
        raise FormatError(f"{model_dir / META_FILE}: arch_config describes {need:,} weights; model.safetensors holds "
                          f"{stored:,}")
    model = build_scratch(arch, meta["num_outputs_base"], cfg)
    apply_head_spec(model, meta.get("head"))
    return model


def _load_state(model: nn.Module, state: dict, model_dir: Path, strict: bool) -> tuple[list, list]:
    try:
        return model.load_state_dict(state, strict=strict)
    except RuntimeError as e:  # shapes that differ from the architecture
        raise FormatError(f"{model_dir}: weights do not fit the architecture in {META_FILE} "
                          f"({str(e).splitlines()[0][:200]})") from None


def load_task_model(model_dir: Path, device: torch.device | str = "cpu", state: dict[str, torch.Tensor] | None = None):
    """Load model/ back: returns (model, meta, tokenizer or None). `state` gives the weights from memory instead
    of the folder's weight files (a sealed run, decrypted)."""
    model_dir = Path(model_dir)
    meta = read_meta(model_dir)
    check_model_dir(model_dir)   # config sizes and safetensors headers, before anything is allocated
    if meta["arch"] == "hf" and meta.get("adapter") and not meta["adapter"].get("merged"):
        model = load_adapter_model(model_dir, meta)
    elif meta["arch"] == "hf":
        config = hf_config(model_dir)
        model = HFClassifier(AutoModelForSequenceClassification.from_config(config))
        apply_head_spec(model, meta.get("head"))
        if meta.get("attention_heads"):   # heads pruned: a BERT config cannot state it (edit/prune.py)
            resize_bert_attention(model, meta["attention_heads"])
        if state is None:
            state = {}
            for f in sorted(model_dir.glob("*.safetensors")):
                state.update(load_file(str(f)))
        missing, unexpected = _load_state(model.hf, state, model_dir, strict=False)
        # Tied/buffer entries (e.g. position_ids) may be absent from a checkpoint; real weights may not.
        real_missing = [k for k in missing if not k.endswith("position_ids")]
        if real_missing or unexpected:
            raise ModelError(f"{model_dir}: weights do not match the architecture "
                             f"(missing {real_missing[:3]}, unexpected {unexpected[:3]}).")
    else:
        model = _build_scratch_checked(model_dir, meta)
        _load_state(model, state if state is not None else load_file(str(model_dir / "model.safetensors")),
                    model_dir, strict=True)
    model.to(device).eval()
    return model, meta, saved_tokenizer(model_dir, meta)


def saved_tokenizer(model_dir: Path, meta: dict):
    """The tokenizer saved beside a task model: the base's (transformers models), a word-level one trained from
    scratch (scratch text models), or None (images, tables)."""
    if meta["arch"] == "hf":
        return load_tokenizer(model_dir)
    if (Path(model_dir) / "tokenizer.json").exists():
        return load_tokenizer(model_dir, fast_only=True)
    return None


def load_adapter_model(adapter_dir: Path, meta: dict) -> HFClassifier:
    """The base (as recorded at derive time) with the LoRA/DoRA adapter in `adapter_dir` applied."""
    base = resolve(meta["adapter"]["base"])
    if base.format == "run":
        model, _, _ = load_task_model(base.path)
    else:
        model = load_hf_classifier(base.path, meta["num_outputs_base"], meta["labels"], meta["labels"] is None)
    apply_head_spec(model, meta.get("head"))
    from peft import PeftModel   # peft loads in ~1.4 s: only for adapter runs

    model.hf = PeftModel.from_pretrained(model.hf, str(adapter_dir))
    return model
