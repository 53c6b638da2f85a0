"""Seeded train/validation/test splits and the label checks that must pass before training."""

from __future__ import annotations

import numpy as np
import pandas as pd

from taoke.data.load import Table
from taoke.errors import DataError


def check_labels(table: Table, label: str, regression: bool) -> None:
    """Every row needs a label; regression labels must be numbers."""
    col = table.frame[label]
    empty = col.isna() | (col.astype(str).str.strip() == "")
    if empty.any():
        i = int(empty.to_numpy().nonzero()[0][0])
        raise DataError(f"{table.line_of(i)}: empty label in column '{label}'. Every row needs a label; "
                        "remove the row or fill it in.")
    if regression:
        values = pd.to_numeric(col, errors="coerce")
        bad = ~np.isfinite(values.to_numpy(dtype=float, na_value=np.nan))
        if bad.any():
            i = int(bad.nonzero()[0][0])
            raise DataError(f"{table.line_of(i)}: label {col.iloc[i]!r} is not a finite number; "
                            "tabular-regression needs numeric labels.")


def split_frame(frame: pd.DataFrame, label: str, validation: float, test: float, seed: int,
                stratify: bool) -> dict[str, pd.DataFrame]:
    """Split into train/validation/test, stratified by label when every class can be split."""
    strat = frame[label] if stratify else None
    if strat is not None and strat.value_counts().min() < 3:
        strat = None  # a class with < 3 rows cannot be spread over three splits
    try:
        return _split(frame, label, validation, test, seed, strat)
    except ValueError:
        if strat is None:
            raise DataError(f"{len(frame)} rows are too few to split into train/validation/test "
                            f"({validation}/{test}); add rows or give data.test explicitly.") from None
        return split_frame(frame, label, validation, test, seed, stratify=False)  # too small to stratify


def _split(frame, label, validation, test, seed, strat) -> dict[str, pd.DataFrame]:
    from sklearn.model_selection import train_test_split   # imported here (1.5 s): a data error is reported first

    parts = {}
    rest = frame
    if test > 0:
        rest, parts["test"] = train_test_split(frame, test_size=test, random_state=seed, stratify=strat)
    if validation > 0:
        strat_rest = rest[label] if strat is not None else None
        rest, parts["validation"] = train_test_split(rest, test_size=validation / (1 - test), random_state=seed,
                                                     stratify=strat_rest)
    parts["train"] = rest
    return parts


def class_labels(train: pd.DataFrame, label: str, source: str) -> list[str]:
    labels = sorted(train[label].astype(str).unique().tolist())
    if len(labels) < 2:
        raise DataError(f"{source}: the training split has only {len(labels)} class ({', '.join(labels)}); "
                        "classification needs at least two.")
    return labels


def check_known_labels(frame: pd.DataFrame, label: str, known: list[str], source: str) -> None:
    seen = set(frame[label].astype(str))
    unknown = sorted(seen - set(known))
    if unknown:
        raise DataError(f"{source}: label(s) {', '.join(map(repr, unknown[:5]))} not seen in training. "
                        f"The model knows: {', '.join(known)}.")


def check_no_empty_class(splits: dict[str, pd.DataFrame], label: str, known: list[str], source: str) -> None:
    counts = splits["train"][label].astype(str).value_counts()
    empty = [c for c in known if counts.get(c, 0) == 0]
    if empty:
        raise DataError(f"{source}: class {empty[0]!r} has no training rows after the split; "
                        "add rows for it or lower data.split.test / validation.")
