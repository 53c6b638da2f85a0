"""Text preprocessing: normalisation, and tokenisation to id lists (done once)."""

from __future__ import annotations

import re
import unicodedata

import pandas as pd

from taoke.recipe import NormalizeText


def normalize_text(texts: pd.Series, cfg: NormalizeText) -> pd.Series:
    def one(t: str) -> str:
        t = str(t)
        if cfg.unicode != "none":
            t = unicodedata.normalize(cfg.unicode, t)
        if cfg.lowercase:
            t = t.lower()
        if cfg.collapse_whitespace:
            t = re.sub(r"\s+", " ", t)
        return t.strip() if cfg.strip else t
    return texts.map(one)


def train_word_tokenizer(texts: list[str], vocab_size: int):
    """A word-level tokenizer for from-scratch text models, trained with HF `tokenizers`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers   # here: transformers costs
    from transformers import PreTrainedTokenizerFast                                  # seconds, data checks none

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]"], min_frequency=1)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def tokenize(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, add_special_tokens=True)
    return enc["input_ids"]
