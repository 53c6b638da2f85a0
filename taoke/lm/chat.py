"""Talk to a causal LM: a streaming multi-turn terminal chat, and batch completions for a prompts file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from taoke.errors import DataError
from taoke.utils import atomic_path

HELP = "Type a message. /reset clears the conversation, /exit quits."


@torch.no_grad()
def chat_loop(model, tokenizer, system: str | None = None, max_new_tokens: int = 256, temperature: float = 0.0,
              input_fn=input, out=None) -> list[dict]:
    """Read lines, stream the model's answers token by token (transformers TextStreamer); returns the history."""
    from transformers import TextStreamer

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


def read_prompts(path: str | Path) -> list[list[dict]]:
    """Prompts JSONL: {"prompt": str}, {"messages": [...]}, {"instruction", "input"} or a bare JSON string per line."""
    from taoke.lm.data import _jsonl

    prompts = []
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    for n, obj in _jsonl(path):
        if isinstance(obj, str):
            obj = {"prompt": obj}
        if isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
            prompts.append([{"role": "user", "content": obj["prompt"]}])
        elif isinstance(obj, dict) and isinstance(obj.get("messages"), list):
            msgs = [m for m in obj["messages"] if isinstance(m, dict)]
            if msgs and msgs[-1].get("role") == "assistant":
                msgs = msgs[:-1]  # complete the last user turn, not the reference answer
            prompts.append(msgs)
        elif isinstance(obj, dict) and isinstance(obj.get("instruction"), str):
            inp = obj.get("input") or ""
            prompts.append([{"role": "user", "content": obj["instruction"] + (f"\n\n{inp}" if inp else "")}])
        else:
            raise DataError(f"{path}:{n}: expected 'prompt', 'messages' or 'instruction'")
    return prompts


def predict_file(model, tokenizer, prompts_jsonl: str | Path, out_jsonl: str | Path, max_new_tokens: int = 128,
                 batch_size: int = 8) -> int:
    """Greedy completions for every prompt, written atomically as {"prompt", "completion"} JSONL; returns the count."""
    from taoke.lm.train import generate

    prompts = read_prompts(prompts_jsonl)
    completions = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    with atomic_path(out_jsonl) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for p, c in zip(prompts, completions):
                f.write(json.dumps({"prompt": p[-1]["content"], "completion": c}, ensure_ascii=False) + "\n")
    return len(completions)
