"""Use a derived model: `taoke.load(ref)` gives a predictor with the model, its tokenizer, `predict` and
`evaluate`, for classifiers/regressors (inference/task.py; exported to ONNX: inference/onnx_runtime.py) and
language models (inference/language.py; exported to GGUF: loaded through transformers' GGUF reader)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from taoke.errors import ModelError
from taoke.formats.sealed import SUFFIX as SEALED_SUFFIX
from taoke.models.meta import read_meta
from taoke.recipe import LM_TASKS
from taoke.run import Run

if TYPE_CHECKING:
    from taoke.inference.language import LanguagePredictor
    from taoke.inference.onnx_runtime import OnnxPredictor
    from taoke.inference.task import TaskPredictor


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


def load(ref: str | Path, device: str | None = None, key: bytes | None = None
         ) -> TaskPredictor | OnnxPredictor | LanguagePredictor:
    """The model of a run (or its model/ folder), ready to predict and evaluate. A sealed run needs its `key`
    (or $TAOKE_SEAL_KEY): its weights are decrypted in memory only."""
    model_dir, run = locate(ref)
    state = None
    if run is not None:
        from taoke.inference.sealed import sealed_state   # imports torch: after the cheap checks above

        run.check_model_files()
        state = sealed_state(run, key)
    elif any(model_dir.rglob("*" + SEALED_SUFFIX)):
        raise ModelError(f"{ref}: sealed weights outside their run directory; give the run directory, whose "
                         "lineage.json records them")
    meta = read_meta(model_dir)
    # each kind imports its own runtime here (the LM stack with peft, ONNX Runtime): a classifier needs neither
    from taoke.inference.onnx_runtime import OnnxPredictor, is_onnx_model

    if is_onnx_model(meta):
        if state is not None:
            raise ModelError(f"{ref}: a sealed ONNX export cannot be opened yet; unseal it first (taoke unseal)")
        return OnnxPredictor.load(model_dir, run, device)
    if meta.get("task") in LM_TASKS:
        from taoke.inference.language import LanguagePredictor

        return LanguagePredictor.load(model_dir, run, device, state=state)
    from taoke.inference.task import TaskPredictor

    return TaskPredictor.load(model_dir, run, device, state=state)
