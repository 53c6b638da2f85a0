"""CLI commands for disclose-and-verify: verify, diff, normalize, lineage. `register(app)` adds them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from taoke.provenance.diff import diff
from taoke.provenance.normalize import normalize
from taoke.provenance.tree import lineage_report
from taoke.provenance.verify import summary_lines, verify_references, weights_of
from taoke.run import check_output


def _print_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


def register(app: typer.Typer) -> None:
    @app.command("verify")
    def verify_cmd(a: str = typer.Argument(..., help="the claimed base (library name, directory or weight file)"),
                   b: str = typer.Argument(..., help="the model to check"),
                   as_json: bool = typer.Option(False, "--json", help="print one JSON object")) -> None:
        """Test from the weights whether B derives from A (or both share an ancestor)."""
        res = verify_references(a, b)
        if as_json:
            _print_json(res)
            return
        typer.echo(f"A = {a}\nB = {b}")
        for line in summary_lines(res):
            typer.echo(line)
        typer.echo(f"({res['seconds']:.1f} s)")

    @app.command("diff")
    def diff_cmd(a: str = typer.Argument(..., help="first model"), b: str = typer.Argument(..., help="second model"),
                 out: Optional[Path] = typer.Option(None, "--out", help="write diff.json and diff_heatmap.png here"),
                 force: bool = typer.Option(False, "--force", help="overwrite diff.json / diff_heatmap.png in --out"),
                 as_json: bool = typer.Option(False, "--json", help="print one JSON object")) -> None:
        """Per-layer similarity table, heatmap and what changed between A and B."""
        for name in ("diff.json", "diff_heatmap.png") if out is not None else ():
            check_output(out / name, force)
        report = diff(weights_of(a), weights_of(b), out)
        if as_json:
            _print_json(report)
            return
        table = Table(title=f"{a} -> {b}: {report['verdict']} ({report['relation']}), p={report['p_value']:.3g}")
        for col in ("a", "b", "fingerprint", "similarity", "least_similar", "notes"):
            table.add_column(col)
        for row in report["table"]:
            table.add_row(*[str(row[c]) for c in ("a", "b", "fingerprint", "similarity", "least_similar", "notes")])
        console = Console()
        console.print(table)
        for c in report["changes"] or ["no structural change found"]:
            console.print(f"* {c}")
        if "heatmap" in report:
            console.print(f"heatmap: {report['heatmap']}")

    @app.command("normalize")
    def normalize_cmd(src: str = typer.Argument(..., help="checkpoint with renamed tensors"),
                      dst: Path = typer.Argument(..., help="new directory for the canonical checkpoint")) -> None:
        """Rewrite a checkpoint under its family's canonical names and config; check identical logits."""
        rep = normalize(weights_of(src), dst)
        typer.echo(f"wrote {rep['output']} ({rep['family']}, {rep['tensors']} tensors, "
                   f"{len(rep['renamed'])} renamed); logits on a {rep['probe_tokens']}-token probe: "
                   f"max |diff| = {rep['max_abs_logit_diff']:.3g}")

    @app.command("lineage")
    def lineage_cmd(directory: Path = typer.Argument(..., help="folder to scan for models"),
                    out: Optional[Path] = typer.Option(None, "--out", help="write JSON, mermaid and PNG here"),
                    force: bool = typer.Option(False, "--force", help="overwrite the lineage_tree.* files in --out"),
                    as_json: bool = typer.Option(False, "--json", help="print one JSON object")) -> None:
        """Scan a folder, verify claimed and unclaimed relations, and draw the family tree."""
        for suffix in (".json", ".mmd", ".png") if out is not None else ():
            check_output(out / f"lineage_tree{suffix}", force)
        tree = lineage_report(directory, out)
        if as_json:
            _print_json(tree)
            return
        typer.echo(tree["mermaid"])
        for f in tree["flags"] or ["no undisclosed or contradicted relations"]:
            typer.echo(f"! {f}" if tree["flags"] else f)
        if out is not None:
            typer.echo(f"wrote {out}/lineage_tree.json, .mmd, .png")
