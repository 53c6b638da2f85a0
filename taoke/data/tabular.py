"""Tabular preprocessing with JSON-serialisable fitted parameters (no pickled sklearn objects in runs)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from taoke.errors import DataError


def check_finite(frame: pd.DataFrame, columns: list[str], where) -> None:
    """Refuse +/-inf in numeric columns, naming the column and the row (`where(i)` says where row i is).
    NaN is a missing value (filled with the column mean); inf is no value at all and would make the loss NaN."""
    for c in columns:
        if c not in frame.columns or not pd.api.types.is_numeric_dtype(frame[c]):
            continue
        bad = np.isinf(frame[c].to_numpy(dtype=float, na_value=np.nan))
        if bad.any():
            i = int(bad.nonzero()[0][0])
            raise DataError(f"{where(i)}: column '{c}' holds {float(frame[c].iloc[i])}; features and numeric labels must "
                            "be finite numbers. Fix or drop the row.")


def fit_tabular(frame: pd.DataFrame, features: list[str], categorical: list[str] | None, standardize: bool,
                one_hot: bool, source: str) -> dict:
    """Learn the column transforms on the training split."""
    if categorical is None:
        categorical = [c for c in features if not pd.api.types.is_numeric_dtype(frame[c])]
    numeric = [c for c in features if c not in categorical]
    if categorical and not one_hot:
        raise DataError(f"{source}: column '{categorical[0]}' is not numeric; add '- one_hot: {{}}' to preprocess "
                        "or drop the column from data.features.")
    for c in numeric:
        bad = pd.to_numeric(frame[c], errors="coerce").isna() & frame[c].notna()
        if bad.any():
            raise DataError(f"{source}: column '{c}' has non-numeric value {frame[c][bad].iloc[0]!r}; "
                            "list it in data.categorical to one-hot it.")
    values = frame[numeric].apply(pd.to_numeric, errors="coerce").astype(float)
    params = {"numeric": numeric, "categorical": categorical,
              "fill": values.mean().fillna(0.0).tolist(),
              "mean": values.mean().fillna(0.0).tolist() if standardize else [0.0] * len(numeric),
              "std": values.std().fillna(1.0).replace(0.0, 1.0).tolist() if standardize else [1.0] * len(numeric),
              "categories": {c: sorted(frame[c].astype(str).unique().tolist()) for c in categorical}}
    for c, mean, std in zip(numeric, params["mean"], params["std"]):
        if not (np.isfinite(mean) and np.isfinite(std)):
            raise DataError(f"{source}: column '{c}' has values too large to standardise (mean {mean}, std {std}); "
                            "rescale the column.")
    return params


def apply_tabular(frame: pd.DataFrame, params: dict) -> np.ndarray:
    numeric = params["numeric"]
    missing = [c for c in numeric + params["categorical"] if c not in frame.columns]
    if missing:
        raise DataError(f"column '{missing[0]}' is missing; the model was trained on columns "
                        f"{', '.join(numeric + params['categorical'])}.")
    check_finite(frame[numeric].apply(pd.to_numeric, errors="coerce"), numeric, lambda i: f"row {i}")
    x = frame[numeric].apply(pd.to_numeric, errors="coerce").astype(float).to_numpy()
    fill = np.asarray(params["fill"])
    x = np.where(np.isnan(x), fill, x)
    x = (x - np.asarray(params["mean"])) / np.asarray(params["std"])
    blocks = [x]
    for c in params["categorical"]:
        cats = params["categories"][c]
        col = frame[c].astype(str).to_numpy()
        blocks.append((col[:, None] == np.asarray(cats)[None, :]).astype(float))  # unseen values: all zeros
    return np.concatenate(blocks, axis=1).astype(np.float32)


def feature_names(params: dict) -> list[str]:
    return params["numeric"] + [f"{c}={v}" for c in params["categorical"] for v in params["categories"][c]]
