"""An Ollama Modelfile beside an exported GGUF: FROM the file, the chat template in Ollama's Go-template syntax,
the model's default system prompt, its stop tokens and a context length.

Ollama cannot run a Jinja chat template, so the two template families taoke's LLaMA-family runs use are
translated by hand (ChatML, as SmolLM/Qwen write it, and Llama 3's header tokens); any other template is left to
Ollama's own detection from the GGUF metadata, and the Modelfile says so.
"""

from __future__ import annotations

import re

CHATML = ('{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
          '<|im_start|>assistant\n')
LLAMA3 = ('{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>'
          '{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n')
STOP_CANDIDATES = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>")


def template_family(chat_template: str | None) -> str | None:
    if not chat_template:
        return None
    if "<|im_start|>" in chat_template:
        return "chatml"
    if "<|start_header_id|>" in chat_template:
        return "llama3"
    return None


def default_system_prompt(tokenizer) -> str | None:
    """The system prompt the Jinja template inserts when a conversation brings none (SmolLM2's does)."""
    if not tokenizer.chat_template:
        return None
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    m = re.match(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", text, re.S) or \
        re.search(r"<\|start_header_id\|>system<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>", text, re.S)
    return m.group(1) if m else None


def modelfile(gguf_name: str, tokenizer, context_length: int) -> str:
    family = template_family(tokenizer.chat_template)
    vocab = tokenizer.get_vocab()
    stops = [t for t in STOP_CANDIDATES if t in vocab]
    if tokenizer.eos_token and tokenizer.eos_token not in stops:
        stops.insert(0, tokenizer.eos_token)
    lines = ["# Ollama: ollama create NAME -f Modelfile   (written by taoke export)", f"FROM ./{gguf_name}", ""]
    if family:
        body = CHATML if family == "chatml" else LLAMA3
        lines += [f'TEMPLATE """{body}"""', ""]
    else:
        lines += ["# no TEMPLATE: this chat template has no hand-made Go translation here; Ollama reads the GGUF's",
                  "# tokenizer.chat_template metadata instead.", ""]
    system = default_system_prompt(tokenizer)
    if system:
        lines += [f'SYSTEM """{system}"""', ""]
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines += [f"PARAMETER num_ctx {context_length}", ""]
    return "\n".join(lines)
