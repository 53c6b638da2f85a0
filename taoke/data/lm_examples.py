"""Data stage of a language-model derive run: read the recipe's raw examples and split them train / held-out.

Like data/prepare.py for classifiers, this runs before torch, transformers and the base model load, so a bad
data file is refused in a second, not after the model stack has loaded.
"""

from __future__ import annotations

import random
from pathlib import Path

from taoke.errors import DataError
from taoke.lm.data import read_conversations, read_dpo_pairs, read_text_documents
from taoke.recipe import Recipe


def split_items(items: list, test: float, seed: int) -> tuple[list, list]:
    """Seeded train / held-out split of raw examples."""
    idx = list(range(len(items)))
    random.Random(seed).shuffle(idx)
    n_held = max(1, int(round(len(items) * test)))
    if len(items) - n_held < 1:
        raise DataError(f"{len(items)} examples are too few to hold out {test:.0%} for evaluation.")
    held = set(idx[:n_held])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def read_examples(recipe: Recipe) -> tuple[list, list, dict[str, list[Path]]]:
    """Raw examples of the task from data.train (and data.test), split into train / held-out; and the files."""
    d = recipe.data
    path = Path(d.train)
    if not path.exists():
        raise DataError(f"{d.train}: data file not found. Check data.train in the recipe.")
    if recipe.task == "causal-lm":
        files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
        if not files:
            raise DataError(f"{d.train}: folder has no .txt files for continued pretraining.")
        reader = lambda p: read_text_documents(p, recipe.lm.separator)  # noqa: E731
    elif recipe.task == "sft":
        files, reader = [path], read_conversations
    else:
        files, reader = [path], read_dpo_pairs
    items = [x for f in files for x in reader(f)]
    if d.max_rows and len(items) > d.max_rows:
        items = random.Random(d.split.seed).sample(items, d.max_rows)
    if d.test:
        return items, reader(d.test), {"train": files, "test": [Path(d.test)]}
    train, held = split_items(items, d.split.test or 0.1, d.split.seed)
    return train, held, {"train": files}
