"""The public Python API, used the way README shows it: the README's example runs as written, and a run made
through the API carries the same record as one made by the CLI."""

import os
import re
import subprocess
import sys

import pandas as pd
from conftest import ROOT

import taoke


def test_all_lists_the_api():
    assert {"derive", "load", "verify", "Recipe", "Run", "load_recipe"} <= set(taoke.__all__)
    assert all(hasattr(taoke, name) for name in taoke.__all__)


def test_readme_api_example_runs_as_written(tmp_path):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    for name in ("recipes", "data"):  # the example's relative paths, in a fresh working directory
        (tmp_path / name).symlink_to(ROOT / name)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    reference, f1 = lines[0].rsplit(" ", 1)
    assert reference == "base (linear probe)" and 0.0 < float(f1) <= 1.0
    assert lines[1] == "pkg:minilm-l6 finetune"
    labels = sorted(set(pd.read_csv(ROOT / "data" / "chatterbot" / "topics.csv")["label"]))
    assert lines[2] in labels
    assert 0.0 < float(lines[3]) <= 1.0
    assert lines[4] == "derived finetune"
    assert (tmp_path / "runs" / "topics-api" / "lineage.json").is_file()
