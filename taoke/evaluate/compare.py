"""`taoke runs compare`: runs side by side, metrics table and validation curves overlaid in one PNG."""

from __future__ import annotations

from pathlib import Path

from taoke.errors import TaokeError
from taoke.evaluate.plots import overlaid_curves_png
from taoke.run import Run


def compare_runs(runs: list[Path], out_png: Path | None = None) -> dict:
    rows, histories = [], {}
    for path in runs:
        run = Run(Path(path))
        if not run.complete:
            raise TaokeError(f"{path}: not a complete taoke run (no lineage.json).")
        lin = run.lineage
        row = {"run": run.name, "task": lin["task"], "base": lin["base"]["name"],
               "adapt": lin["adaptation"].get("method"), "edits": ",".join(e["op"] for e in lin["edits"]) or "-",
               "trainable": lin["adaptation"].get("trainable_params"), **lin["metrics"].get("derived", {})}
        if lin["metrics"].get("reference"):
            row["reference"] = lin["metrics"]["reference"]
        rows.append(row)
        histories[run.name] = run.logged("epoch")
    png = out_png or (Path(runs[0]).parent / "compare.png")
    overlaid_curves_png(histories, png)
    return {"runs": rows, "plot": str(png)}
