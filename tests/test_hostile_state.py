"""Hostile input, class 5: state that tells the truth.

The issue's cases: a SIGKILLed run read "running" forever; a `normalize` that failed after writing left a
directory that looked like a valid checkpoint; tabular features with inf/NaN trained on a NaN loss before
failing; `taoke lineage` marked claimed parent cycles (a<->b, c->c) as confirmed; a 300-character recipe name
crashed."""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.datasets import load_breast_cancer

import taoke
from conftest import ROOT, run_cli
from taoke.errors import DataError, ModelError, RecipeError
from taoke.provenance import normalize as normalize_module
from taoke.run import Run, list_runs
from tests.hostile_files import iris_run
from tests.lineage_tiny import finetune_like, load, save, tiny_llama


def own_a_run(out, ready):
    run = Run.create("killed", out=out)
    run.write_recipe("name: killed\n")
    with run.running():
        run.checkpoint_dir.mkdir()
        (run.checkpoint_dir / "last.pt").write_bytes(b"checkpoint")
        ready.set()
        time.sleep(120)


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_a_sigkilled_run_reads_interrupted_with_the_resume_command(tmp_path, taoke_main):
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    owner = ctx.Process(target=own_a_run, args=(tmp_path / "runs" / "r", ready))
    owner.start()
    assert ready.wait(60)
    run = tmp_path / "runs" / "r"
    assert Run(run).state == "running"
    code, _, err = taoke_main("derive", "--resume", run)        # the owner is alive: nobody else may touch it
    assert code == 2 and "in use by another taoke process" in err and f"pid {owner.pid}" in err
    os.kill(owner.pid, signal.SIGKILL)
    owner.join()
    rows = list_runs(tmp_path / "runs")
    assert rows[0]["state"] == "interrupted" and rows[0]["next"] == f"taoke derive --resume {run}"
    code, out, _ = taoke_main("runs", "list", "--dir", tmp_path / "runs")
    assert code == 0 and "interrupted" in out and f"taoke derive --resume {run}" in out.replace("\n", "")
    code, out, _ = taoke_main("runs", "show", run, "--json")
    shown = json.loads(out)
    assert shown["status"]["state"] == "interrupted" and shown["next"] == f"taoke derive --resume {run}"
    code, out, _ = taoke_main("runs", "show", run)
    assert code == 0 and "interrupted" in out and "--resume" in out


def test_a_pid_that_now_belongs_to_another_process_is_not_the_owner(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "recipe.yaml").write_text("name: r\n")
    (run / "status.json").write_text(json.dumps({"state": "running", "pid": os.getpid(), "pid_start": "1"}))
    assert Run(run).state == "interrupted"   # this pid is alive, but started at another time: not the owner


@pytest.mark.slow
def test_a_real_derive_killed_then_listed_then_resumed(tmp_path):
    out = tmp_path / "runs" / "cancer"
    proc = subprocess.Popen([sys.executable, "-m", "taoke.cli", "derive", "recipes/tabular-cancer.yaml", "--out", str(out),
                             "--quiet", "--set", "train.epochs=60", "--set", "train.checkpoint_every=5"], cwd=ROOT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "last.pt").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    listed = json.loads(run_cli("runs", "list", "--dir", out.parent, "--json").stdout)
    assert listed[0]["state"] == "interrupted" and listed[0]["next"] == f"taoke derive --resume {out}"
    run_cli("derive", "--resume", out, "--quiet")
    assert Run(out).state == "complete"


def test_a_normalize_that_fails_after_writing_leaves_no_checkpoint(tmp_path, monkeypatch):
    sd, cfg = load(tiny_llama(tmp_path / "base", seed=0))
    src = save(tmp_path / "renamed", {k.replace("model.layers", "transformer.h"): v for k, v in sd.items()}, cfg)

    def disk_gave_out(*args, **kwargs):   # a failure after every file was written: the check cannot load it
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(normalize_module.AutoModelForCausalLM, "from_pretrained", disk_gave_out)
    with pytest.raises(OSError, match="No space left"):
        normalize_module.normalize(str(src), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]   # no temp dir left either


