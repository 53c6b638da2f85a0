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


def compression_table(rows: list[tuple[str, dict]], metrics: list[str]) -> list[str]:
    """Scores, parameter count and measured latency of the model before and after width pruning."""
    out = ["| model | " + " | ".join(metrics) + " | parameters | latency p50 (ms) | speed-up |",
           "|---|" + "---:|" * (len(metrics) + 3)]
    first = rows[0][1]["ms_p50"]
    for name, m in rows:
        out.append(f"| {name} | " + " | ".join(f"{m[k]:.4f}" if k in m else "-" for k in metrics)
                   + f" | {m['params']:,} | {m['ms_p50']:.2f} | {first / m['ms_p50']:.2f}x |")
    m = rows[0][1]
    out += ["", f"Latency: one row per forward (batch 1), median of {m['repeats']} passes over {m['rows']} test rows, "
                f"fp32 on {m['device']} with {m['threads']} threads, measured while the run ran."]
    return out


def kernel_note(k: dict | None) -> str:
    """'; ATen kernels: AVX512, oneDNN capped at AVX2' (runs before 2026-12-05 recorded no kernels)."""
    if not k:
        return ""
    cap = k.get("onednn_isa_cap")
    return f"; ATen kernels: {k['aten']}" + (f", oneDNN capped at {cap}" if cap else "")


def runtime_lines(runtime: dict | None) -> list[str]:
    """'How it ran' section: machine, threads, precision and why, speed, memory, versions."""
    if not runtime:
        return []
    p = runtime.get("precision") or {}
    measured = p.get("measured") or {}
    timing = (f" (fp32 {measured['fp32_s']:.3f} s vs bf16 {measured['bf16_s']:.3f} s per step on a slice of the "
              "first batch)") if "fp32_s" in measured else (f" ({measured['probe']})" if measured else "")
    speed = ", ".join(f"{runtime[k]:,.1f} {unit}" for k, unit in (("tokens_per_s", "non-padding tokens/s"),
                                                                 ("samples_per_s", "samples/s")) if k in runtime)
    extras = [f"decoder layers compiled: {'yes' if runtime['compiled'] else 'no'}"] if "compiled" in runtime else []
    if runtime.get("fused_lora_layers") is not None:
        extras.append(f"fused LoRA forward on {runtime['fused_lora_layers']} layers")
    versions = ", ".join(f"{k} {v}" for k, v in (runtime.get("versions") or {}).items() if v)
    return ["", "## How it ran", "",
            f"- device: {runtime['device']}" + (f" ({runtime['gpu']})" if runtime.get("gpu") else "")
            + f"; CPU {runtime['cpu']}, {runtime['cores']} cores, {runtime['threads']} threads; kernel flags: "
            + (", ".join(runtime["cpu_flags"]) or "none of AVX2/AVX512/AMX") + kernel_note(runtime.get("kernels")),
            f"- precision: {p.get('precision', '?')}, {p.get('reason', '')}{timing}",
            f"- training: {runtime['train_seconds']:.1f} s" + (f", {speed}" if speed else "")
            + (f"; {'; '.join(extras)}" if extras else ""),
            f"- peak RSS of the run's process: {runtime['peak_rss_mb']:,.0f} MB"
            + (f" (allocator: {runtime['allocator']})" if runtime.get("allocator") else ""),
            f"- versions: {versions}"]


def render_report(*, lineage: dict, rows: list[tuple[str, dict]], metrics: list[str], reference: str | None,
                  notes: list[str], per_class: dict | None, fit: dict, plots: list[str],
                  k_fold: dict | None = None, compression: list[tuple[str, dict]] | None = None) -> str:
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
    if compression:
        lines += ["", "## Pruning: before, pruned before healing, derived (same test split)", ""]
        lines += compression_table(compression, metrics)
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
    lines += runtime_lines(lineage.get("runtime"))
    lines.append("")
    return "\n".join(lines)


def render_lm_report(lineage: dict, rows: list[tuple[str, dict]], metrics: list[str], reference: str,
                     base_scores: dict, derived_scores: dict, hist, parity: dict,
                     compression: list[tuple[str, dict]] | None = None) -> str:
    """report.md of a language-model run: scores on the same held-out examples, parity, sample generations."""
    same = sum(g["identical"] for g in parity.get("generations", []))
    lines = [f"# {lineage['name']}", "", f"- task: {lineage['task']}",
             f"- base: {lineage['base']['name']} ({lineage['base']['source']})",
             f"- adaptation: {lineage['adaptation'].get('method')} "
             f"({lineage['adaptation'].get('trainable_params') or 0:,} trainable parameters)",
             f"- edits: {', '.join(e['op'] for e in lineage['edits']) or 'none'}",
             f"- examples: {lineage['data']['rows']}",
             f"- training: {len(hist.steps)} steps, {hist.seconds:.1f} s, {hist.tokens_per_s:.0f} non-padding tokens/s, "
             f"{hist.precision}"
             + (" (decoder layers compiled with torch.compile; the time includes compiling)" if hist.compiled else ""),
             f"- parity of the saved model (reloaded {parity.get('reloaded', 'with plain transformers')}) with the "
             f"trained one: passed, max logit difference {parity['max_logit_diff']:.2e} (tolerance "
             f"{parity['tolerance']:.2e}), {same}/{len(parity.get('generations', []))} greedy generations identical "
             "on held-out prompts",
             *[f"- merged shards vs {ref['reference']}: {ref['tensors']} tensors, max |diff| {ref['max_abs_diff']:.2e}"
               for ref in (parity.get("peft_merge"), parity.get("edited_base")) if ref],
             "",
             f"## {reference.capitalize()} vs derived on the same held-out examples", ""]
    lines += comparison_table(rows, metrics, reference)
    if any(e["op"] == "expand_vocab" for e in lineage["edits"]):
        lines += ["", "The vocabulary was expanded: each model's loss is per token of its own tokenizer, so "
                      "the derived model predicts fewer, longer tokens where the new ones occur."]
    samples_b, samples_d = base_scores.get("samples") or [], derived_scores.get("samples") or []
    if samples_d:
        lines += ["", "## Sample generations (held-out prompts, greedy)", ""]
        for b, d in zip(samples_b or [None] * len(samples_d), samples_d):
            lines += [f"**prompt:** {d.get('prompt', '')}", "",
                      f"- reference: {d.get('reference', '')}",
                      f"- {reference}: {b.get('prediction', '') if b else ''}",
                      f"- derived: {d.get('prediction', '')}", ""]
    if compression:
        lines += ["", "## Pruning: base, pruned before healing, derived (same held-out examples)", ""]
        lines += compression_table(compression, [m for m in metrics if m in compression[0][1]])
    lines += ["", "![loss](plots/loss.png)"]
    lines += runtime_lines(lineage.get("runtime"))
    lines.append("")
    return "\n".join(lines)
