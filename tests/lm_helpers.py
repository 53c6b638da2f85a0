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
