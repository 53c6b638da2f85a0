"""Metrics from model outputs (scikit-learn does the arithmetic)."""

from __future__ import annotations

import numpy as np
import torch
from sklearn import metrics as skm

from taoke.errors import ModelError

CLASSIFICATION_METRICS = ("accuracy", "macro_f1", "weighted_f1", "macro_precision", "macro_recall")
REGRESSION_METRICS = ("mae", "rmse", "r2")


def classification_metrics(y_true, y_pred, labels: list[str] | None = None) -> dict:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    ids = list(range(len(labels))) if labels else None
    p, r, f, s = skm.precision_recall_fscore_support(y_true, y_pred, labels=ids, zero_division=0)
    out = {
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "macro_f1": float(skm.f1_score(y_true, y_pred, labels=ids, average="macro", zero_division=0)),
        "weighted_f1": float(skm.f1_score(y_true, y_pred, labels=ids, average="weighted", zero_division=0)),
        "macro_precision": float(np.mean(p)),
        "macro_recall": float(np.mean(r)),
    }
    if labels:
        out["per_class"] = {labels[i]: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                                        "support": int(s[i])} for i in range(len(labels))}
    return out


def regression_metrics(y_true, y_pred) -> dict:
    y_true, y_pred = np.asarray(y_true, dtype=float), np.asarray(y_pred, dtype=float).reshape(-1)
    return {"mae": float(skm.mean_absolute_error(y_true, y_pred)),
            "rmse": float(np.sqrt(skm.mean_squared_error(y_true, y_pred))),
            "r2": float(skm.r2_score(y_true, y_pred))}


def metrics_from_outputs(outputs: torch.Tensor, targets: torch.Tensor, regression: bool,
                         labels: list[str] | None = None, per_class: bool = False) -> dict:
    bad = ~torch.isfinite(outputs.reshape(len(outputs), -1)).all(-1)
    if bad.any():  # argmax over NaN still picks a class: a score from such outputs would be a made-up number
        raise ModelError(f"the model's outputs are not finite numbers for {int(bad.sum())} of {len(outputs)} rows "
                         f"(first: row {int(bad.nonzero()[0, 0])}); its weights are corrupt or training diverged, so "
                         "no metric is reported.")
    if regression:
        return regression_metrics(targets.numpy(), outputs.view(-1).numpy())
    m = classification_metrics(targets.numpy(), outputs.argmax(-1).numpy(), labels if per_class else None)
    return m


def confusion(y_true, y_pred, n: int) -> np.ndarray:
    return skm.confusion_matrix(y_true, y_pred, labels=list(range(n)))
