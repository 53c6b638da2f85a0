"""A real run killed with SIGKILL resumes with `taoke derive --resume` and ends with the same metrics."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

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


# fp32 fixed: two runs that each measured bf16 vs fp32 could choose differently on a CPU where they are close
LM_ARGS = ["--set", "train.max_steps=8", "--set", "train.checkpoint_every=2", "--set", "data.max_rows=48",
           "--set", "adapt.dropout=0.1", "--set", "train.precision=fp32", "--set", "lm.gen_prompts=1",
           "--set", "lm.max_new_tokens=8", "--quiet"]


def kill_after_checkpoint(out, args, steps_logged=3):
    """Start `taoke derive` and SIGKILL it once a checkpoint exists and `steps_logged` steps are in its log."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "taoke.cli", "derive", *args, "--out", out], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        metrics = out / "metrics.jsonl"
        if (out / "checkpoints" / "last.pt").exists() and metrics.exists() and \
                metrics.read_text().count('"type": "step"') >= steps_logged:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "run finished before it could be killed; make it longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def step_losses(run):
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if r.get("type") == "step"]


@pytest.mark.slow
def test_sigkilled_lora_sft_resumes_to_the_same_model_bit_for_bit(tmp_path):
    """LoRA SFT (with dropout, so the RNG matters) killed mid-training and resumed ends with the same held-out
    loss, the same per-step losses and the same weights as a run never stopped."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_cli("derive", "recipes/sft-lora.yaml", "--out", straight, *LM_ARGS)
    kill_after_checkpoint(killed, ["recipes/sft-lora.yaml", *LM_ARGS])
    assert not (killed / "lineage.json").exists() and (killed / "checkpoints" / "last.pt").exists()
    listed = json.loads(run_cli("runs", "show", killed, "--json").stdout)
    assert listed["status"]["state"] == "interrupted" and "--resume" in listed["next"]

    run_cli("derive", "--resume", killed, "--quiet")
    a, b = read_json(straight / "lineage.json"), read_json(killed / "lineage.json")
    assert b["metrics"]["derived"]["loss"] == a["metrics"]["derived"]["loss"]
    assert step_losses(killed) == step_losses(straight) and len(step_losses(killed)) == 8
    shards = [f for f in a["model_files"] if f.endswith(".safetensors")]
    assert shards and all(b["model_files"][f]["sha256"] == a["model_files"][f]["sha256"] for f in shards)
    assert b["runtime"]["precision"]["reason"] == "kept from before the run was resumed"
    assert not (killed / "checkpoints").exists()
