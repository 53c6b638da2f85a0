"""The recipe reference is generated from the schema: it must say what the schema says."""

from pathlib import Path

from docs.recipe_reference import OUT, render
from taoke import recipe as R


def test_recipe_reference_matches_the_schema():
    assert OUT.read_text(encoding="utf-8") == render(), \
        "docs/recipe.md is out of date: run `python docs/recipe_reference.py`"


def test_every_recipe_key_is_documented_with_a_meaning():
    text = OUT.read_text(encoding="utf-8")
    models = [R.Recipe, R.DataConfig, R.SplitConfig, R.AdaptConfig, R.TrainConfig, R.EarlyStopping, R.Distill, R.EvalConfig,
              R.LMConfig, *R.PREPROCESS_STEPS.values(), *R.EDITS.values()]
    for model in models:
        for name, info in model.model_fields.items():
            assert info.description, f"{model.__name__}.{name} has no description"
    for key in ("`train.lr`", "`lm.seq_len`", "`adapt.target_modules`", "`drop_layers.every`", "`tokenize.max_length`"):
        assert key in text


def test_readmes_keep_the_same_two_commands():
    root = Path(__file__).resolve().parents[1]
    en, zh = (root / "README.md").read_text(encoding="utf-8"), (root / "README.zh-CN.md").read_text(encoding="utf-8")
    for command in ("make demo", "make test"):
        assert command in en and command in zh
    assert "README.zh-CN.md" in en.split("\n\n")[0] + en.split("\n\n")[1]
