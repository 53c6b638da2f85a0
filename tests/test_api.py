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


HEAVY = ("torch", "transformers", "peft", "onnx", "onnxruntime", "gguf", "sklearn", "matplotlib", "fastapi")


def test_import_and_help_load_no_model_libraries():
    """`import taoke` and `taoke --help` stay light (they took 6.7 s when the package imported every entry point);
    each command loads its libraries when it runs."""
    code = ("import sys, taoke, taoke.cli; from typer.testing import CliRunner; "
            "r = CliRunner().invoke(taoke.cli.app, ['--help']); assert r.exit_code == 0, r.output; "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_lazy_entry_points_are_the_functions():
    import taoke.derive.classify  # noqa: F401  (an import of the subpackage must not shadow taoke.derive)
    from taoke.inference import load
    from taoke.provenance.endpoint import verify_endpoint
    from taoke.provenance.verify import verify_references
    from taoke.ship import export

    assert callable(taoke.derive) and taoke.derive.__module__ == "taoke.derive"
    assert (taoke.load, taoke.verify, taoke.export, taoke.verify_endpoint) == (load, verify_references, export,
                                                                               verify_endpoint)
    assert "export" in dir(taoke)
    try:
        taoke.no_such_name
    except AttributeError as e:
        assert "no_such_name" in str(e)
    else:
        raise AssertionError("an unknown name must raise AttributeError")


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
