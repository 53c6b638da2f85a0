"""LM data: read raw text, alpaca, messages/sharegpt and DPO-pair files; tokenize into training rows.

A row is a dict {"input_ids": [...], "labels": [...]} with labels -100 wherever no loss is taken
(prompts, system and user turns in chat data). Malformed input raises DataError naming file and line.
"""

from __future__ import annotations

import json
from pathlib import Path

from taoke.errors import DataError

IGNORE = -100

# Named chat templates for tokenizers that ship none (or to override one). Jinja, as transformers expects.
NAMED_TEMPLATES = {
    "chatml": ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
               "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    "plain": ("{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
              "{% elif m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\n' }}"
              "{% else %}{{ 'Assistant: ' + m['content'] + eos_token + '\n' }}{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"),
}


# ---------------------------------------------------------------------------------------------- readers

def jsonl_records(path: Path):
    """(line number, object) per non-blank line of a JSONL file."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None


def _records(path: str | Path):
    """(location, object) for a JSON array file or a JSONL file."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON array of records")
        for i, obj in enumerate(data):
            yield f"{path}: record {i}", obj
    else:
        for n, obj in jsonl_records(path):
            yield f"{path}:{n}", obj


def read_text_documents(paths, separator: str | None = None) -> list[str]:
    """Documents for continued pretraining: each .txt file is a document (or split on `separator`);
    each line of a .jsonl file with a `text` field is a document."""
    docs = []
    for p in [paths] if isinstance(paths, (str, Path)) else paths:
        p = Path(p)
        if p.suffix.lower() in (".jsonl", ".json"):
            for where, obj in _records(p):
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise DataError(f"{where}: expected an object with a string 'text' field")
                docs.append(obj["text"])
            continue
        if not p.exists():
            raise DataError(f"{p}: no such file")
        text = p.read_text(encoding="utf-8", errors="replace")
        parts = text.split(separator) if separator else [text]
        docs.extend(d.strip() for d in parts if d.strip())
    if not docs:
        raise DataError(f"{paths}: no documents found")
    return docs


def _check_messages(msgs, where: str) -> list[dict]:
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in (
                "system", "user", "assistant"):
            raise DataError(f"{where}: message {i} needs role in system/user/assistant and a string content")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: the conversation has no assistant turn to learn from")
    return out


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "model": "assistant"}


def read_conversations(path: str | Path) -> list[list[dict]]:
    """Conversations from messages JSONL ({"messages": [{role, content}]}), sharegpt JSONL
    ({"conversations": [{from, value}]}) or alpaca JSON/JSONL ({instruction, input, output})."""
    convs = []
    for where, obj in _records(path):
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object")
        if "messages" in obj:
            convs.append(_check_messages(obj["messages"], where))
        elif "conversations" in obj:
            turns = obj["conversations"]
            if not isinstance(turns, list):
                raise DataError(f"{where}: 'conversations' must be a list")
            msgs = []
            for i, t in enumerate(turns):
                role = _SHAREGPT_ROLES.get(t.get("from")) if isinstance(t, dict) else None
                if role is None:
                    raise DataError(f"{where}: turn {i} needs 'from' in {sorted(_SHAREGPT_ROLES)}")
                msgs.append({"role": role, "content": t.get("value")})
            convs.append(_check_messages(msgs, where))
        elif "instruction" in obj:
            convs.append(alpaca_to_messages(obj, where))
        else:
            raise DataError(f"{where}: unknown record; expected 'messages', 'conversations' or "
                            "'instruction'/'output' (alpaca)")
    if not convs:
        raise DataError(f"{path}: no records")
    return convs


def alpaca_to_messages(obj: dict, where: str = "record") -> list[dict]:
    instr, inp, out = obj.get("instruction"), obj.get("input", ""), obj.get("output")
    if not isinstance(instr, str) or not isinstance(out, str) or not isinstance(inp or "", str):
        raise DataError(f"{where}: alpaca records need string 'instruction' and 'output' (and optional 'input')")
    user = instr if not inp else f"{instr}\n\n{inp}"
    msgs = [{"role": "system", "content": obj["system"]}] if isinstance(obj.get("system"), str) else []
    return msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": out}]


