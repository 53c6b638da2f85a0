"""The `taoke` command: a thin Typer app that parses, calls the public API, and prints.

Commands that build and use models live here; disclose-and-verify commands in cli_provenance.py.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from huggingface_hub.utils import disable_progress_bars
from rich.console import Console
from rich.table import Table

from taoke import cli_export, cli_provenance, cli_serve
from taoke.derive import derive as derive_run
from taoke.errors import DataError, TaokeError
from taoke.files import write_jsonl_atomic
from taoke.formats.sealed import resolve_key
from taoke.library import add_model, list_models, registry_path, resolve, weight_files
from taoke.run import Run, check_output, list_runs

# Each command imports the libraries only it needs (models, ONNX, plots) in its body: `taoke --help` and the light
# commands start in about a second instead of loading all of them.

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="taoke (套壳): build task models on open base models, and prove what a model is built on.")
models_app = typer.Typer(no_args_is_help=True, help="The model library: built-in and registered bases.")
runs_app = typer.Typer(no_args_is_help=True, help="Runs made by `taoke derive`.")
app.add_typer(models_app, name="models")
app.add_typer(runs_app, name="runs")
out = Console()
KEY_HELP = "key of a sealed run (or the TAOKE_SEAL_KEY environment variable)"


def print_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, ensure_ascii=False, default=str))


@app.command()
def derive(recipe: Optional[Path] = typer.Argument(None, help="recipe YAML file"),
           out_dir: Optional[Path] = typer.Option(None, "--out", help="run directory (default runs/<name>-<time>)"),
           set_: List[str] = typer.Option([], "--set", help="override a recipe key: --set train.lr=3e-5"),
           quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar, no results table"),
           dry_run: bool = typer.Option(False, "--dry-run", help="print the resulting architecture and parameter "
                                        "counts, then stop"),
           resume: Optional[Path] = typer.Option(None, "--resume", help="continue a killed run from its checkpoint")):
    """Derive a task model from a base as the recipe says; evaluate it against its base."""
    derive_run(recipe, set_, out_dir, quiet=quiet, dry_run=dry_run, resume=resume)


@app.command("eval")
def eval_(model: str = typer.Argument(..., help="run directory or model/ folder"),
          data: Optional[Path] = typer.Option(None, "--data", help="csv/jsonl/parquet file or image folder"),
          split: Optional[str] = typer.Option(None, "--split", help="re-score a split of the run: train|validation|test"),
          as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
          key_file: Optional[Path] = typer.Option(None, "--key-file", help=KEY_HELP)):
    """Score a derived model on new data, or on one of its run's splits."""
    from taoke.inference import load

    result = load(model, key=resolve_key(key_file)).evaluate(data, split)
    if as_json:
        print_json(result)
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
            inputs: List[str] = typer.Argument(None, help="texts, prompts, or image paths"),
            file: Optional[Path] = typer.Option(None, "--file", help="inputs.txt (one per line), csv/jsonl, or prompts"),
            output: Optional[Path] = typer.Option(None, "--out", help="write predictions/completions as JSONL"),
            force: bool = typer.Option(False, "--force", help="overwrite the --out file if it exists"),
            as_json: bool = typer.Option(False, "--json"),
            key_file: Optional[Path] = typer.Option(None, "--key-file", help=KEY_HELP)):
    """Predict with a derived model: labels with probabilities (or completions for language models)."""
    from taoke.inference import load

    if file is None and not inputs:   # before the model loads
        raise DataError("give inputs to predict, or --file FILE")
    if output is not None:
        check_output(output, force)
    predictor = load(model, key=resolve_key(key_file))
    rows = predictor.predict(predictor.read_inputs(file) if file else list(inputs))
    if output is not None:
        write_jsonl_atomic(output, rows)
        Console(stderr=True).print(f"wrote {len(rows)} rows to {output}")
        return
    if as_json or rows and "completion" in rows[0]:
        for r in rows:
            typer.echo(json.dumps(r, ensure_ascii=False))
        return
    table = Table()
    for col in rows[0].keys() if rows else ["input", "label"]:
        table.add_column(col)
    for r in rows:
        table.add_row(*[f"{v:.4f}" if isinstance(v, float) else str(v) for v in r.values()])
    out.print(table)


@app.command("chat")
def chat(model: str = typer.Argument(..., help="model reference: library name, HF directory or run directory"),
         system: str = typer.Option(None, "--system", help="system prompt"),
         max_new_tokens: int = typer.Option(256, "--max-new-tokens"),
         temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy"),
         device: str = typer.Option(None, "--device", help="cpu | cuda (default: cuda when available)"),
         key_file: Optional[Path] = typer.Option(None, "--key-file", help=KEY_HELP)):
    """Chat with a causal language model in the terminal (streams tokens; /reset, /exit)."""
    from taoke.inference.language import load_chat_model
    from taoke.lm.chat import chat_loop

    m, tok = load_chat_model(model, device, key=resolve_key(key_file))
    chat_loop(m, tok, system=system, max_new_tokens=max_new_tokens, temperature=temperature)


