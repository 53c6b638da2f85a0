"""Export a causal-LM run: GGUF (+ Ollama Modelfile) checked in real llama.cpp and in transformers' GGUF reader,
or a plain merged HF directory checked by a plain transformers reload.

The check compares the export with taoke's own model (the run's model, fp32, adapters merged) on the run's
held-out examples, rebuilt from its recipe exactly as the run split them:
  - tokenization: llama.cpp's tokenizer vs the run's HF tokenizer on the held-out prompts (special tokens parsed);
  - greedy continuations of the held-out prompts: how many leading tokens agree, prompt by prompt;
  - held-out perplexity over the labelled tokens (assistant turns for SFT) in both runtimes.
The reference side never reads the exported file: llama.cpp and transformers do.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from transformers import AutoModelForCausalLM

from taoke.data.lm_examples import read_examples
from taoke.derive.language import calibration_batches, encode
from taoke.errors import DataError, ModelError
from taoke.files import sha256_file, write_json_atomic, write_text_atomic
from taoke.lm.data import IGNORE
from taoke.lm.load import load_causal_lm
from taoke.lm.merge import ParityError, parity_check, save_merged
from taoke.models.parts import count_parameters
from taoke.recipe import Recipe, load_recipe
from taoke.run import Run, base_chain
from taoke.ship.gguf import check_config, same_grid_note, stored_weights, write_gguf
from taoke.ship.gptq import DAMP, SCALE_SEARCH, gptq_blocks
from taoke.ship.llamacpp import cpu_features, run_llamacpp
from taoke.ship.norm_tweak import EPOCHS as NORM_EPOCHS, LR as NORM_LR, tweak_norms
from taoke.ship.ollama import modelfile

console = Console(stderr=True)
AGREE_TOKENS = 16          # F16/BF16/F32/Q8_0 must agree with taoke on this many leading greedy tokens ...
AGREE_SHARE = 0.75         # ... on at least this share of held-out prompts ("most prompts"; near ties count)
# Largest accepted relative held-out perplexity gap, llama.cpp vs taoke, by quant type.
PPL_TOLERANCE = {"F32": 0.005, "F16": 0.01, "BF16": 0.02, "Q8_0": 0.02, "Q5_1": 0.06, "Q5_0": 0.06,
                 "Q4_1": 0.10, "Q4_0": 0.10}
HF_DTYPES = {None: None, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass
class HeldOut:
    prompts: list[list[int]]        # chat-formatted held-out prompts (or document openings), as token ids
    prompt_texts: list[str]
    rows: list[dict]                # {"input_ids", "positions"}: score log p(ids[i+1] | ids[..i]) for i in positions
    note: str


def check_lm_run(parent: Run, fmt: str) -> None:
    """GGUF needs a LLaMA-family model (read from the saved config, or the adapter's base)."""
    if fmt != "gguf":
        return
    model_dir = parent.model_dir
    if (model_dir / "config.json").is_file():
        from transformers import AutoConfig
        check_config(AutoConfig.from_pretrained(model_dir))


@dataclass
class RunSplits:
    recipe: Recipe
    train: list
    held: list


def check_data_files(parent: Run, needed_for: str) -> None:
    """Refuse when the run's data files are missing or changed: its splits could not be rebuilt as they were."""
    for split, files in (parent.lineage.get("data", {}).get("files") or {}).items():
        for f in files:
            p = Path(f["path"])
            if not p.is_file() or sha256_file(p) != f["sha256"]:
                raise DataError(f"{p}: missing or changed since the run (sha256 recorded in {parent.path}/lineage.json);"
                                f" {needed_for}")


def run_splits(parent: Run, needed_for: str) -> RunSplits:
    """The run's training and held-out examples, split again from its recipe exactly as the run split them (read
    once per export); refuses when the data files changed since the run."""
    recipe: Recipe = load_recipe(parent.recipe_path)
    check_data_files(parent, needed_for)
    train, held, _ = read_examples(recipe)
    return RunSplits(recipe, train, held)


def chat_prompts(recipe: Recipe, held: list, max_prompts: int) -> list:
    """The chat messages that open the first held-out examples: each SFT conversation up to its last assistant
    turn, each DPO pair's prompt; none for continued pretraining (plain documents)."""
    if recipe.task == "sft":
        return [c[:max(i for i, m in enumerate(c) if m["role"] == "assistant")] for c in held[:max_prompts]]
    if recipe.task == "dpo":
        return [p["prompt"] for p in held[:max_prompts]]
    return []


def held_out(splits: RunSplits, tok, max_prompts: int, max_positions: int, prompt_tokens: int = 32) -> HeldOut:
    """The run's held-out prompts and the scored rows of its held-out examples."""
    recipe, held = splits.recipe, splits.held
    msgs = chat_prompts(recipe, held, max_prompts)
    if msgs:
        texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in msgs]
        prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    else:
        texts = [str(doc)[:200] for doc in held[:max_prompts]]
        prompts = [r["input_ids"][:prompt_tokens] for r in encode(recipe, tok, held[:max_prompts])]
    encoded = encode(recipe, tok, held)
    if recipe.task == "dpo":
        encoded = [pair["chosen"] for pair in encoded]
    rows, total = [], 0
    for r in encoded:
        positions = [i for i in range(len(r["labels"]) - 1) if r["labels"][i + 1] != IGNORE]
        if not positions:
            continue
        rows.append({"input_ids": r["input_ids"], "positions": positions})
        total += len(positions)
        if total >= max_positions:
            break
    what = {"sft": "assistant tokens", "dpo": "chosen-answer tokens"}.get(recipe.task, "tokens")
    return HeldOut(prompts, texts, rows, f"{len(rows)} of {len(encoded)} held-out examples, {total} {what} scored")


