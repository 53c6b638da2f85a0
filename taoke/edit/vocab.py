"""Vocabulary expansion: add tokens to the tokenizer and rows to the embedding matrix.

New rows start at the mean of all embeddings, or at the average of the embeddings of the pieces the
original tokenizer split the new token into (usually a better start)."""

from __future__ import annotations

from pathlib import Path

import torch

from taoke.errors import RecipeError


def read_tokens(tokens: list[str] | None, file: str | None) -> list[str]:
    out = list(tokens or [])
    if file:
        p = Path(file)
        if not p.exists():
            raise RecipeError(f"edits.expand_vocab.file: {file} not found")
        out += [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not out:
        raise RecipeError("edits.expand_vocab: give tokens: [...] or file: path (one token per line)")
    return out


@torch.no_grad()
def expand_vocab(hf_model, tokenizer, tokens: list[str], init: str) -> dict:
    if tokenizer is None or not hasattr(hf_model, "resize_token_embeddings"):
        raise RecipeError("edits.expand_vocab needs a transformers model with a tokenizer")
    pieces = {t: tokenizer(t, add_special_tokens=False)["input_ids"] for t in tokens}
    old = len(tokenizer)
    added = tokenizer.add_tokens(tokens)
    if added == 0:
        return {"added": 0, "vocab_before": old, "vocab_after": old}
    emb = hf_model.get_input_embeddings()
    hf_model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    emb = hf_model.get_input_embeddings().weight
    mean = emb[:old].mean(0)
    for t in tokens:
        idx = tokenizer.convert_tokens_to_ids(t)
        if idx < old:
            continue  # already in the vocabulary
        ids = [i for i in pieces[t] if i < old]
        emb[idx] = emb[ids].mean(0) if init == "subtoken" and ids else mean
    out_emb = hf_model.get_output_embeddings() if hasattr(hf_model, "get_output_embeddings") else None
    if out_emb is not None and out_emb.weight.data_ptr() != emb.data_ptr():
        w = out_emb.weight
        for t in tokens:
            idx = tokenizer.convert_tokens_to_ids(t)
            ids = [i for i in pieces[t] if i < old]
            if idx >= old:
                w[idx] = w[ids].mean(0) if init == "subtoken" and ids else w[:old].mean(0)
    return {"added": added, "vocab_before": old, "vocab_after": len(tokenizer), "init": init}
