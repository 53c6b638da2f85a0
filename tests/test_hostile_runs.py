"""Hostile input, class 4: a run directory has one owner, and no command's output replaces a run's files or any
existing file unless asked (--force); outputs get the user's umask.

The issue's cases: two `taoke derive --out X` started together both passed the "directory is empty" check and
wrote one mixed run marked complete; `predict --out` overwrote the run's own lineage.json (then `runs list`
crashed on it) and existing files without asking; outputs were created with mode 0600."""

import json
import multiprocessing
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from taoke.errors import RecipeError, TaokeError
from taoke.run import Run
from tests.hostile_files import iris_rows, iris_run


def claim(out, barrier, i, results):
    barrier.wait()   # every process released at the same instant
    try:
        run = Run.create("x", out=out)
        (run.path / f"owner-{i}").write_text("mine")
        results.put("won")
        time.sleep(0.5)   # still holding it while the others try
    except TaokeError as e:
        results.put(f"lost: {e}")


def test_a_claimed_directory_is_not_given_out_twice(tmp_path):
    """The window the issue hit, held open: the first owner has the directory but has not written to it yet."""
    first = Run.create("a", out=tmp_path / "x")
    with pytest.raises(RecipeError, match="--out"):
        Run.create("b", out=tmp_path / "x")
    first.release_lock()


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_many_processes_claiming_one_out_directory_one_wins(tmp_path):
    """Processes released together race for the same --out; exactly one gets it, the others touch nothing."""
    ctx = multiprocessing.get_context("fork")   # the children only run taoke.run's file operations
    n = 6
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=claim, args=(tmp_path / "run", barrier, i, results)) for i in range(n)]
    for p in procs:
        p.start()
    outcomes = sorted(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert outcomes[-1] == "won" and outcomes.count("won") == 1, outcomes
    assert all(o.startswith("lost:") for o in outcomes[:-1]), outcomes
    assert len(list((tmp_path / "run").glob("owner-*"))) == 1


@pytest.fixture(scope="module")
def run(module_tmp):
    return iris_run(module_tmp / "iris")


def snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(d.rglob("*"))}


def test_a_second_derive_into_a_claimed_out_exits_2_and_touches_nothing(tmp_path, taoke_main):
    first = Run.create("iris", out=tmp_path / "x")     # what a first derive holds while it trains
    before = snapshot(tmp_path / "x")
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"name": "iris", "base": "scratch:mlp", "task": "tabular-classification",
                                  "data": {"train": "sklearn:iris"}}))
    code, _, err = taoke_main("derive", recipe, "--out", tmp_path / "x", "--quiet")
    assert code == 2 and "not an empty directory" in err
    assert snapshot(tmp_path / "x") == before
    # the claim also holds against a directory emptied behind the owner's back: the lock is what counts
    with pytest.raises(RecipeError, match="in use by another taoke process"):
        Run(first.path).hold_lock()
    first.release_lock()


@pytest.mark.slow
def test_two_real_derives_into_one_out(tmp_path):
    """The issue's reproduction with the real CLI: two derives started together; one run, one exit 2."""
    out = tmp_path / "x"
    args = [sys.executable, "-m", "taoke.cli", "derive", "recipes/tabular-cancer.yaml", "--out", str(out), "--quiet",
            "--set", "train.epochs=3"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    assert "Traceback" not in "".join(err for _, err in results)
    assert Run(out).state == "complete" and Run(out).lineage["name"] == "tabular-cancer"
    Run(out).check_model_files()


def test_predict_out_never_replaces_a_run_file(run, tmp_path, taoke_main):
    copy = shutil.copytree(run, tmp_path / "copy")
    rows = iris_rows(tmp_path)
    before = snapshot(copy)
    for target in ("lineage.json", "recipe.yaml", "status.json", "model/taoke.json", "model/new.jsonl"):
        for extra in ((), ("--force",)):
            code, _, err = taoke_main("predict", copy, "--file", rows, "--out", copy / target, *extra)
            assert code == 2 and "is part of the run" in err.replace("\n", ""), (target, err)
    assert snapshot(copy) == before
    code, out, err = taoke_main("runs", "list", "--dir", tmp_path, "--json")
    assert code == 0 and json.loads(out)[0]["state"] == "complete"
    code, _, err = taoke_main("predict", copy, "--file", rows, "--out", copy / "predictions.jsonl")
    assert code == 0, err   # a new file beside the run's own files is fine


def test_predict_out_refuses_an_existing_file_unless_forced(run, tmp_path, taoke_main):
    rows = iris_rows(tmp_path)
    target = tmp_path / "keep.jsonl"
    target.write_text("precious\n")
    code, _, err = taoke_main("predict", run, "--file", rows, "--out", target)
    assert code == 2 and "already exists" in err and "--force" in err and target.read_text() == "precious\n"
    code, _, err = taoke_main("predict", run, "--file", rows, "--out", target, "--force")
    assert code == 0, err
    assert [json.loads(line)["label"] for line in target.read_text().splitlines()]


def test_other_outputs_refuse_existing_files_too(run, tmp_path, taoke_main):
    png = tmp_path / "curves.png"
    png.write_bytes(b"mine")
    code, _, err = taoke_main("runs", "compare", run, run, "--png", png)
    assert code == 2 and "already exists" in err and png.read_bytes() == b"mine"
    code, _, err = taoke_main("runs", "compare", run, run, "--png", png, "--force")
    assert code == 0, err
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_get_the_user_umask(run, tmp_path, taoke_main, umask, mode):
    rows = iris_rows(tmp_path)
    old = os.umask(umask)
    try:
        code, _, err = taoke_main("predict", run, "--file", rows, "--out", tmp_path / "p.jsonl")
    finally:
        os.umask(old)
    assert code == 0, err
    assert stat.S_IMODE((tmp_path / "p.jsonl").stat().st_mode) == mode


def test_run_files_get_the_user_umask(tmp_path):
    old = os.umask(0o027)
    try:
        new_run = iris_run(tmp_path / "fresh")
    finally:
        os.umask(old)
    for f in ("lineage.json", "recipe.yaml", "status.json", "model/model.safetensors", "model/taoke.json", "model"):
        assert stat.S_IMODE((new_run / f).stat().st_mode) == (0o750 if f == "model" else 0o640), f


def test_out_that_cannot_be_a_directory_name(tmp_path, taoke_main):
    code, _, err = taoke_main("derive", "recipes/tabular-cancer.yaml", "--out", tmp_path / ("b" * 300), "--quiet")
    assert code == 2 and "--out" in err and "Traceback" not in err