@torch.no_grad()
def reference_scores(model, held: HeldOut, n_new: int, eos_ids: set[int]) -> tuple[list[list[int]], list[float]]:
    """taoke's own model (PyTorch, fp32): greedy tokens per prompt and log-probabilities at the scored positions."""
    device = next(model.parameters()).device
    greedy = []
    for ids in held.prompts:
        x = torch.tensor([ids], device=device)
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n_new, do_sample=False,
                             pad_token_id=next(iter(eos_ids), None))[0, len(ids):].tolist()
        cut = next((i for i, t in enumerate(out) if t in eos_ids), len(out))
        greedy.append(out[:cut])
    return greedy, held_out_logprobs(model, held.rows)


@torch.no_grad()
def held_out_logprobs(model, rows: list[dict]) -> list[float]:
    """log p(next token) at every scored position of every row, in order (the perplexity's terms)."""
    device = next(model.parameters()).device
    out = []
    for r in rows:
        logits = model(input_ids=torch.tensor([r["input_ids"]], device=device)).logits[0].float()
        logp = torch.log_softmax(logits, -1)
        pos = torch.tensor(r["positions"], device=device)
        nxt = torch.tensor([r["input_ids"][i + 1] for i in r["positions"]], device=device)
        out += logp[pos, nxt].tolist()
    return out


def perplexity(logprobs: list[float]) -> float:
    return math.exp(-sum(logprobs) / max(len(logprobs), 1))


