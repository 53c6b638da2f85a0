"""`taoke export RUN --format gguf|onnx|hf [--quant T] [--out DIR]`: a derived model in the format its runtime
loads, checked against the run's model in that runtime, and recorded as a derivation of the run.

    runs/<run>/                         the parent (complete, its model files unchanged)
    runs/<run>-gguf-q8_0/               the export: a run directory of its own
      recipe.yaml                       the export request (run, format, quant)
      model/<files>                     the GGUF (+ Modelfile) | model.onnx | HF files, taoke.json, README.md card
      report.md  lineage.json           parity figures; parent = the run, relation quantized | converted

Everything is written under a temporary name beside the output and renamed at the end: a failed or refused export
leaves nothing behind. Language-model runs go through ship/language.py, classifiers through ship/classify.py.
"""

from __future__ import annotations

import os
import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import yaml

from taoke.derive.record import build_lineage
from taoke.errors import ModelError, RecipeError
from taoke.files import sha256_bytes
from taoke.library import resolve
from taoke.recipe import LM_TASKS
from taoke.run import Run, print_table
from taoke.ship.classify import check_classifier_run, export_classifier
from taoke.ship.gguf import QUANTS as GGUF_QUANTS
from taoke.ship.language import check_lm_run, export_language
from taoke.ship.onnx import QUANTS as ONNX_QUANTS

FORMATS = ("gguf", "onnx", "hf")
QUANTS = {"gguf": tuple(GGUF_QUANTS), "onnx": ONNX_QUANTS, "hf": ("F32", "F16", "BF16")}
DEFAULT_QUANT = {"gguf": "F16", "onnx": None, "hf": None}
LIBRARY = {"gguf": "gguf", "onnx": "onnx", "hf": "transformers"}
GPTQ_EXAMPLES = 64   # training examples GPTQ measures layer inputs on (the GPTQ paper used 128 of 2048 tokens)


def normalise(fmt: str, quant: str | None) -> tuple[str, str | None]:
    fmt = (fmt or "").lower()
    if fmt not in FORMATS:
        raise RecipeError(f"--format {fmt or '(none)'}: unknown; choose one of {', '.join(FORMATS)}.")
    if quant is None or (fmt == "onnx" and quant.lower() in ("", "none", "fp32")):
        return fmt, DEFAULT_QUANT[fmt]
    spelled = quant.upper() if fmt != "onnx" else quant.lower()
    if spelled not in QUANTS[fmt]:
        raise RecipeError(f"--quant {quant}: unknown for {fmt}; choose one of {', '.join(QUANTS[fmt])}.")
    return fmt, spelled


def open_parent(run: str | Path) -> Run:
    """A complete run whose model files are as recorded; ModelError otherwise."""
    path = Path(run)
    if (path / "taoke.json").is_file() and Run.is_run(path.parent):
        path = path.parent   # the run's model/ folder was given
    if not path.is_dir():
        raise ModelError(f"{run}: no such run directory.")
    if not Run.is_run(path):
        state = Run(path).state if (path / "status.json").is_file() else "not a taoke run"
        raise ModelError(f"{run}: not a complete run ({state}); only a finished `taoke derive` run can be exported.")
    parent = Run(path)
    parent.check_model_files()
    if (parent.lineage.get("export") or None) is not None:
        raise ModelError(f"{run}: is itself an export; export the run it was made from.")
    return parent


def check_fits(parent: Run, fmt: str) -> None:
    """Refuse a format the run's architecture cannot take, naming what would work."""
    task = parent.lineage.get("task")
    if task in LM_TASKS:
        if fmt == "onnx":
            raise ModelError(f"{parent.path}: is a {task} language model; ONNX export covers classifiers, regressors "
                             "and encoders. Use --format gguf (llama.cpp, Ollama) or --format hf.")
        check_lm_run(parent, fmt)
    else:
        if fmt == "gguf":
            raise ModelError(f"{parent.path}: is a {task} model; GGUF export takes causal language models (LLaMA "
                             "family). Use --format onnx (ONNX Runtime) or --format hf.")
        check_classifier_run(parent, fmt)


def default_out(parent: Run, fmt: str, quant: str | None) -> Path:
    return parent.path.parent / (f"{parent.name}-{fmt}" + (f"-{quant.lower()}" if quant else ""))


