"""The model card (model/README.md): HF-compatible YAML front-matter plus a short human summary.

When the base is a local directory or file, `base_model` names it and the card also records the
sha256 of its weights, so the claim can be checked (HF tools leave a local path unverifiable).
"""

from __future__ import annotations

import yaml

PIPELINE_TAG = {"text-classification": "text-classification", "image-classification": "image-classification",
                "tabular-classification": "tabular-classification", "tabular-regression": "tabular-regression",
                "causal-lm": "text-generation", "sft": "text-generation", "dpo": "text-generation"}


def _base_model_id(lineage: dict) -> str | None:
    base = lineage["base"]
    if base.get("run"):
        return base["run"]["name"]
    return base.get("hub_id") or base["name"]


def model_card(lineage: dict, report_rows: list[tuple[str, dict]], metric_names: list[str],
               library: str) -> str:
    base = lineage["base"]
    meta: dict = {}
    base_id = _base_model_id(lineage)
    if base["format"] != "scratch":
        meta["base_model"] = base_id
        meta["base_model_relation"] = lineage["relation"]
    meta["license"] = lineage.get("license") or "unknown"
    meta["library_name"] = library
    meta["pipeline_tag"] = PIPELINE_TAG.get(lineage["task"], lineage["task"])
    meta["tags"] = ["taoke", lineage["task"]] + (["from-scratch"] if base["format"] == "scratch" else [])
    # HF expects dataset ids here; local files are named by file name (full paths and sha256 are in lineage.json).
    meta["datasets"] = sorted({f["path"].rstrip("/").rsplit("/", 1)[-1] for src in lineage["data"]["files"].values()
                               for f in src})
    derived = dict(report_rows).get("derived", {})
    meta["model-index"] = [{
        "name": lineage["name"],
        "results": [{
            "task": {"type": meta["pipeline_tag"]},
            "dataset": {"name": meta["datasets"][0] if meta["datasets"] else "unknown", "type": "local",
                        "split": "test"},
            "metrics": [{"type": k, "value": round(float(derived[k]), 4)} for k in metric_names if k in derived],
        }],
    }]
    meta["taoke"] = {
        "data_sha256": {f["path"].rstrip("/").rsplit("/", 1)[-1]: f["sha256"]
                        for src in lineage["data"]["files"].values() for f in src},
        "base": {"name": base["name"], "source": base["source"], "format": base["format"],
                 "weights_sha256": {w["path"].rsplit("/", 1)[-1]: w["sha256"] for w in base["weights"]}},
        "parents": [p.get("name") for p in lineage["parents"]],
        "recipe_sha256": lineage["recipe_sha256"],
        "lineage": "../lineage.json",
    }
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    lines = ["---", front.rstrip(), "---", "", f"# {lineage['name']}", ""]
    if base["format"] == "scratch":
        lines.append(f"Trained from scratch ({base['name']}) with taoke {lineage['taoke_version']}; no pretrained base.")
    else:
        lines.append(f"Derived from **{base_id}** ({base['source']}) by **{lineage['relation']}** with taoke "
                     f"{lineage['taoke_version']}. Task: {lineage['task']}.")
    if lineage["edits"]:
        lines += ["", "Structure edits: " + "; ".join(e["op"] for e in lineage["edits"]) + "."]
    ad = lineage["adaptation"]
    lines += ["", f"Adaptation: {ad.get('method')} ({ad.get('trainable_params', 0):,} of "
                  f"{ad.get('total_params', 0):,} parameters trained)."]
    lines += ["", "## Evaluation (test split)", "", "| model | " + " | ".join(metric_names) + " |",
              "|---|" + "---|" * len(metric_names)]
    for name, m in report_rows:
        lines.append(f"| {name} | " + " | ".join(f"{m[k]:.4f}" if k in m else "-" for k in metric_names) + " |")
    lines += ["", "Full record: `lineage.json` in the run directory.", ""]
    return "\n".join(lines)