def agreement(a: list[int], b: list[int]) -> int:
    """Leading tokens two greedy continuations share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def compare_greedy(ref: list[list[int]], other: list[list[int]], need: int, near_tie=None) -> dict:
    """How many continuations agree on their first `need` tokens. near_tie(i, k): whether prompt i's first
    divergence, at token k, falls where the reference itself hardly prefers its token (counted apart)."""
    per_prompt = []
    for i, (a, b) in enumerate(zip(ref, other)):
        k = agreement(a, b)
        # identical continuations that end (at an end-of-turn token) before `need` tokens count as agreeing
        ok = k >= need or a == b
        per_prompt.append({"agree": k, "of": max(len(a), len(b)), "ok": ok,
                           "near_tie": bool(not ok and near_tie is not None and near_tie(i, k))})
    n = max(len(per_prompt), 1)
    ok = sum(p["ok"] for p in per_prompt)
    ties = sum(p["near_tie"] for p in per_prompt)
    return {"prompts": len(per_prompt), f"agree_first_{need}": ok, "share": ok / n,
            "diverge_at_near_tie": ties, "share_with_near_ties": (ok + ties) / n,
            "mean_agreeing_tokens": sum(p["agree"] for p in per_prompt) / n, "per_prompt": per_prompt}


def near_tie_rule(model, prompts: list[list[int]], ref: list[list[int]], other: list[list[int]],
                  noise: float):
    """Whether a divergence of greedy paths is a near tie, after vLLM's check_logprobs_close (where two engines'
    greedy outputs part, each token must be among the other's top log-probs): here the other engine's token must be
    the reference's runner-up at most, and within `noise` nats of the reference's own token, `noise` being the
    largest log-prob change the two runtimes showed on the held-out tokens. A sound Q8_0 file's paths part like
    this in llama.cpp on an AMX Xeon (margins up to 0.35 nats, where its largest held-out change was 0.57)."""
    device = next(model.parameters()).device

    @torch.no_grad()
    def explained(i: int, k: int) -> bool:
        if k >= min(len(ref[i]), len(other[i])):
            return False   # one stopped early: not a choice between two tokens
        x = torch.tensor([prompts[i] + ref[i][:k]], device=device)
        logp = torch.log_softmax(model(input_ids=x).logits[0, -1].float(), -1)
        mine, theirs = logp[ref[i][k]], logp[other[i][k]]
        return int((logp > theirs).sum()) <= 1 and float(mine - theirs) <= noise

    return explained


def end_ids(model, tok) -> set[int]:
    """Token ids that end a greedy continuation (the tokenizer's EOS and the generation config's)."""
    ids = getattr(model.generation_config, "eos_token_id", None)
    return {i for i in [tok.eos_token_id, *(ids if isinstance(ids, list) else [ids])] if i is not None}


def check_gguf(gguf: Path, model, tok, held: HeldOut, quant: str, n_new: int = 32) -> dict:
    """llama.cpp and transformers' GGUF reader against taoke's own model; ParityError past the tolerances."""
    eos_ids = end_ids(model, tok)
    console.print(f"export check: taoke's model on {held.note} and {len(held.prompts)} prompts")
    ref_greedy, ref_lp = reference_scores(model, held, n_new, eos_ids)
    console.print("export check: the same in llama.cpp (node-llama-cpp)")
    ans = run_llamacpp(gguf, tokenize=held.prompt_texts if held.prompt_texts and tok.chat_template else [],
                       greedy=[{"ids": ids, "n": n_new} for ids in held.prompts],
                       nll=[{"ids": r["input_ids"], "positions": r["positions"]} for r in held.rows])
    problems = []
    tok_same = [a == b for a, b in zip(ans["tokenize"], held.prompts)]
    if tok_same and not all(tok_same):
        problems.append(f"llama.cpp tokenizes {tok_same.count(False)} of {len(tok_same)} held-out prompts "
                        "differently from the run's tokenizer")
    if (ans["metadata"].get("chat_template") or None) != (tok.chat_template or None):
        problems.append("the GGUF's chat template differs from the run tokenizer's")
    llama_lp = [x for row in ans["nll"] for x in row]
    # the largest log-prob change between the runtimes on a held-out token: the near-tie bound for greedy paths
    noise = max((abs(a - b) for a, b in zip(ref_lp, llama_lp) if b is not None), default=0.0)
    if any(x is None for x in llama_lp):
        problems.append("llama.cpp gives probability 0 to a held-out token")
        llama_lp = [x for x in llama_lp if x is not None]
    ppl_ref, ppl_llama = perplexity(ref_lp), perplexity(llama_lp)
    gap = abs(ppl_llama - ppl_ref) / ppl_ref
    greedy = compare_greedy(ref_greedy, ans["greedy"], AGREE_TOKENS,
                            near_tie_rule(model, held.prompts, ref_greedy, ans["greedy"], noise))
    kernels = cpu_features(ans.get("system_info"))
    if gap > PPL_TOLERANCE[quant]:
        problems.append(f"held-out perplexity {ppl_llama:.4f} in llama.cpp vs {ppl_ref:.4f} in taoke "
                        f"({gap:.2%} apart; {quant} allows {PPL_TOLERANCE[quant]:.0%}; llama.cpp's CPU kernels here: "
                        f"{', '.join(kernels) or 'unknown'})")
    strict = quant in ("F32", "F16", "BF16", "Q8_0")
    if strict and greedy["share_with_near_ties"] < AGREE_SHARE:
        problems.append(f"greedy continuations agree on the first {AGREE_TOKENS} tokens for only "
                        f"{greedy[f'agree_first_{AGREE_TOKENS}']} of {greedy['prompts']} prompts (and "
                        f"{greedy['diverge_at_near_tie']} more part at a near tie)")
    console.print("export check: transformers from_pretrained(gguf_file=...)")
    hf = transformers_gguf_check(gguf, held, ref_lp)
    if hf["perplexity_gap"] > PPL_TOLERANCE[quant]:
        problems.append(f"transformers' GGUF reader gives held-out perplexity {hf['perplexity']:.4f} vs "
                        f"{hf['taoke_perplexity']:.4f} in taoke on the same rows")
    report = {
        "reference": "taoke's own model (PyTorch fp32, the run's weights) vs llama.cpp (node-llama-cpp) and "
                     "transformers' GGUF reader, on the run's held-out examples",
        "held_out": held.note,
        "tokenization_identical": all(tok_same) if tok_same else None,
        "perplexity": {"taoke": ppl_ref, "llama.cpp": ppl_llama, "relative_gap": gap,
                       "tolerance": PPL_TOLERANCE[quant], "tokens": len(ref_lp)},
        "greedy": {**greedy, "new_tokens": n_new, "required": f">= {AGREE_SHARE:.0%} of prompts agree on the first "
                   f"{AGREE_TOKENS} tokens or part at a near tie" if strict else "reported only (4/5-bit quantisation)",
                   "near_tie_nats": noise},
        "transformers": hf,
        "llama_cpp": {"versions": ans["versions"], "cpu_features": kernels, "seconds": ans["seconds"],
                      "generation_tokens_per_s": ans["generated_tokens"] / max(ans["seconds"]["greedy"], 1e-9),
                      "tokenizer_pre": ans["metadata"].get("tokenizer_pre")},
        "samples": [{"prompt": t[-160:], "taoke": tok.decode(a), "llama.cpp": tok.decode(b)}
                    for t, a, b in list(zip(held.prompt_texts, ref_greedy, ans["greedy"]))[:3]],
    }
    if problems:
        raise ParityError(f"{gguf.name}: the export does not behave like the run's model: " + "; ".join(problems))
    return report


@torch.no_grad()
def transformers_gguf_check(gguf: Path, held: HeldOut, ref_lp: list[float]) -> dict:
    """Plain transformers loads the file (dequantising it) and scores the same held-out rows as llama.cpp, so the
    two runtimes' perplexities compare (on a Q4_0 export the first 8 rows alone were 41% off, all 40 rows 31%)."""
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a file it cannot read
        raise ModelError(f"{gguf}: transformers cannot load it ({e.__class__.__name__}: {str(e)[:200]})") from None
    lp = held_out_logprobs(model, held.rows)
    ppl, ppl_ref = perplexity(lp), perplexity(ref_lp)
    return {"loaded": True, "layers": model.config.num_hidden_layers, "perplexity": ppl, "taoke_perplexity": ppl_ref,
            "perplexity_gap": abs(ppl - ppl_ref) / ppl_ref, "tokens": len(lp)}


