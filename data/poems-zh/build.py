"""Rebuild poems.jsonl from the chinese-poetry npm package (MIT): instruction -> poem pairs for SFT.

    npm pack chinese-poetry@2.0.1 --pack-destination /tmp && python data/poems-zh/build.py /tmp/chinese-poetry-2.0.1.tgz

Every poem of 唐诗三百首 (mengxue/tangshisanbaishou.json, traditional characters) and the first ci of 宋词
(songci/ci.song.0.json, simplified) whose text is 20-100 characters long, each as a one-line request naming
the form, title and author, answered by the poem with one line per couplet. Examples are 110-300 tokens (median ~190) in
SmolLM2's tokenizer: the long-example shape of bench/sft_vs_hf.py, besides the short chatterbot turns.
"""

import json
import sys
import tarfile
from pathlib import Path

SONG_CI = 160          # ci taken from ci.song.0.json, in file order
MIN_CHARS, MAX_CHARS = 20, 100

out = Path(__file__).parent
with tarfile.open(sys.argv[1]) as tgz:
    tang = json.load(tgz.extractfile("package/dist/mengxue/tangshisanbaishou.json"))
    song = json.load(tgz.extractfile("package/dist/songci/ci.song.0.json"))

rows = []
for group in tang["content"]:
    for p in group["content"]:
        text = "\n".join(p["paragraphs"])
        if MIN_CHARS <= len(text.replace("\n", "")) <= MAX_CHARS:
            ask = f"请写一首{group['type']}，题为《{p['subchapter'] or p['chapter']}》，仿{p['author']}。"
            rows.append({"source": "tangshisanbaishou", "messages": [{"role": "user", "content": ask},
                                                                    {"role": "assistant", "content": text}]})
taken = 0
for p in song:
    text = "\n".join(p["paragraphs"])
    if taken < SONG_CI and MIN_CHARS <= len(text.replace("\n", "")) <= MAX_CHARS:
        ask = f"请按词牌《{p['rhythmic']}》填一首词，仿{p['author']}。"
        rows.append({"source": "songci", "messages": [{"role": "user", "content": ask},
                                                     {"role": "assistant", "content": text}]})
        taken += 1

with open(out / "poems.jsonl", "w", encoding="utf-8") as f:
    for r in rows:
        f.write(json.dumps(r, ensure_ascii=False) + "\n")
print(len(rows), "examples written")
