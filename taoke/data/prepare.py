"""Data stage of a derive run: load, check, de-duplicate, split, and fit the input spec on train.

Everything here runs before a run directory exists, so bad data never leaves a half-made run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from taoke.data.load import Table, load_source, require_columns
from taoke.data.splits import check_known_labels, check_labels, check_no_empty_class, class_labels, split_frame
from taoke.data.tabular import check_finite, fit_tabular
from taoke.data.text import normalize_text
from taoke.errors import DataError
from taoke.recipe import Recipe

TASK_INPUT = {"text-classification": "text", "image-classification": "image",
              "tabular-classification": "tabular", "tabular-regression": "tabular"}


@dataclass
class DataPlan:
    splits: dict[str, pd.DataFrame]
    labels: list[str] | None              # None for regression
    spec: dict                            # {"inputs": ..., "labels": ..., "label_column": ...}
    files: dict[str, list[dict]] = field(default_factory=dict)   # per source: [{path, sha256}]
    row_index: dict[str, list[int]] = field(default_factory=dict)  # rows of the train table per split

    @property
    def regression(self) -> bool:
        return self.labels is None

    def rows(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.splits.items()}


def _load_checked(spec: str, recipe: Recipe, kind: str, regression: bool) -> Table:
    table = load_source(spec)
    d = recipe.data
    if kind == "text":
        require_columns(table, [d.text], "text")
    elif kind == "image":
        if table.kind == "image-folder" or table.kind == "sklearn":
            table.frame = table.frame.rename(columns={"image": d.image, "label": d.label}) \
                if d.image != "image" or d.label != "label" else table.frame
        require_columns(table, [d.image], "image")
    require_columns(table, [d.label], "label")
    check_labels(table, d.label, regression)
    if kind == "tabular":  # before anything trains: an inf feature or label would only show as a NaN loss
        check_finite(table.frame, list(table.frame.columns), table.line_of)
    if not len(table.frame):
        raise DataError(f"{spec}: no rows.")
    return table


def prepare_data(recipe: Recipe) -> DataPlan:
    kind = TASK_INPUT[recipe.task]
    regression = recipe.task == "tabular-regression"
    d = recipe.data
    train_table = _load_checked(d.train, recipe, kind, regression)
    frame = train_table.frame.reset_index(drop=True)
    frame["__row__"] = range(len(frame))

    normalize_cfg = recipe.preprocess_step("normalize_text")
    dedup_cfg = recipe.preprocess_step("dedup")
    if dedup_cfg is not None:
        if kind != "text":
            raise DataError("preprocess 'dedup' works on text data; remove it for this task.")
        key = normalize_text(frame[d.text].astype(str), normalize_cfg) if normalize_cfg else frame[d.text].astype(str)
        frame = frame.loc[key.drop_duplicates(keep=dedup_cfg.keep).index]
    if d.max_rows and len(frame) > d.max_rows:
        frame = frame.sample(n=d.max_rows, random_state=d.split.seed)

    files = {"train": train_table.files}
    s = d.split
    explicit = {}
    for name in ("validation", "test"):
        spec = getattr(d, name)
        if spec:
            t = _load_checked(spec, recipe, kind, regression)
            explicit[name] = t.frame.reset_index(drop=True)
            files[name] = t.files
    splits = split_frame(frame, d.label, 0.0 if "validation" in explicit else s.validation,
                         0.0 if "test" in explicit else s.test, s.seed, s.stratify and not regression)
    splits.update(explicit)

    labels = None
    if not regression:
        labels = class_labels(splits["train"], d.label, d.train)
        check_no_empty_class(splits, d.label, sorted(train_table.frame[d.label].astype(str).unique()), d.train)
        for name, part in splits.items():
            if name != "train":
                check_known_labels(part, d.label, labels, getattr(d, name) or f"{d.train} ({name} split)")

    spec = {"label_column": d.label, "labels": labels, "inputs": _fit_inputs(recipe, kind, splits["train"])}
    if regression:  # standardised targets train well whatever their units
        y = pd.to_numeric(splits["train"][d.label]).astype(float)
        spec["target_scale"] = {"mean": float(y.mean()), "std": float(y.std()) if y.std() > 0 else 1.0}
    row_index = {k: v["__row__"].astype(int).tolist() for k, v in splits.items() if "__row__" in v}
    splits = {k: v.drop(columns=["__row__"], errors="ignore").reset_index(drop=True) for k, v in splits.items()}
    return DataPlan(splits, labels, spec, files, row_index)


def _fit_inputs(recipe: Recipe, kind: str, train: pd.DataFrame) -> dict:
    d = recipe.data
    if kind == "text":
        norm = recipe.preprocess_step("normalize_text")
        tok = recipe.preprocess_step("tokenize")
        return {"kind": "text", "column": d.text, "normalize": norm.model_dump() if norm else None,
                "max_length": tok.max_length if tok else 128, "vocab_size": tok.vocab_size if tok else 20000}
    if kind == "image":
        resize = recipe.preprocess_step("resize")
        size = resize.size if resize else None
        channels = resize.channels if resize else None
        norm = recipe.preprocess_step("normalize")
        from taoke.data import image as image_ops   # torch decodes images; text and tabular checks do without it

        images = image_ops.load_images(train[d.image].tolist(), size, channels)
        mean, std = image_ops.channel_stats(images)
        if norm is not None and norm.mean is not None:
            mean, std = norm.mean, norm.std or std
        aug = recipe.preprocess_step("augment")
        return {"kind": "image", "column": d.image, "size": size or images.shape[-1],
                "channels": images.shape[1], "mean": mean, "std": std,
                "augment": aug.model_dump() if aug else None}
    features = d.features or [c for c in train.columns if c not in (d.label, "__row__")]
    missing = [c for c in features if c not in train.columns]
    if missing:
        raise DataError(f"{d.train}: feature column '{missing[0]}' (data.features) not found. Columns are: "
                        f"{', '.join(c for c in train.columns if c != '__row__')}.")
    params = fit_tabular(train, features, d.categorical, recipe.preprocess_step("standardize") is not None,
                         recipe.preprocess_step("one_hot") is not None, d.train)
    return {"kind": "tabular", "params": params}
