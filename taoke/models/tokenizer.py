"""Tokenizers as taoke uses them: one place that gives a tokenizer a pad token when it ships none."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer


def with_pad(tokenizer):
    """Causal LMs often ship without a pad token; use EOS (padding is always masked out or ignored)."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(model_dir: str | Path):
    return with_pad(AutoTokenizer.from_pretrained(model_dir))