def gptq_calibration(splits: RunSplits, model, tok, examples: int) -> tuple[dict, dict, dict]:
    """GPTQ's Q4_0 blocks for the run's model and the norm gains tuned to them (norm_tweak.py), both measured on
    `examples` of its training split (never the held-out rows the check scores); returns (blocks, gains, what
    lineage records of how they were chosen)."""
    recipe, train = splits.recipe, splits.train
    sample = random.Random(recipe.train.seed).sample(train, min(examples, len(train)))
    start = time.perf_counter()
    with Progress(console=console, transient=True) as bar:
        measuring = bar.add_task("GPTQ: measuring inputs on training examples", total=len(sample))
        rounding = bar.add_task("GPTQ: choosing Q4_0 codes", total=None)
        tweaking = bar.add_task("tuning norm gains to the quantised weights", total=None)
        batches = []
        for batch in calibration_batches(recipe, tok, sample):
            batches.append(batch)
            bar.advance(measuring)
        blocks = gptq_blocks(model, batches, search=SCALE_SEARCH,
                             progress=lambda done, total: bar.update(rounding, completed=done, total=total))
        gptq_seconds = time.perf_counter() - start
        gains = tweak_norms(model, stored_weights(model, "Q4_0", blocks), batches, seed=recipe.train.seed,
                            progress=lambda done, total: bar.update(tweaking, completed=done, total=total))
    return blocks, gains, {
        "method": "gptq", "variant": "one-shot", "damp": DAMP, "scale_search": SCALE_SEARCH, "tensors": len(blocks),
        "calibration": {"split": "train", "examples": len(sample), "seed": recipe.train.seed},
        "norm_tweak": {"tensors": len(gains), "epochs": NORM_EPOCHS, "lr": NORM_LR,
                       "seconds": round(time.perf_counter() - start - gptq_seconds, 1)},
        "seconds": round(time.perf_counter() - start, 1)}


