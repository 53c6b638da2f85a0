"""Bad input: one clear message naming the key/path, exit code 2, no traceback, no complete run dir."""

import pytest

from conftest import TOPICS, run_cli

GOOD = f"""name: bad
base: minilm-l6
task: text-classification
data: {{train: {TOPICS}}}
train: {{epochs: 1}}
"""


def derive_fails(tmp_path, recipe_text, *extra):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text)
    out = tmp_path / "run"
    proc = run_cli("derive", recipe, "--out", out, "--quiet", *extra, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (out / "lineage.json").exists()
    return proc.stderr.replace("\n", " ")


@pytest.mark.parametrize("mutate,expect", [
    (lambda r: r.replace("train: {epochs: 1}", "train: {epoch: 1}"), "Did you mean 'train.epochs'"),
    (lambda r: r.replace("train: {epochs: 1}", "train: {epochs: many}"), "'train.epochs'"),
    (lambda r: r.replace(str(TOPICS), "/nonexistent/data.csv"), "/nonexistent/data.csv: data file not found"),
    (lambda r: r.replace("minilm-l6", "minilm-16"), "unknown base 'minilm-16'"),
    (lambda r: r.replace("data: {", "data: {label: topic, "), "column 'topic' (label) not found"),
    (lambda r: r.replace("text-classification", "image-classification"), "cannot do image-classification"),
    (lambda r: r.replace("minilm-l6", "scratch:cnn"), "cannot do text-classification"),
])
def test_bad_recipes(tmp_path, mutate, expect):
    assert expect in derive_fails(tmp_path, mutate(GOOD))


def test_unreadable_image(tmp_path):
    root = tmp_path / "imgs"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            (root / c / f"{i}.png").write_text("not a png")
    recipe = f"name: img\nbase: scratch:cnn\ntask: image-classification\ndata: {{train: {root}}}\n"
    assert "unreadable image" in derive_fails(tmp_path, recipe)


def test_bad_override_and_missing_recipe(tmp_path):
    assert "--set" in derive_fails(tmp_path, GOOD, "--set", "train.lr")
    proc = run_cli("derive", tmp_path / "nope.yaml", check=False)
    assert proc.returncode == 2 and "recipe file not found" in proc.stderr


def test_eval_on_non_run(tmp_path):
    proc = run_cli("eval", tmp_path, "--data", TOPICS, check=False)
    assert proc.returncode == 2 and "not a taoke run directory" in proc.stderr
