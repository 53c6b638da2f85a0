"""The language-model workflow (causal-lm, sft, dpo): base -> data -> evaluate the base as published -> edits
-> adaptation -> train -> evaluate derived on the same held-out examples -> save (merged, parity-checked) ->
the run directory.

Read top to bottom; everything that can fail on user input (base, data, edits) runs before the run
directory is created.
"""

from __future__ import annotations

import math
import random
import shutil
from pathlib import Path

import torch
from rich.console import Console

from taoke.adapt.language import adapt_lm
from taoke.derive.card import model_card
from taoke.derive.record import build_lineage, runtime_section
from taoke.edit.layers import check_indices, drop_layers, expand_layers, kept_layers
from taoke.edit.prune import kept_counts, prune
from taoke.edit.vocab import expand_vocab, read_tokens
from taoke.evaluate.latency import latency_ms
from taoke.evaluate.plots import lm_curves_png
from taoke.evaluate.report import render_lm_report
from taoke.files import sha256_bytes, sha256_file, write_json_atomic
from taoke.library import BaseRef
from taoke.lm.data import IGNORE, encode_conversations, encode_documents, set_chat_template
from taoke.lm.dpo import encode_pairs, evaluate_dpo, train_dpo
from taoke.lm.generate import generate_eval
from taoke.lm.load import load_adapter_run, load_causal_lm
from taoke.lm.merge import parity_check, save_merged
from taoke.lm.reference import check_against_edited_base, check_against_peft_merge
from taoke.lm.train import evaluate_lm, train_lm
from taoke.models.parts import count_parameters, find_stack, unwrap
from taoke.models.widths import blocks, head_shape
from taoke.recipe import Recipe, recipe_to_yaml
from taoke.run import Run
from taoke.train.checkpoint import checkpoint_position
from taoke.train.core import seed_everything

console = Console(stderr=True)
# Parity prompts where the data has none of its own (continued pretraining, DPO): short chat turns.
PARITY_PROMPTS = ["What is a computer?", "Tell me a joke.", "How do I reset my password?"]


# ---------------------------------------------------------------------------------------------- data

def encode(recipe: Recipe, tok, items: list) -> list[dict]:
    n = recipe.lm.seq_len
    if recipe.task == "causal-lm":
        return encode_documents(tok, items, n)
    if recipe.task == "sft":
        return encode_conversations(tok, items, n)
    return encode_pairs(tok, items, n)


def held_out_prompts(recipe: Recipe, held_items: list) -> tuple[list, list]:
    """Held-out prompts (all turns before the last assistant turn) and their reference answers."""
    if recipe.task != "sft":
        return [], []
    prompts, refs = [], []
    for conv in held_items[: recipe.lm.gen_prompts]:
        last = max(i for i, m in enumerate(conv) if m["role"] == "assistant")
        prompts.append(conv[:last])
        refs.append(conv[last]["content"])
    return prompts, refs


# ---------------------------------------------------------------------------------------------- edits

def check_edits(recipe: Recipe, model) -> None:
    """Refuse edits the model cannot take before anything runs (the recipe has checked the rest)."""
    depth = len(find_stack(model)) if any(op != "expand_vocab" for op, _ in recipe.steps("edits")) else 0
    for op, cfg in recipe.steps("edits"):
        if op == "drop_layers":
            depth = len(kept_layers(cfg.keep, cfg.every, depth))
        elif op == "expand_layers":
            check_indices(cfg.after, depth, "expand_layers.after")
            depth += len(set(cfg.after))
        elif op == "prune":
            bs = blocks(model)   # refuses architectures it cannot prune
            kept_counts(bs[0].get(bs[0].mlp_out).in_features, head_shape(model)[1], cfg.mlp, cfg.heads, cfg.round_to)
        else:
            read_tokens(cfg.tokens, cfg.file)


