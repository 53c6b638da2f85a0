"""CLI command `taoke export`; `register(app)` adds it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export_cmd(run: Path = typer.Argument(..., help="a complete run directory (or its model/ folder)"),
                   format: str = typer.Option(..., "--format", "-f", help="gguf (causal LMs: llama.cpp, Ollama) | "
                                              "onnx (classifiers, regressors: ONNX Runtime) | hf (transformers)"),
                   quant: Optional[str] = typer.Option(None, "--quant", help="gguf: F32 F16 BF16 Q8_0 Q5_1 Q5_0 "
                                                       "Q4_1 Q4_0 (default F16); onnx: int8; hf: F16 BF16"),
                   out: Optional[Path] = typer.Option(None, "--out", help="new directory for the export (default "
                                                      "<run>-<format>[-<quant>] beside the run)"),
                   no_check: bool = typer.Option(False, "--no-check", help="skip the check against the run's "
                                                 "model in the target runtime (recorded as unchecked)"),
                   gptq: bool = typer.Option(False, "--gptq", help="gguf Q4_0: choose the 4-bit codes by GPTQ on "
                                             "64 of the run's training examples, then tune the norm gains to "
                                             "them (minutes; closer to the trained model) instead of rounding "
                                             "each weight to nearest"),
                   as_json: bool = typer.Option(False, "--json", help="print the export's lineage record")) -> None:
        """Export a derived model (GGUF / ONNX / HF), check it in its runtime, record it as a derivation."""
        from taoke.ship import export   # here, not at the top: the other commands need not load the exporters

        exp = export(run, format, quant, out, check=not no_check, quiet=as_json, gptq=gptq)
        if as_json:
            typer.echo(json.dumps(exp.lineage, indent=2, default=str))
            return
        Console(stderr=True).print(f"export: [bold]{exp.path}[/] ({exp.lineage['relation']}; "
                                   f"{exp.lineage['export']['file']})")
