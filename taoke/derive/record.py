"""lineage.json: what a derived model is built on, how, from which data, and how it scored."""

from __future__ import annotations

import os
from datetime import datetime, timezone

from taoke.files import sha256_file
from taoke.hardware import peak_rss_mb, runtime_record
from taoke.library import BaseRef, weight_files
from taoke.run import Run
from taoke.version import __version__

SCHEMA = "taoke.lineage/1"


def base_record(base: BaseRef) -> dict:
    weights = [{"path": str(p), "bytes": os.path.getsize(p), "sha256": sha256_file(p)} for p in weight_files(base)]
    rec = {"name": base.name, "reference": base.reference, "source": base.source, "format": base.format,
           "license": base.license, "hub_id": base.hub_id, "revision": base.revision, "weights": weights}
    if base.is_run:
        lin = base.lineage or {}
        rec["run"] = {"name": lin.get("name"), "dir": str(base.run_dir), "task": lin.get("task"),
                      "lineage_sha256": Run(base.run_dir).lineage_sha256()}
    return rec


def parent_chain(base: BaseRef) -> list[dict]:
    """Ancestors nearest first: the parent run (if any), its parents, ..., ending at the first base."""
    if not base.is_run:
        return [] if base.is_scratch else [{"name": base.name, "source": base.source, "kind": "base"}]
    lin = base.lineage or {}
    me = {"name": lin.get("name"), "source": base.source, "kind": "run", "relation": lin.get("relation"),
          "lineage_sha256": Run(base.run_dir).lineage_sha256()}
    return [me] + list(lin.get("parents", []))


def root_base(base: BaseRef) -> dict | None:
    """The first pretrained base up the chain (for the card's base_model when deriving from a run)."""
    if base.is_run:
        return (base.lineage or {}).get("root_base")
    if base.is_scratch:
        return None
    return {"name": base.name, "hub_id": base.hub_id, "source": base.source, "license": base.license}


def runtime_section(device, *, precision: dict | None, seconds: float, **figures) -> dict:
    """lineage.json's `runtime`: the machine and libraries, the precision chosen and the measurement that chose
    it, and how fast training ran (figures such as tokens_per_s, compiled), with the process's peak RSS."""
    return {**runtime_record(device), "precision": precision, "train_seconds": round(seconds, 2),
            **{k: round(v, 2) if isinstance(v, float) else v for k, v in figures.items()},
            "peak_rss_mb": peak_rss_mb()}


def build_lineage(*, name: str, run_id: str, task: str, base: BaseRef, relation: str, edits: list[dict],
                  adaptation: dict, data: dict, recipe_sha256: str, metrics: dict, license: str | None,
                  runtime: dict | None = None) -> dict:
    return {
        "schema": SCHEMA,
        "name": name,
        "run_id": run_id,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "taoke_version": __version__,
        "task": task,
        "base": base_record(base),
        "relation": relation,
        "license": license,
        "edits": edits,
        "adaptation": adaptation,
        "data": data,
        "recipe_sha256": recipe_sha256,
        "metrics": metrics,
        "root_base": root_base(base),
        "parents": parent_chain(base),
        "runtime": runtime,
    }