def read_dpo_pairs(path: str | Path) -> list[dict]:
    """DPO pairs: {"prompt": str | messages, "chosen": str, "rejected": str} per record."""
    pairs = []
    for where, obj in _records(path):
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object")
        prompt = obj.get("prompt")
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, list):
            prompt = [{"role": m.get("role"), "content": m.get("content")} for m in prompt if isinstance(m, dict)]
        else:
            raise DataError(f"{where}: 'prompt' must be a string or a list of messages")
        if not all(isinstance(obj.get(k), str) and obj[k] for k in ("chosen", "rejected")):
            raise DataError(f"{where}: 'chosen' and 'rejected' must be non-empty strings")
        pairs.append({"prompt": prompt, "chosen": obj["chosen"], "rejected": obj["rejected"]})
    if not pairs:
        raise DataError(f"{path}: no pairs")
    return pairs


def read_prompts(path: str | Path) -> list[list[dict]]:
    """Prompts JSONL: {"prompt": str}, {"messages": [...]}, {"instruction", "input"} or a bare JSON string per line."""
    prompts = []
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    for n, obj in jsonl_records(path):
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


# ---------------------------------------------------------------------------------------------- tokenizing

def set_chat_template(tokenizer, template: str | None) -> None:
    """Use a named template (or a Jinja string); keep the tokenizer's own when None."""
    if template:
        tokenizer.chat_template = NAMED_TEMPLATES.get(template, template)
    if not tokenizer.chat_template:
        raise DataError("the tokenizer has no chat template; name one (e.g. chat_template: chatml)")


def _render(tokenizer, messages, add_generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def encode_chat(tokenizer, messages: list[dict], max_len: int | None = None) -> dict:
    """Tokenize a conversation with the chat template; labels are -100 except on assistant turns.

    Each assistant turn's character span is found by rendering the conversation up to it (with the
    generation prompt) and up to its end; the template must render prefixes as string prefixes (all
    common templates do). Tokens whose text overlaps a span are trained on, the end-of-turn token included.
    """
    full = _render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], add_generation_prompt=True)) if i else 0
        end_text = _render(tokenizer, messages[:i + 1])
        if not full.startswith(end_text) or start > len(end_text):
            raise DataError("the chat template does not render conversation prefixes as prefixes; "
                            "choose another template (chat_template: chatml)")
        spans.append((start, len(end_text)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, labels = enc["input_ids"], []
    for tok_id, (a, b) in zip(ids, enc["offset_mapping"]):
        # overlap, not containment: BPE may glue the template's trailing space onto the answer's first word
        labels.append(tok_id if any(a < e and max(b, a + 1) > s for s, e in spans) else IGNORE)
    if max_len:
        ids, labels = ids[:max_len], labels[:max_len]
    return {"input_ids": ids, "labels": labels}


def encode_documents(tokenizer, docs: list[str], max_len: int) -> list[dict]:
    """Continued pretraining rows: each document + EOS, long ones cut into max_len pieces (never joined)."""
    eos = tokenizer.eos_token_id
    rows = []
    for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids = ids + [eos]
        if tokenizer.bos_token_id is not None and tokenizer.bos_token_id != eos and \
                getattr(tokenizer, "add_bos_token", False):
            ids = [tokenizer.bos_token_id] + ids
        for i in range(0, len(ids), max_len):
            piece = ids[i:i + max_len]
            if len(piece) > 1:
                rows.append({"input_ids": piece, "labels": list(piece)})
    return rows


def encode_conversations(tokenizer, convs: list[list[dict]], max_len: int) -> list[dict]:
    rows = [encode_chat(tokenizer, c, max_len) for c in convs]
    return [r for r in rows if any(t != IGNORE for t in r["labels"][1:])]  # a row with no target teaches nothing


def encode_dpo(tokenizer, pair: dict, max_len: int) -> dict:
    """Token ids for prompt+chosen and prompt+rejected with labels on the response only."""
    out = {}
    for key in ("chosen", "rejected"):
        row = encode_chat(tokenizer, pair["prompt"] + [{"role": "assistant", "content": pair[key]}], max_len)
        out[key] = row
    return out
