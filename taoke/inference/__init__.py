"""Use a derived model: `taoke.load(ref)` gives a predictor with the model, its tokenizer, `predict` and
`evaluate`, for classifiers/regressors (inference/task.py; exported to ONNX: inference/onnx_runtime.py) and
language models (inference/language.py; exported to GGUF: loaded through transformers' GGUF reader)."""

from __future__ import annotations

from pathlib import Path

from taoke.errors import ModelError
from taoke.inference.language import LanguagePredictor
from taoke.inference.onnx_runtime import OnnxPredictor, is_onnx_model
from taoke.inference.task import TaskPredictor
from taoke.models.task_model import read_meta
from taoke.recipe import LM_TASKS
from taoke.run import Run

Predictor = TaskPredictor | OnnxPredictor | LanguagePredictor


def locate(ref: str | Path) -> tuple[Path, Run | None]:
    """(model dir, run or None) for a run directory or its model/ folder."""
    p = Path(ref)
    if (p / "model" / "taoke.json").is_file():
        return p / "model", Run(p) if Run.is_run(p) else None
    if (p / "taoke.json").is_file():
        return p, Run(p.parent) if Run.is_run(p.parent) else None
    if (p / "status.json").is_file() or (p / "recipe.yaml").is_file():
        raise ModelError(f"{ref}: run is not complete (state: {Run(p).state}); it has no model to load.")
    raise ModelError(f"{ref}: not a taoke run directory or model folder (no taoke.json). "
                     "For a base model, derive a task model first.")


def load(ref: str | Path, device: str | None = None) -> Predictor:
    """The model of a run (or its model/ folder), ready to predict and evaluate."""
    model_dir, run = locate(ref)
    if run is not None:
        run.check_model_files()
    meta = read_meta(model_dir)
    if is_onnx_model(meta):
        predictor = OnnxPredictor
    else:
        predictor = LanguagePredictor if meta.get("task") in LM_TASKS else TaskPredictor
    return predictor.load(model_dir, run, device)
