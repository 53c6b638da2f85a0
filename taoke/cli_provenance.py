"""CLI commands for disclose-and-verify: verify, diff, normalize, lineage, sign, verify-signature.
`register(app)` adds them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from taoke.errors import ModelError
from taoke.run import check_output

# each command imports its provenance module in its body: the other commands need not load them


def _print_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


def register(app: typer.Typer) -> None:
    @app.command("verify")
    def verify_cmd(a: str = typer.Argument(..., help="the claimed base (library name, directory or weight file)"),
                   b: Optional[str] = typer.Argument(None, help="the model to check (omit with --endpoint)"),
                   parent: list[str] = typer.Option([], "--parent",
                                                     help="another candidate parent (repeat): is B a merge of A "
                                                          "and these, with what weights?"),
                   endpoint: Optional[str] = typer.Option(None, "--endpoint",
                                                          help="API base of an OpenAI-compatible server (e.g. "
                                                               "http://127.0.0.1:8000/v1): test the model behind it "
                                                               "against A from its answers (weights unseen)"),
                   control: list[str] = typer.Option([], "--control", help="with --endpoint: a model unrelated to A "
                                                     "for the control panel (repeat; at least one)"),
                   model: Optional[str] = typer.Option(None, "--model", help="with --endpoint: the model id "
                                                       "(default: the endpoint's only model)"),
                   api: str = typer.Option("chat", "--api", help="with --endpoint: chat | completions"),
                   prompts: Optional[Path] = typer.Option(None, "--prompts", help="with --endpoint: prompt file, "
                                                          "one a line (default: the built-in probe set)"),
                   n_prompts: int = typer.Option(64, "--n-prompts", help="with --endpoint: prompts to send"),
                   max_tokens: int = typer.Option(32, "--max-tokens", help="with --endpoint: tokens per answer"),
                   rps: float = typer.Option(4.0, "--rps", help="with --endpoint: at most this many requests/s"),
                   api_key: Optional[str] = typer.Option(None, "--api-key", envvar="TAOKE_API_KEY",
                                                         help="with --endpoint: bearer key (or TAOKE_API_KEY)"),
                   as_json: bool = typer.Option(False, "--json", help="print one JSON object")) -> None:
        """Test from the weights whether B derives from A (or both share an ancestor); with --endpoint, test the
        model behind an API from its answers."""
        if endpoint is not None and (b is not None or parent):
            raise ModelError("with --endpoint give one model, the claimed base: taoke verify --endpoint URL A "
                             "--control C [--control D ...]")
        if endpoint is None and b is None:
            raise ModelError("give two models (taoke verify A B), or one with --endpoint URL")
        # Each path imports its engine after the checks above: an argument error answers before torch loads.
        if endpoint is not None:
            from taoke.provenance.endpoint import verify_endpoint

            res = verify_endpoint(endpoint, a, control, model=model, prompts_file=prompts, n_prompts=n_prompts,
                                  max_tokens=max_tokens, api=api, api_key=api_key, rps=rps, progress=not as_json)
        else:
            from taoke.provenance.verify import verify_references

            res = verify_references(a, b)
        from taoke.provenance.merge import merge_lines, merge_report
        from taoke.provenance.verify import summary_lines

        if parent:
            res["merge"] = merge_report(b, [a, *parent])
        if as_json:
            _print_json(res)
            return
        typer.echo(f"A = {a}\nB = {res['b'] if endpoint else b}")
        for line in summary_lines(res):
            typer.echo(line)
        if parent:
            for line in merge_lines(res["merge"]):
                typer.echo(line)
        typer.echo(f"({res['seconds']:.1f} s)")

    @app.command("diff")
    def diff_cmd(a: str = typer.Argument(..., help="first model"), b: str = typer.Argument(..., help="second model"),
                 out: Optional[Path] = typer.Option(None, "--out", help="write diff.json and diff_heatmap.png here"),
                 force: bool = typer.Option(False, "--force", help="overwrite diff.json / diff_heatmap.png in --out"),
                 as_json: bool = typer.Option(False, "--json", help="print one JSON object")) -> None:
        """Per-layer similarity table, heatmap and what changed between A and B."""
        from taoke.provenance.diff import diff
        from taoke.provenance.verify import weights_of

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
        from taoke.provenance.normalize import normalize
        from taoke.provenance.verify import weights_of

        rep = normalize(weights_of(src), dst)
        typer.echo(f"wrote {rep['output']} ({rep['family']}, {rep['tensors']} tensors, "
                   f"{len(rep['renamed'])} renamed); logits on a {rep['probe_tokens']}-token probe: "
                   f"max |diff| = {rep['max_abs_logit_diff']:.3g}")

    @app.command("lineage")
    def lineage_cmd(directory: Path = typer.Argument(..., help="folder to scan for models"),
                    out: Optional[Path] = typer.Option(None, "--out", help="write JSON, mermaid and PNG here"),
                    force: bool = typer.Option(False, "--force", help="overwrite the lineage_tree.* files in --out"),
                    key: Optional[Path] = typer.Option(None, "--key", help="public key (PEM): verify signed nodes"),
                    as_json: bool = typer.Option(False, "--json", help="print one JSON object")) -> None:
        """Scan a folder, verify claimed and unclaimed relations, and draw the family tree (signed nodes marked)."""
        from taoke.provenance.tree import lineage_report

        for suffix in (".json", ".mmd", ".png") if out is not None else ():
            check_output(out / f"lineage_tree{suffix}", force)
        tree = lineage_report(directory, out, public_key=key)
        if as_json:
            _print_json(tree)
            return
        typer.echo(tree["mermaid"])
        for f in tree["flags"] or ["no undisclosed or contradicted relations"]:
            typer.echo(f"! {f}" if tree["flags"] else f)
        if out is not None:
            typer.echo(f"wrote {out}/lineage_tree.json, .mmd, .png")

    @app.command("sign")
    def sign_cmd(run: Path = typer.Argument(..., help="complete run or export directory"),
                 key: Path = typer.Option(..., "--key", help="EC private key (PEM; openssl ecparam -name prime256v1 "
                                          "-genkey -noout -out key.pem)")) -> None:
        """Sign a run's record (weights, lineage.json, card, recipe, report) with model-signing; writes model.sig."""
        from taoke.provenance.signature import sign_run

        res = sign_run(run, key)
        typer.echo(f"signed {res['files']} files of {res['run']}: {res['signature']}")

    @app.command("verify-signature")
    def verify_signature_cmd(run: Path = typer.Argument(..., help="signed run or export directory"),
                             key: Path = typer.Option(..., "--key", help="the signer's EC public key (PEM)"),
                             as_json: bool = typer.Option(False, "--json", help="print one JSON object")) -> None:
        """Check a run's signature and that no signed file changed (exit 2 if either fails)."""
        from taoke.provenance.signature import verify_run_signature

        res = verify_run_signature(run, key)
        if as_json:
            _print_json(res)
            return
        typer.echo(f"verified: {res['files']} files of {res['run']} are as signed")
