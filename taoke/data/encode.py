"""Turn raw rows into model inputs, from the input spec saved in model/taoke.json.

Training, `taoke eval` and `taoke predict` all go through `encode_frame`, so a shipped model sees
its inputs exactly as it saw them in training.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from taoke.data import image as image_ops
from taoke.data.tabular import apply_tabular
from taoke.data.text import normalize_text, tokenize
from taoke.errors import DataError
from taoke.recipe import NormalizeText
from taoke.train.batches import Encoded


def targets_of(frame: pd.DataFrame, spec: dict) -> torch.Tensor:
    column = spec["label_column"]
    if column not in frame.columns:
        return torch.zeros(len(frame), dtype=torch.float32 if spec["labels"] is None else torch.long)
    if spec["labels"] is None:  # regression: trained on standardised targets, see to_target_units
        values = torch.tensor(pd.to_numeric(frame[column]).to_numpy(dtype=np.float32))
        scale = spec.get("target_scale") or {"mean": 0.0, "std": 1.0}
        return (values - scale["mean"]) / scale["std"]
    index = {name: i for i, name in enumerate(spec["labels"])}
    values = frame[column].astype(str)
    unknown = sorted(set(values) - set(index))
    if unknown:
        raise DataError(f"label(s) {', '.join(map(repr, unknown[:5]))} in column '{column}' are unknown to the "
                        f"model, which knows: {', '.join(spec['labels'])}.")
    return torch.tensor([index[v] for v in values], dtype=torch.long)


def to_target_units(values: torch.Tensor, spec: dict) -> torch.Tensor:
    """Regression outputs/targets back in the label's own units (identity for classification)."""
    scale = spec.get("target_scale")
    if spec.get("labels") is not None or not scale:
        return values
    return values * scale["std"] + scale["mean"]


def text_column(frame: pd.DataFrame, inputs: dict) -> list[str]:
    texts = frame[inputs["column"]].fillna("").astype(str)
    if inputs.get("normalize"):
        texts = normalize_text(texts, NormalizeText(**inputs["normalize"]))
    return texts.tolist()


def encode_frame(frame: pd.DataFrame, spec: dict, tokenizer=None) -> Encoded:
    """`spec` is the `inputs`/`labels` part of taoke.json."""
    inputs = spec["inputs"]
    kind = inputs["kind"]
    if kind != "tabular" and inputs["column"] not in frame.columns:
        raise DataError(f"column '{inputs['column']}' not found; columns are: {', '.join(map(str, frame.columns))}.")
    targets = targets_of(frame, spec)
    if kind == "text":
        ids = tokenize(tokenizer, text_column(frame, inputs), inputs["max_length"])
        return Encoded("text", targets, ids=ids, pad_id=tokenizer.pad_token_id or 0)
    if kind == "image":
        images = image_ops.load_images(frame[inputs["column"]].tolist(), inputs.get("size"), inputs.get("channels"))
        images = image_ops.normalize(images, inputs["mean"], inputs["std"])
        return Encoded("image", targets, dense=images)
    x = apply_tabular(frame, inputs["params"])
    return Encoded("tabular", targets, dense=torch.from_numpy(x))