def tool_versions() -> dict:
    out = {}
    for pkg in ("taoke", "torch", "transformers", "peft", "gguf", "onnx", "onnxruntime"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def export(run: str | Path, format: str, quant: str | None = None, out: str | Path | None = None, *,
           check: bool = True, quiet: bool = False, gptq: bool = False) -> Run:
    """Export a complete run; returns the export's own (complete) run directory. gptq: a GGUF Q4_0 export's codes
    are chosen by GPTQ on the run's training examples instead of rounded to nearest."""
    fmt, quant = normalise(format, quant)
    if gptq and (fmt, quant) != ("gguf", "Q4_0"):
        raise RecipeError(f"--gptq: chooses the codes of GGUF Q4_0 blocks; use it with --format gguf --quant Q4_0 "
                          f"(got --format {fmt} --quant {quant}).")
    parent = open_parent(run)
    check_fits(parent, fmt)
    target = Path(out) if out is not None else default_out(parent, fmt, quant)
    if target.exists():
        raise RecipeError(f"--out {target}: already exists; choose a new directory or remove it.")
    tmp = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        exp = Run.create(parent.name, out=tmp)
        request = {"export": {"run": str(parent.path.resolve()), "format": fmt, "quant": quant, "check": check,
                              **({"gptq": GPTQ_EXAMPLES} if gptq else {})}}
        request_yaml = yaml.safe_dump(request, sort_keys=False)
        exp.write_recipe(request_yaml)
        with exp.running():
            lm = parent.lineage.get("task") in LM_TASKS
            if lm:
                result = export_language(parent, exp.model_dir, fmt, quant, check, gptq=GPTQ_EXAMPLES if gptq else 0)
            else:
                result = export_classifier(parent, exp.model_dir, fmt, quant, check)
                shutil.copy2(parent.path / "splits.json", exp.path / "splits.json")  # eval --split on the export
            lineage = export_lineage(parent, target, fmt, quant, result, sha256_bytes(request_yaml.encode()))
            rows, metrics = result_rows(result, lm)
            exp.finish(lineage=lineage, card=export_card(lineage, fmt, quant, rows, metrics),
                       report=export_report(lineage, rows, metrics), rows=rows, metrics=metrics,
                       reference="parent" if len(rows) > 1 else None, quiet=True)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    done = Run(target)
    if not quiet:
        print_table(rows, metrics, "parent" if len(rows) > 1 else None)
    return done


def result_rows(result: dict, lm: bool) -> tuple[list[tuple[str, dict]], list[str]]:
    """Parent and export side by side on the same held-out data (the table, card and report show)."""
    parity = result.get("parity")
    if not parity:
        return [("derived", {})], []
    if lm and "perplexity" in parity:
        ppl = parity["perplexity"]
        return [("parent", {"perplexity": ppl["taoke"]}), ("derived", {"perplexity": ppl["llama.cpp"]})], ["perplexity"]
    if lm:
        return [("derived", {"max_logit_diff": parity["max_logit_diff"]})], ["max_logit_diff"]
    m = parity["metrics"]
    runtime = next(k for k in m if k not in ("pytorch", "delta"))
    return [("parent", m["pytorch"]), ("derived", m[runtime])], list(m["pytorch"])


def export_lineage(parent: Run, target: Path, fmt: str, quant: str | None, result: dict, request_sha256: str) -> dict:
    plin = parent.lineage
    base = resolve(f"run:{parent.path.resolve()}")
    relation = "converted" if quant in (None, "F32") else "quantized"
    rows, _ = result_rows(result, plin.get("task") in LM_TASKS)
    tools = tool_versions()
    llama = ((result.get("parity") or {}).get("llama_cpp") or {}).get("versions")
    if llama:
        tools.update(llama)
    lineage = build_lineage(
        name=f"{plin.get('name') or parent.name}-{fmt}" + (f"-{quant.lower()}" if quant else ""),
        run_id=target.name, task=plin.get("task"), base=base, relation=relation, edits=[],
        adaptation={"method": "export", "format": fmt, "quant": quant, "trainable_params": 0,
                    "total_params": result.get("parameters", 0)},
        data=plin.get("data", {}), recipe_sha256=request_sha256,
        metrics={**{name: m for name, m in rows}, "reference": "parent" if len(rows) > 1 else None},
        license=plin.get("license"))
    lineage["export"] = {"format": fmt, "quant": quant, "file": result.get("file"),
                         "tensor_types": result.get("tensor_types"), "quantization": result.get("quantization"),
                         "parity": result.get("parity"),
                         "checked": result.get("parity") is not None, "tools": tools,
                         "warnings": result.get("warnings", [])}
    return lineage


def export_card(lineage: dict, fmt: str, quant: str | None, rows: list[tuple[str, dict]], metrics: list[str]) -> str:
    """HF model card: base_model = the run, base_model_relation = quantized (the Hub's word for an export)."""
    parent = lineage["base"]["run"]["name"] or lineage["base"]["name"]
    root = lineage.get("root_base") or {}
    meta = {"base_model": parent, "base_model_relation": "quantized", "license": lineage.get("license") or "unknown",
            "library_name": LIBRARY[fmt], "tags": ["taoke", "export", fmt] + ([quant.lower()] if quant else []),
            "taoke": {"parent_lineage_sha256": lineage["base"]["run"]["lineage_sha256"],
                      "root_base": root.get("hub_id") or root.get("name"), "format": fmt, "quant": quant,
                      "relation": lineage["relation"], "lineage": "../lineage.json"}}
    lines = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
             f"# {lineage['name']}", "",
             f"An export of the taoke run **{parent}** ({lineage['task']}) to {fmt.upper()}"
             + (f" ({quant})" if quant else "") + f", made with taoke {lineage['taoke_version']}"
             + (f"; the run derives from {root.get('hub_id') or root.get('name')}." if root else ".")]
    lines += ["", *_figures(lineage, rows, metrics), "", "Full record: `lineage.json` beside this folder.", ""]
    return "\n".join(lines)


