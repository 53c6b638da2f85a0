"""Greedy generation for chat prompts, and held-out generations scored against reference answers."""

from __future__ import annotations

import torch

from taoke.evaluate.text_metrics import TEXT_METRICS


def prompt_messages(prompt) -> list[dict]:
    """A chat prompt as messages: a string is one user turn."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


@torch.no_grad()
def generate(model, tokenizer, prompts: list, max_new_tokens: int = 64, batch_size: int = 8) -> list[str]:
    """Greedy completions for chat prompts (strings or message lists), batched with left padding."""
    device = next(model.parameters()).device
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outs = []
    try:
        for i in range(0, len(prompts), batch_size):
            texts = [tokenizer.apply_chat_template(prompt_messages(p), tokenize=False, add_generation_prompt=True)
                     for p in prompts[i:i + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            outs += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return [o.strip() for o in outs]


def generate_eval(model, tokenizer, prompts: list, references: list[str], metric: str = "rouge_l",
                  max_new_tokens: int = 64, samples: int = 5) -> dict:
    """Greedy generations scored against references; returns {metric, score, n, samples, predictions}."""
    preds = generate(model, tokenizer, prompts, max_new_tokens)
    scores = [TEXT_METRICS[metric](p, r) for p, r in zip(preds, references)]
    show = [{"prompt": prompt_messages(q)[-1]["content"], "reference": r, "prediction": p, "score": s}
            for q, r, p, s in zip(prompts, references, preds, scores)]
    return {"metric": metric, "score": sum(scores) / max(len(scores), 1), "n": len(scores),
            "samples": show[:samples], "predictions": preds}
