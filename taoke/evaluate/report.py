"""report.md: base and derived side by side on the same test split, with the delta."""

from __future__ import annotations


def comparison_table(rows: list[tuple[str, dict]], metrics: list[str], reference: str | None) -> list[str]:
    """Markdown table; the last column is derived minus the reference row (the base or parent)."""
    ref = dict(rows).get(reference) if reference else None
    derived = dict(rows).get("derived")
    head = "| model | " + " | ".join(metrics) + " |"
    out = [head, "|---|" + "---:|" * len(metrics)]
    for name, m in rows:
        out.append(f"| {name} | " + " | ".join(f"{m[k]:.4f}" if k in m else "-" for k in metrics) + " |")
    if ref and derived:
        deltas = [f"{derived[k] - ref[k]:+.4f}" if k in derived and k in ref else "-" for k in metrics]
        out.append(f"| **delta (derived - {reference})** | " + " | ".join(deltas) + " |")
    return out


def render_report(*, lineage: dict, rows: list[tuple[str, dict]], metrics: list[str], reference: str | None,
                  notes: list[str], per_class: dict | None, fit: dict, plots: list[str],
                  k_fold: dict | None = None) -> str:
    base = lineage["base"]
    lines = [f"# {lineage['name']}", "",
             f"- task: {lineage['task']}",
             f"- base: {base['name']} ({base['source']})" + (" — trained from scratch" if base["format"] == "scratch" else ""),
             f"- relation: {lineage['relation']}",
             f"- adaptation: {lineage['adaptation'].get('method')} "
             f"({lineage['adaptation'].get('trainable_params', 0):,} / {lineage['adaptation'].get('total_params', 0):,} "
             "parameters trained)",
             f"- edits: {', '.join(e['op'] for e in lineage['edits']) or 'none'}",
             f"- data rows: {lineage['data']['rows']}",
             f"- training: {fit['epochs_run']} epochs, {fit['seconds']:.1f} s, {fit['samples_per_s']:.0f} samples/s, "
             f"best epoch {fit['best_epoch']} by {fit['monitor']}, {fit.get('precision', 'fp32')}", "",
             "## Base vs derived on the same test split", ""]
    lines += comparison_table(rows, metrics, reference)
    lines += [""] + [f"- {n}" for n in notes]
    if k_fold:
        lines += ["", f"## {k_fold['k']}-fold cross-validation (train + validation rows, a fresh model per fold)", "",
                  "| metric | mean ± std | folds |", "|---|---:|---|"]
        for m, mean in k_fold["mean"].items():
            folds = ", ".join(f"{f[m]:.3f}" for f in k_fold["folds"])
            lines.append(f"| {m} | {mean:.4f} ± {k_fold['std'][m]:.4f} | {folds} |")
    if per_class:
        lines += ["", "## Derived model per class", "", "| class | precision | recall | f1 | support |",
                  "|---|---:|---:|---:|---:|"]
        for name, m in per_class.items():
            lines.append(f"| {name} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}](plots/{p})" for p in plots]
    lines.append("")
    return "\n".join(lines)