def apply_edits(recipe: Recipe, model, tok, train_items: list | None = None) -> tuple[list[dict], list[str]]:
    """Apply the edits in order; returns their records and, for train_only_new, the names that alone train.
    `train_items` are the training examples a prune edit measures activations on."""
    records, train_only = [], []
    for op, cfg in recipe.steps("edits"):
        before = count_parameters(model)[0]
        if op == "drop_layers":
            detail = drop_layers(model, cfg.keep, cfg.every, {})
        elif op == "expand_layers":
            detail, prefixes = expand_layers(model, cfg.after, {})
            train_only += prefixes if cfg.train_only_new else []
        elif op == "prune":
            items = train_items or []
            sample = random.Random(recipe.train.seed).sample(items, min(cfg.samples, len(items)))
            detail = prune(model, cfg.mlp, cfg.heads, cfg.by, lambda: calibration_batches(recipe, tok, sample),
                           cfg.compensate, cfg.round_to)
        else:
            detail = expand_vocab(model, tok, read_tokens(cfg.tokens, cfg.file), cfg.init)
        records.append({"op": op, **cfg.model_dump(exclude_none=True), **detail, "params_before": before,
                        "params_after": count_parameters(model)[0]})
    if train_only and any(r["op"] == "expand_vocab" for r in records):
        # new tokens need trained rows too: embeddings (and an untied head) join the new blocks
        tables = [model.get_input_embeddings(), model.get_output_embeddings()]
        ids = {id(p) for m in tables if m is not None for p in m.parameters()}
        train_only += [n for n, p in model.named_parameters() if id(p) in ids]
    return records, train_only


def calibration_batches(recipe: Recipe, tok, items: list):
    """One example per batch (no padding to mask) for edits that measure activations."""
    rows = encode(recipe, tok, items)
    for r in rows:
        ids = (r["chosen"] if recipe.task == "dpo" else r)["input_ids"]
        yield {"input_ids": torch.tensor([ids])}


def measured(model, scores: dict, held_rows: list[dict], metric_names: list[str]) -> dict:
    """Scores plus parameter count and latency (one forward of each of the first held-out rows, <= 128 tokens)."""
    batches = [{"input_ids": torch.tensor([(r["chosen"] if "chosen" in r else r)["input_ids"][:128]])}
               for r in held_rows[:8]]
    kept = {k: v for k, v in scores.items() if k in metric_names and isinstance(v, (int, float))}
    return {**kept, "params": count_parameters(model)[0], **latency_ms(model, batches)}


def new_token_ids(edits: list[dict]) -> list[int] | None:
    """Ids of the tokens expand_vocab added, for LoRA/DoRA to train their embedding rows (else they stay at
    their initial value: the adapters do not touch the embedding; full/freeze ignore the list)."""
    ids = [i for e in edits if e["op"] == "expand_vocab" for i in range(e["vocab_before"], e["vocab_after"])]
    return ids or None


# ---------------------------------------------------------------------------------------------- scores

def score(recipe: Recipe, model, tok, held_rows: list[dict], prompts: list, refs: list) -> dict:
    """Held-out loss, perplexity and bits per byte (DPO: preference accuracy), and scored generations."""
    if recipe.task == "dpo":
        return evaluate_dpo(model, tok, held_rows, beta=recipe.lm.beta)
    out = evaluate_lm(model, held_rows, tok.pad_token_id, recipe.lm.seq_len, recipe.train.batch_size,
                      recipe.train.precision)
    out["bits_per_byte"] = bits_per_byte(out, held_rows, tok)
    if prompts:
        gen = generate_eval(model, tok, prompts, refs, recipe.lm.gen_metric, max_new_tokens=recipe.lm.max_new_tokens,
                            samples=len(prompts))
        out[recipe.lm.gen_metric] = gen["score"]
        out["samples"] = gen["samples"]
    return out


def bits_per_byte(scores: dict, rows: list[dict], tok) -> float:
    """Held-out loss per UTF-8 byte of the labelled text, in bits: unlike loss per token it stays comparable
    when the tokenizer changes (vocabulary expansion)."""
    n_bytes = sum(len(tok.decode([t for t in r["labels"][1:] if t != IGNORE]).encode("utf-8")) for r in rows)
    return scores["loss"] * scores["tokens"] / math.log(2) / max(n_bytes, 1)