@models_app.command("list")
def models_list(as_json: bool = typer.Option(False, "--json")):
    """Built-in bases, from-scratch architectures and registered models."""
    rows = list_models()
    if as_json:
        print_json(rows)
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
    base = resolve(name)
    print_json({"name": base.name, "reference": base.reference, "format": base.format, "kind": base.kind,
                "path": str(base.path) if base.path else None, "source": base.source, "license": base.license,
                "hub_id": base.hub_id, "revision": base.revision, "description": base.description,
                "weights": [str(p) for p in weight_files(base)]})


@models_app.command("add")
def models_add(name: str, path: str, license: Optional[str] = typer.Option(None, "--license"),
               description: str = typer.Option("", "--description")):
    """Register PATH (HF dir, run dir or weight file) under NAME in the user registry."""
    add_model(name, path, license, description)
    out.print(f"registered [bold]{name}[/] -> {Path(path).resolve()} in {registry_path()}")


@runs_app.command("list")
def runs_list(root: Path = typer.Option(Path("runs"), "--dir", help="folder holding runs"),
              as_json: bool = typer.Option(False, "--json")):
    """Runs under a folder, newest first, with their state and headline metrics."""
    rows = list_runs(root)
    if as_json:
        print_json(rows)
        return
    table = Table(title=f"runs in {root}")
    for col in ("run", "state", "task", "base", "reference", "derived"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["run"], r["state"], r.get("task") or "-", r.get("base") or "-", r.get("reference_score", "-"),
                      r.get("derived_score", "-"))
    out.print(table)
    for r in rows:
        if r.get("next"):
            out.print(f"{r['run']} ({r['state']}): {r['next']}", highlight=False)


@runs_app.command("compare")
def runs_compare(runs: List[Path] = typer.Argument(..., help="two or more run directories"),
                 png: Optional[Path] = typer.Option(None, "--png", help="where to write the overlaid curves "
                                                    "(default: compare.png beside the first run)"),
                 force: bool = typer.Option(False, "--force", help="overwrite the PNG if it exists"),
                 as_json: bool = typer.Option(False, "--json")):
    """Runs side by side: metrics table and validation curves overlaid in one PNG."""
    from taoke.evaluate.compare import compare_runs

    png = check_output(png or Path(runs[0]).parent / "compare.png", force)
    result = compare_runs(runs, png)
    if as_json:
        print_json(result)
        return
    metrics = [k for k in ("accuracy", "macro_f1", "mae", "rmse", "r2", "loss") if k in result["runs"][0]]
    table = Table(title="runs compared")
    for col in ["run", "base", "adapt", "edits", "trainable"] + metrics:
        table.add_column(col)
    for r in result["runs"]:
        table.add_row(r["run"], r["base"], str(r["adapt"]), r["edits"], f"{r['trainable'] or 0:,}",
                      *[f"{r[m]:.4f}" if m in r else "-" for m in metrics])
    out.print(table)
    out.print(f"curves: {result['plot']}")


@runs_app.command("show")
def runs_show(run: Path, as_json: bool = typer.Option(False, "--json", help="print state and lineage as JSON")):
    """A run's state and report (the lineage record with --json)."""
    r = Run.open(run)
    if as_json:
        print_json({"run": str(r.path), "status": r.status(), "next": r.next_step(),
                    "lineage": r.lineage if r.complete else None})
        return
    if not r.complete:   # no report yet: say where the run stands and what to do
        status = r.status()
        out.print(f"{run}: {status.get('state')}" + (f" (pid {status['pid']})" if status.get("pid") else ""),
                  highlight=False)
        if status.get("error"):
            out.print(f"error: {status['error']}", highlight=False)
        if r.next_step():
            out.print(f"next: {r.next_step()}", highlight=False)
        return
    out.print(r.report())


cli_provenance.register(app)
cli_export.register(app)
cli_serve.register(app)


def main() -> None:
    if sys.argv[1:2] == ["derive"]:   # training: under mimalloc where it ships (taoke/allocator.py)
        from taoke.allocator import restart_with_mimalloc

        restart_with_mimalloc()
    # Quieter transformers for CLI users: its per-load warnings and download bars are noise here. transformers reads
    # both switches when it is imported (its log level from TRANSFORMERS_VERBOSITY, its bars from huggingface_hub's),
    # so the commands that need it import it themselves, later.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        logging.getLogger("transformers").setLevel(logging.ERROR)
        hf_logging.disable_progress_bar()
    try:
        app()
    except TaokeError as e:
        Console(stderr=True).print(f"[bold red]error:[/] {e}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
