"""Rebuild the files in this folder from the chatterbot-corpus wheel (BSD-3-Clause).

    pip download --no-deps chatterbot-corpus==1.3.3 -d /tmp/cc && python data/chatterbot/build.py /tmp/cc/*.whl

topics.csv   one row per distinct opening line (text) with its corpus category (label), for the
             categories with at least 20 distinct opening lines
dialogs.jsonl one row per conversation in the `messages` chat format (user/assistant turns alternate)
"""

import csv
import json
import random
import sys
import zipfile
from pathlib import Path

import yaml

# Categories with enough conversations to learn from; tech support is down-sampled so it does not dominate.
CATEGORIES = ["ai", "coding", "emotion", "literature", "money", "psychology", "science", "sports", "trivia",
              "tech_support", "humor", "movies", "food", "greetings", "gossip", "politics"]
CAP = 200

out = Path(__file__).parent
rows, dialogs = [], []
rng = random.Random(0)
with zipfile.ZipFile(sys.argv[1]) as whl:
    for cat in CATEGORIES:
        data = yaml.safe_load(whl.read(f"chatterbot_corpus/data/english/{cat}.yml"))
        convs = [c for c in data["conversations"] if isinstance(c, list) and len(c) >= 2]
        if len(convs) > CAP:
            convs = rng.sample(convs, CAP)
        label = cat.replace("_", " ")
        for conv in convs:
            turns = [str(t).strip() for t in conv]
            rows.append({"text": turns[0], "label": label})
            msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
            if msgs[-1]["role"] == "user":
                msgs = msgs[:-1]
            dialogs.append({"category": label, "messages": msgs})

seen, topics = set(), []
for r in rows:  # the corpus repeats a question with several answers: keep each question once
    if r["text"].lower() not in seen:
        seen.add(r["text"].lower())
        topics.append(r)
counts = {}
for r in topics:
    counts[r["label"]] = counts.get(r["label"], 0) + 1
topics = [r for r in topics if counts[r["label"]] >= 20]
rows = topics
with open(out / "topics.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=["text", "label"])
    w.writeheader()
    w.writerows(rows)
with open(out / "dialogs.jsonl", "w") as f:
    for d in dialogs:
        f.write(json.dumps(d, ensure_ascii=False) + "\n")
print(len(rows), "topic rows,", len(dialogs), "dialogs")
