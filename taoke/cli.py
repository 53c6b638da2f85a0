"""The `taoke` command: a thin Typer app that parses, calls the library, and prints."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from taoke.errors import TaokeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="taoke (套壳): build task models on open base models, and prove what a model is built on.")
models_app = typer.Typer(no_args_is_help=True, help="The model library: built-in and registered bases.")
runs_app = typer.Typer(no_args_is_help=True, help="Runs made by `taoke derive`.")
app.add_typer(models_app, name="models")
app.add_typer(runs_app, name="runs")
out = Console()


@app.command()
def derive(recipe: Optional[Path] = typer.Argument(None, help="recipe YAML file"),
           out_dir: Optional[Path] = typer.Option(None, "--out", help="run directory (default runs/<name>-<time>)"),
           set_: List[str] = typer.Option([], "--set", help="override a recipe key: --set train.lr=3e-5"),
           quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
           dry_run: bool = typer.Option(False, "--dry-run", help="print the resulting architecture and parameter "
                                        "counts, then stop"),
           resume: Optional[Path] = typer.Option(None, "--resume", help="continue a killed run from its checkpoint")):
    """Derive a task model from a base as the recipe says; evaluate it against its base."""
    from taoke.derive import derive as run_derive

    if (recipe is None) == (resume is None):
        raise TaokeError("give a RECIPE to start a run, or --resume RUN to continue one")
    run_derive(str(recipe) if recipe else "", str(out_dir) if out_dir else None, set_, quiet=quiet, dry_run=dry_run,
               resume=str(resume) if resume else None)


@app.command("eval")
def eval_(model: str = typer.Argument(..., help="run directory or model/ folder"),
          data: Optional[Path] = typer.Option(None, "--data", help="csv/jsonl/parquet file or image folder"),
          split: Optional[str] = typer.Option(None, "--split", help="re-score a split of the run: train|validation|test"),
          as_json: bool = typer.Option(False, "--json", help="print one JSON object")):
    """Score a derived model on new data, or on one of its run's splits."""
    from taoke.predict import evaluate_model

    result = evaluate_model(model, str(data) if data else None, split)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    table = Table(title=f"{result['model']} on {result['data']} ({result['rows']} rows)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in result["metrics"].items():
        if not isinstance(v, dict):
            table.add_row(k, f"{v:.4f}")
    out.print(table)


@app.command()
def predict(model: str = typer.Argument(..., help="run directory or model/ folder"),
            inputs: List[str] = typer.Argument(None, help="texts, or image paths"),
            file: Optional[Path] = typer.Option(None, "--file", help="inputs.txt (one per line), csv/jsonl, or prompts"),
            output: Optional[Path] = typer.Option(None, "--out", help="write predictions/completions as JSONL"),
            as_json: bool = typer.Option(False, "--json")):
    """Predict with a derived model: labels with probabilities (or completions for language models)."""
    from taoke.predict import predict_inputs

    rows = predict_inputs(model, list(inputs or []), str(file) if file else None, str(output) if output else None)
    if as_json or output is None and rows and "completion" in rows[0]:
        for r in rows:
            print(json.dumps(r, ensure_ascii=False))
        return
    table = Table()
    for col in rows[0].keys() if rows else ["input", "label"]:
        table.add_column(col)
    for r in rows:
        table.add_row(*[f"{v:.4f}" if isinstance(v, float) else str(v) for v in r.values()])
    out.print(table)


@models_app.command("list")
def models_list(as_json: bool = typer.Option(False, "--json")):
    """Built-in bases, from-scratch architectures and registered models."""
    from taoke.library import list_models

    rows = list_models()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="taoke model library")
    for col in ("name", "kind", "format", "license", "source", "description"):
        table.add_column(col)
    for r in rows:
        table.add_row(*[str(r[c]) for c in ("name", "kind", "format", "license", "source", "description")])
    out.print(table)


@models_app.command("show")
def models_show(name: str):
    """Where a model reference resolves to, and what it is."""
    from taoke.library import resolve, weight_files

    base = resolve(name)
    info = {"name": base.name, "format": base.format, "kind": base.kind, "path": str(base.path) if base.path else None,
            "source": base.source, "license": base.license, "hub_id": base.hub_id, "description": base.description,
            "weights": [str(p) for p in weight_files(base)]}
    print(json.dumps(info, indent=2))


@models_app.command("add")
def models_add(name: str, path: str, license: Optional[str] = typer.Option(None, "--license"),
               description: str = typer.Option("", "--description")):
    """Register PATH (HF dir, run dir or weight file) under NAME in the user registry."""
    from taoke.library import add_model
    from taoke.library.registry import registry_path

    add_model(name, path, license, description)
    out.print(f"registered [bold]{name}[/] -> {Path(path).resolve()} in {registry_path()}")


@runs_app.command("list")
def runs_list(root: Path = typer.Option(Path("runs"), "--dir", help="folder holding runs"),
              as_json: bool = typer.Option(False, "--json")):
    """Runs under a folder, newest first, with their state and headline metrics."""
    from taoke.runs import list_runs

    rows = list_runs(root)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"runs in {root}")
    for col in ("run", "state", "task", "base", "reference", "derived"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["run"], r["state"], r.get("task", "-"), r.get("base", "-"), r.get("reference_score", "-"),
                      r.get("derived_score", "-"))
    out.print(table)


@runs_app.command("compare")
def runs_compare(runs: List[Path] = typer.Argument(..., help="two or more run directories"),
                 png: Optional[Path] = typer.Option(None, "--png", help="where to write the overlaid curves"),
                 as_json: bool = typer.Option(False, "--json")):
    """Runs side by side: metrics table and validation curves overlaid in one PNG."""
    from taoke.runs import compare_runs

    result = compare_runs(runs, png)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    metrics = [k for k in ("accuracy", "macro_f1", "mae", "rmse", "r2") if k in result["runs"][0]]
    table = Table(title="runs compared")
    for col in ["run", "base", "adapt", "edits", "trainable"] + metrics:
        table.add_column(col)
    for r in result["runs"]:
        table.add_row(r["run"], r["base"], str(r["adapt"]), r["edits"], f"{r['trainable']:,}",
                      *[f"{r[m]:.4f}" if m in r else "-" for m in metrics])
    out.print(table)
    out.print(f"curves: {result['plot']}")


@runs_app.command("show")
def runs_show(run: Path):
    """Print a run's report."""
    report = run / "report.md"
    if not report.exists():
        raise TaokeError(f"{run}: no report.md (not a complete taoke run; see {run}/status.json).")
    out.print(report.read_text())


def _register_optional() -> None:
    """Commands from modules that may be absent in a partial install register themselves here."""
    import importlib

    for module in ("taoke.cli_lineage", "taoke.cli_lm"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name == module:
                continue
            raise
        mod.register(app)


_register_optional()


def main() -> None:
    try:
        app()
    except TaokeError as e:
        Console(stderr=True).print(f"[bold red]error:[/] {e}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
