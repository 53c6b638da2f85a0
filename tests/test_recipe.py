import pytest

from taoke.errors import RecipeError
from taoke.recipe import apply_overrides, load_recipe, parse_value

BASIC = """
name: t
base: minilm-l6
task: text-classification
data: {train: data/chatterbot/topics.csv}
"""


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_defaults_and_paths(tmp_path):
    recipe = load_recipe(write(tmp_path, BASIC))
    assert recipe.train.epochs == 3 and recipe.adapt.method == "full"
    assert recipe.data.train.endswith("data/chatterbot/topics.csv")
    assert recipe.data.split.test == 0.2


def test_unknown_key_suggests_nearest(tmp_path):
    with pytest.raises(RecipeError, match=r"unknown key 'train.epoch'.*Did you mean 'train.epochs'"):
        load_recipe(write(tmp_path, BASIC + "train: {epoch: 3}\n"))


def test_unknown_top_level_key(tmp_path):
    with pytest.raises(RecipeError, match=r"unknown key 'trian'.*'train'"):
        load_recipe(write(tmp_path, BASIC + "trian: {epochs: 3}\n"))


def test_wrong_type_names_key(tmp_path):
    with pytest.raises(RecipeError, match=r"'train.lr'.*got 'fast'"):
        load_recipe(write(tmp_path, BASIC + "train: {lr: fast}\n"))


def test_bad_task(tmp_path):
    with pytest.raises(RecipeError, match="'task'"):
        load_recipe(write(tmp_path, BASIC.replace("text-classification", "text-clasification")))


def test_missing_required(tmp_path):
    with pytest.raises(RecipeError, match="missing required key 'base'"):
        load_recipe(write(tmp_path, "name: t\ntask: sft\ndata: {train: x.csv}\n"))


def test_preprocess_step_validation(tmp_path):
    with pytest.raises(RecipeError, match=r"unknown step 'dedupe'.*Did you mean 'dedup'"):
        load_recipe(write(tmp_path, BASIC + "preprocess: [{dedupe: {}}]\n"))
    with pytest.raises(RecipeError, match=r"preprocess\[0\].tokenize: max_length"):
        load_recipe(write(tmp_path, BASIC + "preprocess: [{tokenize: {max_length: -1}}]\n"))


def test_overrides(tmp_path):
    recipe = load_recipe(write(tmp_path, BASIC), ["train.lr=3e-5", "adapt.method=head", "data.split.seed=7",
                                                     "eval.metrics=[accuracy]"])
    assert recipe.train.lr == pytest.approx(3e-5)
    assert recipe.adapt.method == "head"
    assert recipe.data.split.seed == 7
    assert recipe.eval.metrics == ["accuracy"]


def test_override_syntax_error():
    with pytest.raises(RecipeError, match="key=value"):
        apply_overrides({}, ["train.lr"])


def test_parse_value():
    assert parse_value("3e-5") == pytest.approx(3e-5)
    assert parse_value("true") is True
    assert parse_value("[1, 2]") == [1, 2]
    assert parse_value("minilm-l6") == "minilm-l6"


def test_invalid_yaml_names_line(tmp_path):
    with pytest.raises(RecipeError, match="line"):
        load_recipe(write(tmp_path, "name: t\nbase: [unclosed\n"))


def test_split_fractions(tmp_path):
    with pytest.raises(RecipeError, match="validation \\+ test"):
        load_recipe(write(tmp_path, BASIC.replace("data: {train: data/chatterbot/topics.csv}",
                                                  "data: {train: x.csv, split: {validation: 0.5, test: 0.5}}")))
