"""Which bases can do which task. Checked by `derive` before a workflow imports its training libraries, so a
recipe naming the wrong base fails in a second, not after torch and transformers have loaded."""

from __future__ import annotations

from taoke.data.prepare import TASK_INPUT
from taoke.errors import ModelError, RecipeError
from taoke.library import BaseRef
from taoke.recipe import LM_TASKS, Recipe

# Which bases can do which task (scratch architectures by input kind).
SCRATCH_FOR = {"text": {"scratch:lstm", "scratch:gru", "scratch:transformer"},
               "image": {"scratch:cnn", "scratch:mlp"}, "tabular": {"scratch:mlp"}}


def check_classifier_base(recipe: Recipe, base: BaseRef) -> None:
    """Fail early, naming the base, when its architecture cannot do the task."""
    kind = TASK_INPUT[recipe.task]
    if recipe.model and not base.is_scratch:
        raise RecipeError("'model' sizes apply to from-scratch bases only; remove the model: block.")
    if base.is_scratch:
        if base.name not in SCRATCH_FOR[kind]:
            raise ModelError(f"base '{base.name}' cannot do {recipe.task}: use one of "
                             f"{', '.join(sorted(SCRATCH_FOR[kind]))}.")
        return
    if base.format == "run":
        parent_kind = TASK_INPUT.get(base.meta.get("task"), "?")
        if parent_kind != kind:
            raise ModelError(f"base '{base.name}' is a {base.meta.get('task')} model; it cannot be derived into "
                             f"{recipe.task} (its inputs are {parent_kind}, the task needs {kind}).")
        return
    if kind != "text":
        raise ModelError(f"base '{base.name}' ({base.format}, {base.kind}) cannot do {recipe.task}: image and tabular "
                         f"tasks take {', '.join(sorted(SCRATCH_FOR[kind]))} or a run directory of such a model.")
    if base.format != "hf":
        raise ModelError(f"base '{base.name}' is a single {base.format} file; text classification needs an "
                         "HF-format directory (config.json + weights + tokenizer). Convert it or point to its folder.")
    if base.kind == "causal-lm":
        raise ModelError(f"base '{base.name}' is a causal language model; {recipe.task} takes an encoder "
                         "(e.g. minilm-l6) or a from-scratch architecture.")


def check_lm_base(recipe: Recipe, base: BaseRef) -> None:
    """Fail early, naming the base, when it is not a pretrained causal LM."""
    if base.is_scratch:
        raise ModelError(f"{recipe.task} needs a pretrained causal LM base (e.g. smollm2-135m), not {base.name}.")
    parent_task = (base.lineage or {}).get("task") if base.is_run else None
    if base.kind not in ("causal-lm", "task-model") or (base.format == "run" and
                                                         (parent_task or base.meta.get("task")) not in LM_TASKS):
        raise ModelError(f"base '{base.name}' is not a causal language model; {recipe.task} needs one "
                         "(e.g. smollm2-135m, an HF causal-LM directory, or a run of such a model).")
