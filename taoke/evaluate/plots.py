"""PNG plots: confusion matrices and training curves (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from taoke.files import atomic_path  # noqa: E402


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def confusion_png(matrix: np.ndarray, labels: list[str], path: Path, title: str) -> None:
    n = len(labels)
    size = max(4.0, 0.5 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    norm = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(n):
        for j in range(n):
            if matrix[i, j]:
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center",
                        color="white" if norm[i, j] > 0.5 else "black", fontsize=8)
    _save(fig, path)


def curves_png(history: list[dict], path: Path, title: str) -> None:
    epochs = [h["epoch"] for h in history]
    metric_keys = [k for k in history[0] if k.startswith("val_") and k != "val_loss"] if history else []
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    axes[0].plot(epochs, [h["train_loss"] for h in history], "o-", label="train loss")
    if history and "val_loss" in history[0]:
        axes[0].plot(epochs, [h["val_loss"] for h in history], "o-", label="validation loss")
    axes[0].set_xlabel("epoch")
    axes[0].set_title("loss")
    axes[0].legend()
    for k in metric_keys:
        axes[1].plot(epochs, [h[k] for h in history], "o-", label=k.removeprefix("val_"))
    axes[1].set_xlabel("epoch")
    axes[1].set_title("validation metrics")
    if metric_keys:
        axes[1].legend()
    fig.suptitle(title)
    _save(fig, path)


def comparison_png(rows: list[tuple[str, dict]], metrics: list[str], path: Path, title: str) -> None:
    """Grouped bars: each model (base, probe, derived...) for each metric."""
    fig, ax = plt.subplots(figsize=(max(5, 1.8 * len(metrics) + 2), 3.8))
    width = 0.8 / max(len(rows), 1)
    for i, (name, m) in enumerate(rows):
        vals = [m.get(k, np.nan) for k in metrics]
        ax.bar(np.arange(len(metrics)) + i * width, vals, width, label=name)
    ax.set_xticks(np.arange(len(metrics)) + width * (len(rows) - 1) / 2, metrics)
    ax.set_title(title)
    ax.legend(fontsize=8)
    _save(fig, path)


def overlaid_curves_png(histories: dict[str, list[dict]], path: Path) -> None:
    """One line per run: validation loss and the first validation metric, by epoch."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    metric = None
    for h in histories.values():
        metric = metric or next((k for k in (h[0] if h else {}) if k.startswith("val_") and k != "val_loss"), None)
    for name, h in histories.items():
        ep = [r["epoch"] for r in h]
        axes[0].plot(ep, [r.get("val_loss", r["train_loss"]) for r in h], "o-", label=name)
        if metric:
            axes[1].plot(ep, [r.get(metric, np.nan) for r in h], "o-", label=name)
    axes[0].set_title("validation loss")
    axes[1].set_title(metric.removeprefix("val_") if metric else "")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    _save(fig, path)


def lm_curves_png(steps: list[dict], path: Path, title: str) -> None:
    """Training loss by optimizer step (language models log per step, not per epoch)."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], "-", label="train loss")
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.legend()
    _save(fig, path)
