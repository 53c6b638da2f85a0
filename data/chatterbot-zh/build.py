"""Rebuild the files in this folder from the chatterbot-corpus wheel (BSD-3-Clause), simplified Chinese part.

    pip download --no-deps chatterbot-corpus==1.3.3 -d /tmp/cc && python data/chatterbot-zh/build.py /tmp/cc/*.whl

dialogs.jsonl   one row per conversation (every category) in the `messages` chat format
cjk_tokens.txt  the most frequent CJK characters of the dialogs, one per line, most frequent first: new
                tokens for `edits: expand_vocab` (an English-centred tokenizer spends 2-3 byte tokens on each)
"""

import json
import sys
import zipfile
from collections import Counter
from pathlib import Path

import yaml

TOKENS = 300

out = Path(__file__).parent
dialogs = []
with zipfile.ZipFile(sys.argv[1]) as whl:
    files = sorted(n for n in whl.namelist() if n.startswith("chatterbot_corpus/data/chinese/") and n.endswith(".yml"))
    for name in files:
        data = yaml.safe_load(whl.read(name))
        label = Path(name).stem
        for conv in data.get("conversations") or []:
            if not isinstance(conv, list) or len(conv) < 2:
                continue
            turns = [str(t).strip() for t in conv]
            msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
            if msgs[-1]["role"] == "user":
                msgs = msgs[:-1]
            dialogs.append({"category": label, "messages": msgs})

counts = Counter(ch for d in dialogs for m in d["messages"] for ch in m["content"] if "\u4e00" <= ch <= "\u9fff")
with open(out / "dialogs.jsonl", "w", encoding="utf-8") as f:
    for d in dialogs:
        f.write(json.dumps(d, ensure_ascii=False) + "\n")
ranked = sorted(counts, key=lambda c: (-counts[c], c))[:TOKENS]
(out / "cjk_tokens.txt").write_text("\n".join(ranked) + "\n", encoding="utf-8")
print(len(dialogs), "dialogs,", len(counts), "distinct CJK characters,", len(ranked), "tokens written")
