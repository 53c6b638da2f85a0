"""Iteration: --set overrides, k-fold cross-validation, runs list / compare."""

import json
import statistics

import pytest

from conftest import read_json, run_cli


@pytest.mark.slow   # covered in CI (make test-all); the default run keeps a faster sibling
def test_kfold_and_compare(tmp_path):
    runs = tmp_path / "runs"
    a, b = runs / "a", runs / "b"
    run_cli("derive", "recipes/tabular-cancer.yaml", "--out", a, "--set", "k_fold=3", "--set", "train.epochs=8",
            "--quiet")
    run_cli("derive", "recipes/tabular-cancer.yaml", "--out", b, "--set", "train.lr=1e-2", "--set", "train.epochs=8",
            "--set", "model.hidden=[16]", "--quiet")
    lin = read_json(a / "lineage.json")
    cv = lin["metrics"]["k_fold"]
    assert cv["k"] == 3 and len(cv["folds"]) == 3
    accs = [f["accuracy"] for f in cv["folds"]]
    assert abs(cv["mean"]["accuracy"] - sum(accs) / 3) < 1e-9
    assert abs(cv["std"]["accuracy"] - statistics.stdev(accs)) < 1e-9   # the sample std of the three folds
    assert "3-fold cross-validation" in (a / "report.md").read_text()
    assert "lr: 0.01" in (b / "recipe.yaml").read_text()

    listed = json.loads(run_cli("runs", "list", "--dir", runs, "--json").stdout)
    assert {r["run"] for r in listed} == {"a", "b"} and all(r["state"] == "complete" for r in listed)
    png = tmp_path / "cmp.png"
    res = json.loads(run_cli("runs", "compare", a, b, "--png", png, "--json").stdout)
    assert [r["run"] for r in res["runs"]] == ["a", "b"]
    assert res["runs"][0]["trainable"] != res["runs"][1]["trainable"]
    assert png.stat().st_size > 1000
