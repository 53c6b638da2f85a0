"""`taoke runs`: find runs under a folder and summarise them."""

from __future__ import annotations

import json
from pathlib import Path


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