def _figures(lineage: dict, rows: list[tuple[str, dict]], metrics: list[str]) -> list[str]:
    exp = lineage["export"]
    if not exp["checked"]:
        return ["Not checked against the run's model (exported with --no-check)."]
    out = ["## Checked against the run's model", "", f"Reference: {exp['parity']['reference']}.", ""]
    if metrics:
        out += ["| model | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
        out += [f"| {name} | " + " | ".join(f"{m[k]:.6g}" if k in m else "-" for k in metrics) + " |"
                for name, m in rows]
    p = exp["parity"]
    if "greedy" in p:
        g = p["greedy"]
        out += ["", f"Greedy continuations ({g['new_tokens']} new tokens) of {g['prompts']} held-out prompts: "
                    f"{g['agree_first_16']} agree with the run's model on the first 16 tokens"
                    + (f", {g['diverge_at_near_tie']} more part from it at a near tie (within "
                       f"{g['near_tie_nats']:.3f} nats)" if g.get("diverge_at_near_tie") else "")
                    + f"; on average {g['mean_agreeing_tokens']:.1f} leading tokens agree ({g['required']})."]
        out += [f"Held-out perplexity: llama.cpp {p['perplexity']['llama.cpp']:.4f} vs taoke "
                f"{p['perplexity']['taoke']:.4f} ({p['perplexity']['relative_gap']:.2%} apart, tolerance "
                f"{p['perplexity']['tolerance']:.0%}); transformers' GGUF reader "
                f"{p['transformers']['perplexity']:.4f} on the first {p['transformers']['tokens']} tokens."]
        if p["llama_cpp"].get("cpu_features"):
            # quantised matmuls round differently on each CPU's kernels: say which ones produced these figures
            out += [f"llama.cpp ran on CPU kernels using {', '.join(p['llama_cpp']['cpu_features'])}."]
    elif "max_abs_logit_diff" in p:
        out += ["", f"Whole test split ({p['rows']} rows): max |Δ output| {p['max_abs_logit_diff']:.3g}, predicted "
                    f"labels agree on {p['label_agreement']:.2%}."]
    return out


def _quantization_lines(q: dict | None) -> list[str]:
    """How the 4-bit codes were chosen (--gptq), for the report."""
    if not q:
        return []
    cal = q["calibration"]
    line = f"- codes: {q['method'].upper()} on {cal['examples']} examples of the {cal['split']} split"
    if q.get("norm_tweak"):
        nt = q["norm_tweak"]
        line += f"; {nt['tensors']} norm gains then tuned to them ({nt['epochs']} epochs)"
    return [line + f", {q['seconds']} s"]


def export_report(lineage: dict, rows: list[tuple[str, dict]], metrics: list[str]) -> str:
    exp = lineage["export"]
    lines = [f"# {lineage['name']}", "", f"- parent run: {lineage['base']['run']['dir']}",
             f"- format: {exp['format']}, quant: {exp['quant'] or 'none'}, relation: {lineage['relation']}",
             f"- file: {exp['file']}" + (f" (tensor types: {exp['tensor_types']})" if exp.get("tensor_types") else ""),
             *_quantization_lines(exp.get("quantization")),
             "- tools: " + ", ".join(f"{k} {v}" for k, v in exp["tools"].items() if v), "",
             *_figures(lineage, rows, metrics), ""]
    p = exp.get("parity") or {}
    for s in p.get("samples", []):
        lines += [f"- prompt …{s['prompt'][-60:]!r}", f"  - taoke: {s['taoke']!r}", f"  - llama.cpp: {s['llama.cpp']!r}"]
    return "\n".join(lines) + "\n"
