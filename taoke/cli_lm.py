"""CLI commands for causal language models; taoke/cli.py calls register(app)."""

from __future__ import annotations

import typer

from taoke.errors import ModelError


def _load_chat_model(model_ref: str, device: str | None):
    from taoke.library import resolve
    from taoke.lm.load import load_causal_lm

    base = resolve(model_ref)
    if base.kind not in ("causal-lm", "task-model", "unknown"):
        raise ModelError(f"{model_ref}: a {base.kind} model cannot chat; give a causal language model")
    return load_causal_lm(model_ref, device=device)


def register(app: typer.Typer) -> None:
    @app.command("chat")
    def chat(model: str = typer.Argument(..., help="model reference: library name, HF directory or run directory"),
             system: str = typer.Option(None, "--system", help="system prompt"),
             max_new_tokens: int = typer.Option(256, "--max-new-tokens"),
             temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy"),
             device: str = typer.Option(None, "--device", help="cpu | cuda (default: cuda when available)")):
        """Chat with a causal language model in the terminal (streams tokens; /reset, /exit)."""
        from taoke.lm.chat import chat_loop

        m, tok = _load_chat_model(model, device)
        if not tok.chat_template:
            raise ModelError(f"{model}: the tokenizer has no chat template, so it cannot chat")
        chat_loop(m, tok, system=system, max_new_tokens=max_new_tokens, temperature=temperature)