def export_language(parent: Run, model_dir: Path, fmt: str, quant: str | None, check: bool,
                    max_prompts: int = 12, max_positions: int = 1024, gptq: int = 0) -> dict:
    """Write the export's model/ and check it; returns what lineage records (files, parity, tensor types).
    gptq > 0: Q4_0 codes chosen by GPTQ on that many training examples."""
    splits = None   # read before the model loads: changed data is refused in a second, not after a minute
    if gptq or (check and fmt == "gguf"):
        splits = run_splits(parent, "the run's splits cannot be rebuilt for " + " and ".join(
            (["the export check (or export with --no-check)"] if check else []) +
            (["GPTQ's calibration (or export without --gptq)"] if gptq else [])) + ". Restore the data.")
    model, tok = load_causal_lm(parent.model_dir, device="cpu")   # fp32, adapters merged in memory
    model.eval()
    lin = parent.lineage
    name = lin.get("name") or parent.name
    result: dict = {"parameters": count_parameters(model)[0]}
    held = held_out(splits, tok, max_prompts, max_positions) if check and fmt == "gguf" else None
    model_dir.mkdir(parents=True, exist_ok=True)
    if fmt == "gguf":
        fname = f"{name}-{quant}.gguf"
        blocks = gains = None
        if gptq:
            blocks, gains, result["quantization"] = gptq_calibration(splits, model, tok, gptq)
        console.print(f"writing {fname} ({quant})")
        result["tensor_types"] = write_gguf(model, tok, parent.model_dir, model_dir / fname, quant, name=name,
                                            license=lin.get("license"), base=lin.get("root_base"),
                                            q4_0_blocks=blocks, replaced=gains)
        write_text_atomic(model_dir / "Modelfile", modelfile(fname, tok, min(model.config.max_position_embeddings,
                                                                             4096)))
        write_json_atomic(model_dir / "taoke.json", {
            "format": "taoke-task-model", "task": lin["task"], "arch": "gguf",
            "export": {"runtime": "llama.cpp", "file": fname, "quant": quant}, "chat_template": bool(tok.chat_template)})
        result["file"] = fname
        note = next(filter(None, (same_grid_note(b, quant) for b in base_chain(lin.get("base")))), None)
        if note:
            console.print(f"[yellow]warning:[/] {note}")
            result["warnings"] = [note]
        if check:
            try:
                result["parity"] = check_gguf(model_dir / fname, model, tok, held, quant)
            except ParityError as e:
                if note:
                    raise ParityError(f"{e} (likely cause: {note})") from None
                if quant == "Q4_0" and not gptq:
                    raise ParityError(f"{e}; --gptq chooses the Q4_0 codes by GPTQ on training examples, which "
                                      "keeps a 4-bit export closer to the trained model") from None
                raise
    else:  # hf: a plain transformers directory, adapters merged, optionally cast
        save_merged(model, tok, model_dir, dtype=HF_DTYPES[quant])
        write_json_atomic(model_dir / "taoke.json", {
            "format": "taoke-task-model", "task": lin["task"], "arch": "hf-causal-lm", "adapter": None,
            "export": {"runtime": "transformers", "dtype": quant or "F32"}, "chat_template": bool(tok.chat_template)})
        if check:
            msgs = _prompt_messages(load_recipe(parent.recipe_path), max_prompts=3)
            result["parity"] = parity_check(model_dir, model, tok, msgs)
            result["parity"]["reference"] = "the run's model in PyTorch vs a plain transformers reload of the export"
    return result


def _prompt_messages(recipe: Recipe, max_prompts: int) -> list:
    _, held, _ = read_examples(recipe)
    if recipe.task == "causal-lm":   # plain documents: no chat turns to take prompts from
        return ["What is a computer?", "Tell me a joke."][:max_prompts]
    return chat_prompts(recipe, held, max_prompts)

