"""`taoke runs`: find runs under a folder and summarise them."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

from taoke.utils import write_json_atomic


class MetricsLog:
    """metrics.jsonl: one JSON object per line, flushed as it goes so a crash keeps what was logged."""

    def __init__(self, path: Path):
        self.f = open(path, "a", buffering=1)

    def __call__(self, row: dict) -> None:
        self.f.write(json.dumps(row) + "\n")

    def close(self) -> None:
        self.f.close()


@contextmanager
def running(run_dir: Path):
    """status.json says running while the block runs and failed (with the error) if it raises; yields the log."""
    write_json_atomic(run_dir / "status.json", {"state": "running"})
    log = MetricsLog(run_dir / "metrics.jsonl")
    try:
        yield log
    except BaseException as e:
        write_json_atomic(run_dir / "status.json", {"state": "failed", "error": f"{e.__class__.__name__}: {e}"})
        raise
    finally:
        log.close()


def complete(run_dir: Path, lineage: dict) -> None:
    write_json_atomic(run_dir / "lineage.json", lineage)   # written last: its presence marks a complete run
    write_json_atomic(run_dir / "status.json", {"state": "complete"})


def list_runs(root: Path) -> list[dict]:
    rows = []
    if not root.exists():
        return rows
    for d in sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True):
        status = d / "status.json"
        if not status.exists() and not (d / "lineage.json").exists():
            continue
        state = json.loads(status.read_text()).get("state", "?") if status.exists() else "complete"
        row = {"run": d.name, "path": str(d), "state": state}
        if (d / "lineage.json").exists():
            lin = json.loads((d / "lineage.json").read_text())
            m = lin.get("metrics", {})
            ref = m.get("reference")
            key = next((k for k in ("macro_f1", "accuracy", "r2", "loss") if k in m.get("derived", {})), None)
            row.update(task=lin.get("task"), base=lin["base"]["name"])
            if key:
                row["derived_score"] = f"{key} {m['derived'][key]:.4f}"
                if ref and key in m.get(ref, {}):
                    row["reference_score"] = f"{ref}: {m[ref][key]:.4f}"
        rows.append(row)
    return rows


def compare_runs(runs: list[Path], out_png: Path | None = None) -> dict:
    """Metrics side by side and validation curves overlaid in one PNG."""
    from taoke.errors import TaokeError
    from taoke.evaluate.plots import overlaid_curves_png

    rows, histories = [], {}
    for r in runs:
        if not (r / "lineage.json").exists():
            raise TaokeError(f"{r}: not a complete taoke run (no lineage.json).")
        lin = json.loads((r / "lineage.json").read_text())
        m = lin["metrics"]
        row = {"run": r.name, "task": lin["task"], "base": lin["base"]["name"],
               "adapt": lin["adaptation"].get("method"), "edits": ",".join(e["op"] for e in lin["edits"]) or "-",
               "trainable": lin["adaptation"].get("trainable_params"), **m.get("derived", {})}
        if m.get("reference"):
            row["reference"] = m["reference"]
        rows.append(row)
        epochs = []
        for line in (r / "metrics.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if rec.get("type") == "epoch":
                epochs.append(rec)
        histories[r.name] = epochs
    png = out_png or (runs[0].parent / "compare.png")
    overlaid_curves_png(histories, png)
    return {"runs": rows, "plot": str(png)}
