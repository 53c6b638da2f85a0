"""Where a GGUF export's held-out perplexity goes: each quant type in real llama.cpp (node-llama-cpp) and in
transformers' GGUF reader (which dequantises with gguf-py), against taoke's model in fp32, on the same rows; then,
for the lowest type, which tensors carry the loss (PyTorch with one group of projections kept at Q8_0).

    .venv/bin/python bench/gguf_quant_error.py [--run RUN] [--quants Q8_0,Q5_1,Q5_0,Q4_1,Q4_0] [--gptq] [--no-record]

Without --run it derives recipes/sft-lora.yaml into runs/bench-sft first. The rows are the export check's: the
run's held-out examples, assistant tokens scored (taoke.ship.language.held_out). The files are written by
taoke's GGUF writer into a temporary folder; llama.cpp runs with one thread. The localisation rows round-trip
every 2-D weight through gguf-py's own quantize/dequantize at the type the writer gives it, except the named
group, and score in PyTorch: when the "all" row matches llama.cpp's, the runtime is faithful and the loss is the
format's. --gptq adds the Q4_0 file `taoke export --quant Q4_0 --gptq` writes (GPTQ's codes, norm gains tuned to
them), and the same codes with the run's own gains ("codes only"), scored the same way.
Deterministic (no timing): one run. Appends to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from datetime import datetime
from importlib.metadata import version
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from results import record  # noqa: E402

# GGUF tensor-name fragments of each projection group
GROUPS = {"attn_q + attn_k": ("attn_q.", "attn_k."), "attn_v": ("attn_v.",), "attn_output": ("attn_output.",),
          "ffn_gate + ffn_up": ("ffn_gate.", "ffn_up."), "ffn_down": ("ffn_down.",)}


def fake_quantised(model, quant: str, keep: tuple[str, ...] = ()):
    """A copy of `model` with the weights llama.cpp multiplies with once taoke's GGUF writer has stored it at `quant`
    (taoke.ship.gguf.stored_weights); tensors whose GGUF name contains a `keep` fragment are stored at Q8_0 instead."""
    import gguf

    from taoke.ship.gguf import stored_weights

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    weights = stored_weights(model, quant)
    kept = {n for n in weights if any(k in names.get_name(n, try_suffixes=(".weight", ".bias")) for k in keep)}
    if kept:
        weights.update({n: w for n, w in stored_weights(model, "Q8_0").items() if n in kept})
    out = copy.deepcopy(model)
    out.load_state_dict(weights, strict=False)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", type=Path, default=None)
    ap.add_argument("--quants", default="Q8_0,Q5_1,Q5_0,Q4_1,Q4_0")
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--gptq", action="store_true", help="also Q4_0 with GPTQ's codes (taoke export --gptq)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    from transformers import AutoModelForCausalLM

    from export_speed import machine
    import taoke
    from taoke.lm.load import load_causal_lm
    from taoke.run import Run
    from taoke.ship.gguf import same_grid_note, write_gguf
    from taoke.ship.export import GPTQ_EXAMPLES
    from taoke.ship.language import gptq_calibration, held_out, held_out_logprobs, perplexity, run_splits
    from taoke.ship.llamacpp import cpu_features, run_llamacpp

    run = args.run or ROOT / "runs" / "bench-sft"
    if not taoke.Run.is_run(run):
        taoke.derive(ROOT / "recipes" / "sft-lora.yaml", out=run, quiet=True)
    parent = Run(run)
    model, tok = load_causal_lm(parent.model_dir, device="cpu")
    model.eval()
    splits = run_splits(parent, "the bench scores the run's held-out split; restore the run's data.")
    held = held_out(splits, tok, max_prompts=1, max_positions=1024)
    with torch.no_grad():
        ref = perplexity(held_out_logprobs(model, held.rows))
    base_ref = parent.lineage["base"].get("reference") or parent.lineage["base"]["name"]
    base_model, _ = load_causal_lm(base_ref, device="cpu")
    with torch.no_grad():
        base = perplexity(held_out_logprobs(base_model.eval(), held.rows))
    del base_model
    print(f"taoke fp32: held-out perplexity {ref:.4f}, its base {base:.4f} ({held.note})", flush=True)

    def gap(p: float) -> str:
        return f"{p:.4f} ({p / ref - 1:+.2%})"

    def kept(p: float) -> str:
        """Share of the fine-tuning's perplexity gain over the base that the quantised model keeps."""
        return f"{(base - p) / (base - ref):.0%}" if base != ref else "-"

    rows, versions = [], {}
    quants = [q.strip().upper() for q in args.quants.split(",") if q.strip()]
    if args.gptq:
        quants += ["Q4_0 GPTQ codes only", "Q4_0 GPTQ"]
    calibrated = None
    with tempfile.TemporaryDirectory() as tmp:
        for label in quants:
            quant = label.split()[0]
            blocks = gains = None
            if "GPTQ" in label:   # the export's own path: `taoke export --quant Q4_0 --gptq`, once for both rows
                calibrated = calibrated or gptq_calibration(splits, model, tok, GPTQ_EXAMPLES)
                blocks, gains, how = calibrated
                if label.endswith("codes only"):
                    gains = None
                gptq_note = (f"Q4_0 GPTQ: codes chosen by GPTQ with scale search on {how['calibration']['examples']} "
                             f"training examples ({how['seconds'] - how['norm_tweak']['seconds']:.0f} s), then the "
                             f"{how['norm_tweak']['tensors']} norm gains tuned to them ({how['norm_tweak']['epochs']} "
                             f"epochs, {how['norm_tweak']['seconds']:.0f} s), as `taoke export --quant Q4_0 --gptq`; "
                             "'codes only' writes the same codes with the run's own gains.")
            path = Path(tmp) / f"model-{quant}.gguf"
            stored = "yes" if same_grid_note(parent.lineage.get("base"), quant) else "no"
            counts = write_gguf(model, tok, parent.model_dir, path, quant, name=parent.name, q4_0_blocks=blocks,
                                replaced=gains)
            ans = run_llamacpp(path, nll=[{"ids": r["input_ids"], "positions": r["positions"]} for r in held.rows])
            versions = {**ans["versions"], "cpu_features": " ".join(cpu_features(ans.get("system_info")))}
            llama = perplexity([x for row in ans["nll"] for x in row])
            hf = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=path.name, dtype=torch.float32).eval()
            with torch.no_grad():
                reader = perplexity(held_out_logprobs(hf, held.rows))
            size = path.stat().st_size / 2**20
            types = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
            rows.append(f"| {label} | {size:.1f} | {types} | {stored} | {gap(llama)} | {kept(llama)} | {gap(reader)} |")
            print(rows[-1], flush=True)
            path.unlink()
    low = [q for q in quants if "GPTQ" not in q][-1]
    local = []
    with torch.no_grad():
        for label, keep in [("none (all at the type)", ())] + [(g, k) for g, k in GROUPS.items()] + \
                [("attn_v + ffn_down", GROUPS["attn_v"] + GROUPS["ffn_down"])]:
            p = perplexity(held_out_logprobs(fake_quantised(model, low, keep), held.rows))
            local.append(f"| {label} | {gap(p)} | {kept(p)} |")
            print(local[-1], flush=True)

    text = "\n".join([
        f"\n## gguf_quant_error — {datetime.now().isoformat(timespec='minutes')}\n",
        f"Run {run.name}: held-out perplexity of taoke's model (PyTorch fp32) {ref:.4f} on {held.note}. "
        f"{machine()}; gguf-py {version('gguf')}; llama.cpp: {versions}.\n",
        f"Its base ({base_ref}) scores {base:.4f} on the same rows; \"gain kept\" is the share of the fine-tuning's "
        "perplexity gain over the base that llama.cpp's model keeps; \"base's type\" says whether the base was read "
        "from a GGUF stored at this type (its grid).\n",
        "| quant | file MiB | tensor types | base's type | llama.cpp perplexity (vs taoke) | gain kept | "
        "transformers' GGUF reader (vs taoke) |",
        "|---|---:|---|---|---:|---:|---:|", *rows, "", *([gptq_note, ""] if args.gptq else []),
        f"{low} with one group of projections kept at Q8_0 (gguf-py quantize/dequantize, scored in PyTorch):\n",
        "| kept at Q8_0 | perplexity (vs taoke) | gain kept |", "|---|---:|---:|", *local, "",
        f"Re-run: `.venv/bin/python bench/gguf_quant_error.py --run {run} --quants "
        f"{','.join(q for q in quants if 'GPTQ' not in q)}{' --gptq' if args.gptq else ''}`", ""])
    print(text)
    if not args.no_record:
        record(text)


if __name__ == "__main__":
    main()
