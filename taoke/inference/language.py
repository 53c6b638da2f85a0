"""Language models in use: completions for prompts, held-out loss on new data, a terminal chat."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from taoke.errors import DataError, ModelError
from taoke.library import resolve
from taoke.lm.chat import chat_loop
from taoke.lm.data import encode_conversations, encode_documents, read_conversations, read_prompts, read_text_documents
from taoke.lm.generate import generate
from taoke.lm.load import load_causal_lm
from taoke.lm.train import evaluate_lm
from taoke.run import Run
from taoke.inference.sealed import sealed_state


@dataclass
class LanguagePredictor:
    model: torch.nn.Module
    tokenizer: object
    meta: dict                   # model/taoke.json: task, seq_len, adapter
    model_dir: Path
    run: Run | None = None

    @classmethod
    def load(cls, model_dir: Path, run: Run | None = None, device: str | None = None,
             state: dict | None = None) -> "LanguagePredictor":
        meta = json.loads((model_dir / "taoke.json").read_text(encoding="utf-8"))
        model, tok = load_causal_lm(model_dir, device=device, state=state)
        return cls(model, tok, meta, model_dir, run)

    def predict(self, prompts: list, max_new_tokens: int = 128) -> list[dict]:
        """Greedy completions of chat prompts (strings, or message lists)."""
        if not prompts:
            raise DataError("give prompts, or --file prompts.jsonl")
        completions = generate(self.model, self.tokenizer, prompts, max_new_tokens=max_new_tokens)
        shown = [p if isinstance(p, str) else p[-1]["content"] for p in prompts]
        return [{"prompt": p, "completion": c} for p, c in zip(shown, completions)]

    def read_inputs(self, file: str | Path) -> list[list[dict]]:
        """Prompts from a JSONL file: {"prompt"}, {"messages"}, {"instruction", "input"} or bare strings."""
        return read_prompts(file)

    def evaluate(self, data: str | Path | None = None, split: str | None = None) -> dict:
        """Held-out loss and perplexity on a text file (.txt, or {"text"} JSONL) or chat/alpaca records."""
        if split is not None:
            raise DataError("language-model runs record no row splits; give --data FILE")
        if not data:
            raise DataError("give --data FILE (a .txt/.jsonl text file, or chat/alpaca records)")
        seq = self.meta.get("seq_len", 512)
        if self.meta["task"] == "causal-lm" or Path(data).suffix == ".txt":
            rows = encode_documents(self.tokenizer, read_text_documents(data), seq)
        else:
            rows = encode_conversations(self.tokenizer, read_conversations(data), seq)
        m = evaluate_lm(self.model, rows, self.tokenizer.pad_token_id, seq)
        return {"model": str(self.run.path if self.run else self.model_dir), "data": str(data), "rows": len(rows),
                "metrics": m}

    def chat(self, system: str | None = None, max_new_tokens: int = 256, temperature: float = 0.0) -> list[dict]:
        if not self.tokenizer.chat_template:
            raise ModelError(f"{self.model_dir}: the tokenizer has no chat template, so it cannot chat")
        return chat_loop(self.model, self.tokenizer, system=system, max_new_tokens=max_new_tokens,
                         temperature=temperature)


def load_chat_model(ref: str, device: str | None = None, key: bytes | None = None):
    """(model, tokenizer) of any causal-LM reference: library name, HF directory, GGUF file or run (a sealed
    run with its key, or $TAOKE_SEAL_KEY)."""
    base = resolve(ref)
    state = None
    if base.is_run:
        run = Run(base.run_dir)
        run.check_model_files()
        state = sealed_state(run, key)
    if base.kind not in ("causal-lm", "task-model", "unknown"):
        raise ModelError(f"{ref}: a {base.kind} model cannot chat; give a causal language model")
    model, tok = load_causal_lm(base, device=device, state=state)
    if not tok.chat_template:
        raise ModelError(f"{ref}: the tokenizer has no chat template, so it cannot chat")
    return model, tok
