"""Derive LM training files from ../chatterbot/dialogs.jsonl (BSD-3-Clause chatterbot corpus), deterministically.

    python data/chatterbot-lm/build.py

alpaca.json       one {instruction, input, output, category} per two-turn conversation
dpo_pairs.jsonl   {prompt, chosen, rejected, category}: chosen = the corpus answer to the prompt,
                  rejected = the answer of a conversation drawn (seed 0) from a different category
text/<category>.txt  continued-pretraining documents: one file per category, each "Q/A" exchange a paragraph
"""

import json
import random
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
rows = [json.loads(line) for line in (HERE.parent / "chatterbot" / "dialogs.jsonl").open(encoding="utf-8")]
pairs = [(r["category"], r["messages"][0]["content"], r["messages"][1]["content"]) for r in rows
         if len(r["messages"]) == 2]

alpaca = [{"instruction": q, "input": "", "output": a, "category": c} for c, q, a in pairs]
(HERE / "alpaca.json").write_text(json.dumps(alpaca, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")

rng = random.Random(0)
with (HERE / "dpo_pairs.jsonl").open("w", encoding="utf-8") as f:
    for c, q, a in pairs:
        others = [o for o in pairs if o[0] != c]
        rejected = rng.choice(others)[2]
        f.write(json.dumps({"prompt": q, "chosen": a, "rejected": rejected, "category": c}, ensure_ascii=False) + "\n")

docs = defaultdict(list)
for r in rows:
    docs[r["category"]].append("\n".join(f"{'Q' if m['role'] == 'user' else 'A'}: {m['content']}" for m in r["messages"]))
(HERE / "text").mkdir(exist_ok=True)
for c, paras in docs.items():
    (HERE / "text" / f"{c.replace(' ', '-')}.txt").write_text("\n\n".join(paras) + "\n", encoding="utf-8")
