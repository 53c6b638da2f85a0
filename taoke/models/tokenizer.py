"""Tokenizers as taoke uses them: one place that gives a tokenizer a pad token when it ships none, and that
turns a tokenizer file the libraries cannot parse into an error naming it."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from taoke.errors import FormatError


def with_pad(tokenizer):
    """Causal LMs often ship without a pad token; use EOS (padding is always masked out or ignored)."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(model_dir: str | Path, fast_only: bool = False):
    """The tokenizer saved in `model_dir` (fast_only: the tokenizer.json of a from-scratch word tokenizer)."""
    try:
        tok = PreTrainedTokenizerFast.from_pretrained(model_dir) if fast_only else \
            AutoTokenizer.from_pretrained(model_dir)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - tokenizers (Rust) and transformers report bad files with many types
        raise FormatError(f"{model_dir}: the tokenizer files cannot be loaded ({e.__class__.__name__}: "
                          f"{(str(e).splitlines() or [''])[0][:160]})") from None
    return with_pad(tok)
