"""Bad input: one clear message naming the key/path, exit code 2, no traceback, no complete run dir."""

import subprocess
import sys

import pytest

from conftest import TOPICS, run_cli

GOOD = f"""name: bad
base: minilm-l6
task: text-classification
data: {{train: {TOPICS}}}
train: {{epochs: 1}}
"""


def derive_fails(taoke_main, tmp_path, recipe_text, *extra):
    """`taoke derive` through the real entry point in this process (an error other than taoke's own would raise
    here); the CLI's exit status and stderr as a subprocess sees them are checked below on a missing recipe."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text)
    out = tmp_path / "run"
    code, _, err = taoke_main("derive", recipe, "--out", out, "--quiet", *extra)
    assert code == 2, err
    assert "Traceback" not in err
    assert not (out / "lineage.json").exists()
    return err.replace("\n", " ")


def as_sft(recipe: str) -> str:
    return recipe.replace("minilm-l6", "smollm2-135m").replace("text-classification", "sft")


# (a recipe broken in one place, what the error must say)
BAD_RECIPES = [
    (lambda r: r.replace("train: {epochs: 1}", "train: {epoch: 1}"), "Did you mean 'train.epochs'"),
    (lambda r: r.replace("train: {epochs: 1}", "train: {epochs: many}"), "'train.epochs'"),
    (lambda r: r.replace(str(TOPICS), "/nonexistent/data.csv"), "/nonexistent/data.csv: data file not found"),
    (lambda r: r.replace("minilm-l6", "minilm-16"), "unknown base 'minilm-16'"),
    (lambda r: r.replace("data: {", "data: {label: topic, "), "column 'topic' (label) not found"),
    (lambda r: r.replace("text-classification", "image-classification"), "cannot do image-classification"),
    (lambda r: r.replace("minilm-l6", "scratch:cnn"), "cannot do text-classification"),
    (lambda r: r.replace("text-classification", "sft"), "is not a causal language model"),
    (lambda r: as_sft(r).replace(str(TOPICS), "/nonexistent/chat.jsonl"),
     "/nonexistent/chat.jsonl: data file not found"),
    (as_sft, "topics.csv:1: not valid JSON"),   # a CSV given as chat data: the file and line are named
]


@pytest.mark.parametrize("mutate,expect", BAD_RECIPES)
def test_bad_recipes(tmp_path, mutate, expect, taoke_main):
    assert expect in derive_fails(taoke_main, tmp_path, mutate(GOOD))


def test_unreadable_image(tmp_path, taoke_main):
    root = tmp_path / "imgs"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            (root / c / f"{i}.png").write_text("not a png")
    recipe = f"name: img\nbase: scratch:cnn\ntask: image-classification\ndata: {{train: {root}}}\n"
    assert "unreadable image" in derive_fails(taoke_main, tmp_path, recipe)


def test_bad_override_and_missing_recipe(tmp_path, taoke_main):
    assert "--set" in derive_fails(taoke_main, tmp_path, GOOD, "--set", "train.lr")
    proc = run_cli("derive", tmp_path / "nope.yaml", check=False)   # the installed command, in its own process
    assert proc.returncode == 2 and "recipe file not found" in proc.stderr and "Traceback" not in proc.stderr


def test_predict_without_inputs_says_so_before_loading(tmp_path, taoke_main):
    code, _, err = taoke_main("predict", tmp_path)   # not a run either: the missing inputs are named first
    assert code == 2 and "give inputs to predict, or --file FILE" in err


def test_eval_on_non_run(tmp_path):
    proc = run_cli("eval", tmp_path, "--data", TOPICS, check=False)
    assert proc.returncode == 2 and "not a taoke run directory" in proc.stderr


LOADED = "import sys; print(' '.join(m for m in ('torch', 'transformers', 'sklearn') if m in sys.modules))"


def test_recipe_errors_come_before_the_training_libraries_load(tmp_path):
    """Every bad recipe above (wrong key, value, data path, column, base) is reported before torch and transformers
    import (seconds on a small CPU): `derive` checks the base and reads the data first."""
    for i, (mutate, _) in enumerate(BAD_RECIPES):
        (tmp_path / f"{i}.yaml").write_text(mutate(GOOD))
    code = ("from taoke import derive\nfrom taoke.errors import TaokeError\n"
            f"for i in range({len(BAD_RECIPES)}):\n"
            f"    try:\n        derive(r'{tmp_path}/' + f'{{i}}.yaml')\n"
            "    except TaokeError as e:\n        print(' '.join(str(e).split()))\n" + LOADED)
    lines = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(lines) == len(BAD_RECIPES) + 1, lines
    for (_, expect), line in zip(BAD_RECIPES, lines):
        assert expect in line
    assert lines[-1] == ""   # none of the heavy libraries was imported


def test_model_path_errors_come_before_torch_loads(tmp_path):
    """`eval` and `predict` on a folder that is not a run say so without loading the model stack."""
    code = ("import sys\nfrom taoke.cli import main\n"
            f"for argv in (['eval', r'{tmp_path}', '--data', r'{TOPICS}'], ['predict', r'{tmp_path}', 'hi']):\n"
            "    sys.argv = ['taoke', *argv]\n    try:\n        main()\n    except SystemExit as e:\n"
            "        print(e.code)\n" + LOADED)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.splitlines() == ["2", "2", ""], proc
    assert " ".join(proc.stderr.split()).count("not a taoke run directory") == 2, proc.stderr


def test_verify_argument_errors_come_before_torch_loads():
    code = ("import sys\nfrom taoke.cli import main\n"
            "for argv in (['verify', 'a'], ['verify', '--endpoint', 'localhost:8000', 'a', '--control', 'b']):\n"
            "    sys.argv = ['taoke', *argv]\n    try:\n        main()\n    except SystemExit as e:\n"
            "        print(e.code)\n" + LOADED)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.splitlines() == ["2", "2", ""], proc
    assert "give two models" in proc.stderr and "http(s) URL" in " ".join(proc.stderr.split())