def test_a_normalize_whose_logits_differ_writes_nothing(tmp_path, monkeypatch):
    sd, cfg = load(tiny_llama(tmp_path / "base", seed=0))
    real = normalize_module.reference_logits
    monkeypatch.setattr(normalize_module, "reference_logits", lambda c, s: real(c, s) + 1.0)
    with pytest.raises(ModelError, match="nothing was written"):
        normalize_module.normalize(str(tmp_path / "base"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def cancer_csv(tmp_path, edit):
    b = load_breast_cancer()
    frame = pd.DataFrame(b.data, columns=b.feature_names)
    frame["label"] = [str(b.target_names[t]) for t in b.target]
    edit(frame)
    frame.to_csv(tmp_path / "cancer.csv", index=False)
    return tmp_path / "cancer.csv"


@pytest.mark.parametrize("value", [np.inf, -np.inf])
def test_inf_features_stop_before_anything_trains_naming_column_and_line(tmp_path, value):
    data = cancer_csv(tmp_path, lambda f: f.__setitem__("mean radius", f["mean radius"].where(f.index != 7, value)))
    recipe = {"name": "c", "base": "scratch:mlp", "task": "tabular-classification", "data": {"train": str(data)}}
    with pytest.raises(DataError, match=r"cancer.csv:9: column 'mean radius' holds -?inf;"):
        taoke.derive(recipe, out=tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


def test_inf_labels_in_regression_stop_naming_the_line(tmp_path):
    data = cancer_csv(tmp_path, lambda f: f.__setitem__("label", np.where(f.index == 3, np.inf, 1.0 * f.index)))
    recipe = {"name": "c", "base": "scratch:mlp", "task": "tabular-regression", "data": {"train": str(data)}}
    with pytest.raises(DataError, match=r"cancer.csv:5: label .*inf.* is not a finite number"):
        taoke.derive(recipe, out=tmp_path / "run", quiet=True)


def test_inf_in_rows_to_predict_names_the_column(tmp_path, taoke_main):
    run = iris_run(tmp_path / "iris")
    rows = tmp_path / "rows.csv"
    rows.write_text("sepal length (cm),sepal width (cm),petal length (cm),petal width (cm)\n1,2,inf,4\n")
    code, out, err = taoke_main("predict", run, "--file", rows, "--json")
    assert code == 2 and "column 'petal length (cm)'" in err and out == ""


def test_a_diverging_loss_stops_the_run_at_that_step(tmp_path):
    recipe = {"name": "d", "base": "scratch:mlp", "task": "tabular-regression", "data": {"train": "sklearn:diabetes"},
              "train": {"epochs": 3, "optimizer": "sgd", "lr": 1e12, "max_grad_norm": None}}
    with pytest.raises(RecipeError, match=r"training loss became (nan|inf) at step \d+; the run stops here"):
        taoke.derive(recipe, out=tmp_path / "run", quiet=True)
    status = Run(tmp_path / "run").status()
    assert status["state"] == "failed" and "at step" in status["error"]
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["train_loss"]) for r in steps if "train_loss" in r)   # nothing non-finite was logged


def test_claimed_cycles_are_flagged_not_confirmed(tmp_path, taoke_main):
    zoo = tmp_path / "zoo"
    sd, cfg = load(tiny_llama(tmp_path / "seed", seed=0))
    save(zoo / "a", sd, cfg, card_base="b")
    finetune_like(zoo / "a", zoo / "b", scale=0.2, card_base="a")
    sd_c, cfg_c = load(tiny_llama(tmp_path / "seed-c", seed=4))
    save(zoo / "c", sd_c, cfg_c, card_base="c")
    code, out, err = taoke_main("lineage", zoo, "--json")
    assert code == 0, err
    tree = json.loads(out)
    status = {(e["parent"], e["child"]): e["status"] for e in tree["edges"]}
    assert status[("a", "b")] == status[("b", "a")] == "cycle" and status[("c", "c")] == "cycle"
    assert "confirmed" not in status.values()
    assert any("a and b claim each other" in f for f in tree["flags"])
    assert any("c: claims itself" in f for f in tree["flags"])


@pytest.mark.parametrize("name,why", [("a" * 300, "too long"), ("中" * 90, "too long"), ("../up", "character '/'"),
                                      ("-x", "leading '-'"), ("tab\there", "character '\\t'")])
def test_user_given_names_are_checked(tmp_path, taoke_main, name, why):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": name, "base": "scratch:mlp", "task": "tabular-classification",
                                      "data": {"train": "sklearn:iris"}}, allow_unicode=True))
    code, _, err = taoke_main("derive", recipe, "--quiet")
    assert code == 2 and why in err and "Traceback" not in err and len(err) < 600
    code, _, err = taoke_main("models", "add", "--", name, tmp_path)
    assert code == 2 and why in err
