"""`taoke derive`: load the recipe, resolve the base, and hand over to the workflow of the task family.

    recipe.yaml -> base (model library) -> can the base do the task?   (derive/bases.py)
                -> classification / regression: data read and split     (data/prepare.py), workflow (derive/classify.py)
                -> language model:                                       workflow (derive/language.py)
Both end in a run directory written by taoke/run.py. Everything before the workflow runs without torch, so a bad
recipe is refused in a second or two.
"""

from __future__ import annotations

import copy
from pathlib import Path

from taoke.errors import RecipeError
from taoke.library import resolve
from taoke.recipe import Recipe, apply_overrides, load_recipe, recipe_from_dict
from taoke.run import Run


def derive(recipe: str | Path | Recipe | dict | None = None, overrides: list[str] | None = None,
           out: str | Path | None = None, *, quiet: bool = False, dry_run: bool = False,
           resume: str | Path | None = None) -> Run | None:
    """Derive a task model as the recipe says and evaluate it against its base.

    `recipe` is a YAML path, a Recipe or a mapping; `overrides` are `key=value` strings as `--set` takes them;
    `resume` continues a killed run from its last checkpoint. Returns the complete Run (None for a dry run).
    """
    if (recipe is None) == (resume is None):
        raise RecipeError("give a recipe to start a run, or resume=RUN to continue one")
    run = None
    if resume is not None:
        if overrides or out:
            raise RecipeError("--resume continues a run exactly as it was: drop --set and --out.")
        run = Run.open(resume)
        run.hold_lock()   # one process per run: a second resume (or the live owner) keeps it
        run.check_resumable()
        recipe = run.recipe_path
    elif out is not None and not dry_run:
        Run.check_free(out)   # fail before the data and model work, and touch nothing
    if isinstance(recipe, Recipe):
        if overrides:
            raise RecipeError("overrides apply to a recipe file or mapping; change the Recipe object instead")
        parsed = recipe
    elif isinstance(recipe, dict):
        parsed = recipe_from_dict(apply_overrides(copy.deepcopy(recipe), overrides or []))
    else:
        parsed = load_recipe(recipe, overrides)
    base = resolve(parsed.base)
    if base.is_run:
        parent = Run(base.run_dir)
        parent.check_model_files()  # derive from the parent as it was recorded, or not at all
        if parent.sealed:
            raise RecipeError(f"{base.run_dir}: the parent run is sealed; unseal it first (taoke unseal)")
    # Each workflow imports its own libraries (seconds of torch and transformers) after the checks that need none:
    # the base, then the data. The classifiers' data stage imports pandas, which the CLI's other commands do not
    # wait for.
    from taoke.derive.bases import check_classifier_base, check_lm_base

    if parsed.is_lm:
        from taoke.data.lm_examples import read_examples

        check_lm_base(parsed, base)
        examples = read_examples(parsed)
        from taoke.derive.language import derive_language_model

        return derive_language_model(parsed, base, examples, out, quiet=quiet, dry_run=dry_run, resume=run)
    from taoke.data.prepare import prepare_data

    check_classifier_base(parsed, base)
    plan = prepare_data(parsed)
    from taoke.derive.classify import derive_classifier

    return derive_classifier(parsed, base, plan, out, quiet=quiet, dry_run=dry_run, resume=run)
