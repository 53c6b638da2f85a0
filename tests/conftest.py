import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ROOT / "data" / "chatterbot" / "topics.csv"


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Each test gets its own model registry; no hub access."""
    monkeypatch.setenv("TAOKE_HOME", str(tmp_path / "taoke-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory, request):
    """A scratch folder for one module's shared fixtures, deleted when the module is done: the suite writes several
    GB of runs, exports and derived models, more than a small CI disk holds if every folder lives to the end."""
    path = tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2])
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run_cli(*args, cwd=None, check=True, env_extra=None):
    """Run the real `taoke` CLI in a subprocess; returns CompletedProcess."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", **(env_extra or {})}
    proc = subprocess.run([sys.executable, "-m", "taoke.cli", *map(str, args)], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"taoke {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def read_json(path):
    return json.loads(Path(path).read_text())


@pytest.fixture
def taoke_main(monkeypatch, capsys):
    """The real entry point (taoke.cli:main) in this process: returns (exit code, stdout, stderr)."""
    from taoke.cli import main

    def invoke(*args):
        monkeypatch.setattr(sys, "argv", ["taoke", *map(str, args)])
        monkeypatch.setenv("COLUMNS", "200")
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return invoke
