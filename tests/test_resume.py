"""A real run killed with SIGKILL resumes with `taoke derive --resume` and ends with the same metrics."""

import os
import signal
import subprocess
import sys
import time

from conftest import ROOT, read_json, run_cli

ARGS = ["--set", "train.epochs=6", "--set", "train.checkpoint_every=5", "--set", "train.precision=fp32",
        "--set", "data.max_rows=220", "--quiet"]


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    straight = tmp_path / "straight"
    run_cli("derive", "recipes/text-lstm.yaml", "--out", straight, *ARGS)

    killed = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "taoke.cli", "derive", "recipes/text-lstm.yaml", "--out", killed,
                             *ARGS], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = killed / "checkpoints" / "last.pt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        metrics = killed / "metrics.jsonl"
        # kill once a few checkpoints exist: mid-training, possibly mid-write
        if ckpt.exists() and metrics.exists() and metrics.read_text().count('"type": "step"') >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "run finished before it could be killed; make it longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "lineage.json").exists()
    assert read_json(killed / "status.json")["state"] == "running"

    run_cli("derive", "--resume", killed, "--quiet")
    a, b = read_json(straight / "lineage.json"), read_json(killed / "lineage.json")
    assert a["metrics"]["derived"] == b["metrics"]["derived"]
    assert read_json(killed / "status.json")["state"] == "complete"
    epochs = [l for l in (killed / "metrics.jsonl").read_text().splitlines() if '"type": "epoch"' in l]
    assert len(epochs) == len([l for l in (straight / "metrics.jsonl").read_text().splitlines()
                               if '"type": "epoch"' in l])


def test_resume_refuses_complete_or_fresh_runs(tmp_path):
    proc = run_cli("derive", "--resume", tmp_path, check=False)
    assert proc.returncode == 2 and "not a taoke run directory" in proc.stderr
