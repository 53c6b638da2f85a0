"""Shared fixtures for the LM tests: the smollm2 tokenizer (cached plain copy) and a tiny random LLaMA."""

import torch


def smollm_tokenizer():
    from transformers import AutoTokenizer

    from taoke.lm.load import plain_model_dir

    return AutoTokenizer.from_pretrained(plain_model_dir("smollm2-135m"))


def tiny_llama(vocab: int = 49152, seed: int = 0, tie: bool = True):
    """A 2-layer LLaMA with smollm2's vocabulary: same code paths as the real model, milliseconds per step."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                      max_position_embeddings=1024, pad_token_id=2, eos_token_id=2, bos_token_id=1)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # random init with std 0.02 gives near-uniform logits; sharpen them so tests see differences
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.2)
    return model.eval()


def configs(**kw):
    """(TrainConfig, LMConfig, AdaptConfig) from flat keyword options, as a recipe's train/lm/adapt blocks hold them."""
    from taoke.recipe import AdaptConfig, LMConfig, TrainConfig

    parts = {}
    for cls in (TrainConfig, LMConfig, AdaptConfig):
        parts[cls] = cls(**{k: kw.pop(k) for k in list(kw) if k in cls.model_fields and k not in
                            {c for other in parts for c in other.model_fields}})
    if kw:
        raise TypeError(f"unknown options {sorted(kw)}")
    return parts[TrainConfig], parts[LMConfig], parts[AdaptConfig]


def adapted(model, trainable_tokens=None, **adapt_kw):
    """The model adapted as adapt/language.py does it; returns (model, record)."""
    from taoke.adapt.language import adapt_lm
    from taoke.recipe import AdaptConfig

    return adapt_lm(model, AdaptConfig(**adapt_kw), trainable_tokens=trainable_tokens)


def train(model, tok, rows, eval_rows=None, trainable_tokens=None, **kw):
    """Adapt, then train with train_lm (the workflow's two steps); the history carries the adaptation record."""
    from taoke.adapt.language import adapt_lm
    from taoke.lm.train import train_lm

    train_cfg, lm_cfg, adapt_cfg = configs(**kw)
    model, record = adapt_lm(model, adapt_cfg, trainable_tokens=trainable_tokens)
    hist = train_lm(model, tok, rows, train_cfg, lm_cfg, eval_rows=eval_rows, progress=False)
    hist.adaptation = record
    return hist
