"""Talk to a causal LM: a streaming multi-turn terminal chat with its chat template (/reset, /exit)."""

from __future__ import annotations

import sys

import torch
from transformers import TextStreamer

HELP = "Type a message. /reset clears the conversation, /exit quits."


@torch.no_grad()
def chat_loop(model, tokenizer, system: str | None = None, max_new_tokens: int = 256, temperature: float = 0.0,
              input_fn=input, out=None) -> list[dict]:
    """Read lines, stream the model's answers token by token (transformers TextStreamer); returns the history."""
    out = out or sys.stdout
    model.eval()
    device = next(model.parameters()).device
    base = [{"role": "system", "content": system}] if system else []
    messages = list(base)
    print(HELP, file=out, flush=True)
    while True:
        try:
            line = input_fn(">>> ")
        except (EOFError, KeyboardInterrupt):
            print(file=out, flush=True)
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            messages = list(base)
            print("(conversation cleared)", file=out, flush=True)
            continue
        messages.append({"role": "user", "content": text})
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(device)
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        sample = dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False)
        gen = model.generate(**ids, max_new_tokens=max_new_tokens, streamer=streamer,
                             pad_token_id=tokenizer.pad_token_id, **sample)
        answer = tokenizer.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        messages.append({"role": "assistant", "content": answer})
    return messages