def independent_references(recipe: Recipe, base: BaseRef, trained, edits: list[dict], saved: Path) -> dict:
    """Saved shards vs PEFT's own merge of a copy, and (LoRA with depth/vocab edits) vs the base edited by hand."""
    out = {}
    peft = check_against_peft_merge(saved, trained)   # raises ParityError on a mismatch
    if peft:
        out["peft_merge"] = peft
    if recipe.adapt.method == "lora" and not any(e["op"] == "prune" for e in edits):  # pruning keeps no by-hand recipe
        base_model, _ = load_causal_lm(base, device="cpu")
        out["edited_base"] = check_against_edited_base(saved, trained, base_model.state_dict(), edits)
        del base_model
    return out


# ---------------------------------------------------------------------------------------------- the workflow

def derive_language_model(recipe: Recipe, base: BaseRef, examples: tuple[list, list, dict[str, list[Path]]],
                          out: str | None = None, quiet: bool = False, dry_run: bool = False,
                          resume: Run | None = None) -> Run | None:
    """Train and judge a causal LM as the recipe says; returns the complete run (None for a dry run). `resume`
    continues a killed run from its last checkpoint: everything before training is deterministic and runs
    again, training picks up where the checkpoint left it."""
    train_items, held_items, files = examples   # read by data/lm_examples.py, before the model stack loaded
    model, tok = load_causal_lm(base, device=recipe.train.device)
    if recipe.lm.chat_template or recipe.task in ("sft", "dpo"):
        set_chat_template(tok, recipe.lm.chat_template)
    check_edits(recipe, model)  # a bad edit fails now, not after the base evaluation
    if dry_run:
        edits, train_only = apply_edits(recipe, model, tok, train_items)
        model, counts = adapt_lm(model, recipe.adapt, train_only or None, new_token_ids(edits))
        Console().print(model)
        Console().print(f"{counts['total_params']:,} parameters, {counts['trainable_params']:,} trainable "
                        f"({counts['trainable_params'] / counts['total_params']:.2%}); adaptation "
                        f"{recipe.adapt.method}; edits {edits or 'none'}; {len(train_items)} train / "
                        f"{len(held_items)} held-out examples")
        return None
    prompts, refs = held_out_prompts(recipe, held_items)

    run = resume or Run.create(recipe.name, out)
    recipe_yaml = recipe_to_yaml(recipe)
    if resume:
        run.truncate_metrics(checkpoint_position(run.checkpoint_dir)["step"], epoch=0)
    run.write_recipe(recipe_yaml)
    with run.running() as log:
        console.print(f"[bold]{recipe.name}[/]: {base.name} -> {recipe.task}; {len(train_items)} train / "
                      f"{len(held_items)} held-out examples; adapt {recipe.adapt.method}")
        # the reference is the base as published: evaluated before any edit changes it
        held_rows = encode(recipe, tok, held_items)
        base_scores = score(recipe, model, tok, held_rows, prompts, refs)
        log({"type": "base", **{k: v for k, v in base_scores.items() if k != "samples"}})
        prunes = any(op == "prune" for op, _ in recipe.steps("edits"))
        unpruned = measured(model, base_scores, held_rows, list(base_scores)) if prunes else None
        edits, train_only = apply_edits(recipe, model, tok, train_items)
        if prunes:  # the pruned model before any training heals it, on the same held-out examples
            pruned = measured(model, score(recipe, model, tok, held_rows, prompts, refs), held_rows, list(base_scores))
        if any(e["op"] == "expand_vocab" for e in edits):  # the new tokens change how the held-out text splits
            held_rows = encode(recipe, tok, held_items)
        train_rows = encode(recipe, tok, train_items)
        seed_everything(recipe.train.seed)   # the adapter's initial weights follow the recipe's seed, not the history
        model, adaptation = adapt_lm(model, recipe.adapt, train_only or None, new_token_ids(edits))
        on_step = lambda r: log({"type": "step", **r})  # noqa: E731
        resumable = dict(checkpoint_dir=run.checkpoint_dir, resume=resume is not None)
        if recipe.task == "dpo":
            hist = train_dpo(model, tok, train_rows, recipe.train, recipe.lm, on_step=on_step, **resumable)
        else:
            hist = train_lm(model, tok, train_rows, recipe.train, recipe.lm, on_step=on_step, progress=not quiet,
                            **resumable)
        trained = hist.model
        derived_scores = score(recipe, trained, tok, held_rows, prompts, refs)
        log({"type": "test", **{k: v for k, v in derived_scores.items() if k != "samples"}})

        adapter_alone = recipe.saves_adapter_only
        if adapter_alone:
            trained.save_pretrained(run.model_dir)
            tok.save_pretrained(run.model_dir)
        else:
            save_merged(trained, tok, run.model_dir)
        write_json_atomic(run.model_dir / "taoke.json", {
            "format": "taoke-task-model", "task": recipe.task, "arch": "hf-causal-lm",
            "adapter": {"method": recipe.adapt.method, "merged": False, "base": base.reference}
            if adapter_alone else None,
            "seq_len": recipe.lm.seq_len, "chat_template": tok.chat_template is not None})
        # an adapter is checked the way taoke chat/predict load it: its base with the adapter merged in
        load = (lambda d: load_adapter_run(d, device="cpu")[0]) if adapter_alone else None
        parity = parity_check(run.model_dir, trained, tok, prompts or PARITY_PROMPTS, load=load)  # raises on a mismatch
        parity["reloaded"] = "as its base with the adapter merged in" if adapter_alone else "with plain transformers"
        if not adapter_alone:  # the merged shards against references that share no code with save_merged
            parity.update(independent_references(recipe, base, trained, edits, run.model_dir))

        lm_curves_png(hist.steps, run.path / "plots" / "loss.png", f"{recipe.name}: training loss")
        metric_names = [k for k in ("loss", "perplexity", "bits_per_byte", recipe.lm.gen_metric, "dpo_loss",
                                    "reward_acc", "preference_acc") if k in derived_scores]
        strip = lambda m: {k: v for k, v in m.items() if k in metric_names}  # noqa: E731
        reference = "parent" if base.is_run else "base"
        rows = [(reference, strip(base_scores)), ("derived", strip(derived_scores))]
        lineage = build_lineage(
            name=recipe.name, run_id=run.name, task=recipe.task, base=base,
            relation="adapter" if adapter_alone else "finetune", edits=edits,
            adaptation={**recipe.adapt.model_dump(exclude_none=True), **adaptation},
            data={"files": {split: [{"path": str(f), "sha256": sha256_file(f)} for f in fs]
                            for split, fs in files.items()},
                  "rows": {"train": len(train_rows), "test": len(held_rows)}, "split": recipe.data.split.model_dump()},
            recipe_sha256=sha256_bytes(recipe_yaml.encode()),
            metrics={reference: rows[0][1], "derived": rows[1][1], "reference": reference, "parity": parity,
                     "tokens_per_s": hist.tokens_per_s},
            license=base.license,
            runtime=runtime_section(next(trained.parameters()).device, precision=hist.precision_choice,
                                    seconds=hist.seconds, steps=len(hist.steps), tokens_per_s=hist.tokens_per_s,
                                    compiled=hist.compiled, fused_lora_layers=hist.fused_lora_layers))
        compression = [(f"{reference} (as published)", unpruned), ("pruned, before healing", pruned),
                       ("derived (pruned and healed)", measured(unwrap(trained), derived_scores, held_rows,
                                                               metric_names))] if prunes else None
        if compression:
            lineage["metrics"]["compression"] = dict(compression)
        report = render_lm_report(lineage, rows, metric_names, reference, base_scores, derived_scores, hist, parity,
                                  compression)
        run.finish(lineage=lineage, card=model_card(lineage, rows, metric_names, "transformers"),
                   report=report, rows=rows, metrics=metric_names, reference=reference, quiet=quiet)
    shutil.rmtree(run.checkpoint_dir, ignore_errors=True)  # only needed while the run can be resumed
    return run
