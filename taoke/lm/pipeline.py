"""`taoke derive` for causal LMs (causal-lm, sft, dpo): base -> data -> edits -> train -> evaluate derived
AND base on the same held-out rows -> save (merged, parity-checked) -> run dir with card and lineage."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from rich.console import Console

from taoke.errors import DataError, ModelError, RecipeError
from taoke.library import BaseRef
from taoke.recipe import Recipe, recipe_to_yaml
from taoke.utils import sha256_bytes, sha256_file, write_json_atomic, write_text_atomic

console = Console(stderr=True)
PARITY_PROMPTS = ["What is a computer?", "Tell me a joke.", "How do I reset my password?"]


def _lm_train_config(recipe: Recipe) -> dict:
    t, a, lm = recipe.train, recipe.adapt, recipe.lm
    if a.method == "head":
        raise RecipeError("adapt.method 'head' has no meaning for a causal LM; use full, freeze, lora or dora.")
    return dict(method=a.method, freeze_layers=a.layers, r=a.r, alpha=a.alpha, dropout=a.dropout,
                target_modules=a.target_modules, lr=t.lr, weight_decay=t.weight_decay,
                scheduler=t.scheduler, warmup_ratio=t.warmup_ratio,
                max_steps=t.max_steps, epochs=t.epochs, batch_size=t.batch_size, grad_accum=t.grad_accum,
                max_grad_norm=t.max_grad_norm or 0.0, seq_len=lm.seq_len, packing=lm.packing,
                precision=t.precision, seed=t.seed, threads=lm.threads, compile=lm.compile, progress=True)


def _split(items: list, test: float, seed: int) -> tuple[list, list]:
    idx = list(range(len(items)))
    random.Random(seed).shuffle(idx)
    n_held = max(1, int(round(len(items) * test)))
    if len(items) - n_held < 1:
        raise DataError(f"{len(items)} examples are too few to hold out {test:.0%} for evaluation.")
    held = set(idx[:n_held])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def _read(recipe: Recipe, tok):
    """Raw examples of the task from data.train (and data.test), split into train / held-out."""
    from taoke.lm.data import read_conversations, read_dpo_pairs, read_text_documents

    d = recipe.data
    path = Path(d.train)
    if not path.exists():
        raise DataError(f"{d.train}: data file not found. Check data.train in the recipe.")
    if recipe.task == "causal-lm":
        files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
        reader = lambda p: read_text_documents(p, recipe.lm.separator)  # noqa: E731
    elif recipe.task == "sft":
        files, reader = [path], read_conversations
    else:
        files, reader = [path], read_dpo_pairs
    items = [x for f in files for x in reader(f)]
    if d.max_rows and len(items) > d.max_rows:
        items = random.Random(d.split.seed).sample(items, d.max_rows)
    if d.test:
        return items, reader(d.test), files + [Path(d.test)]
    train, held = _split(items, d.split.test or 0.1, d.split.seed)
    return train, held, files


def _encode(recipe: Recipe, tok, items: list) -> list[dict]:
    from taoke.lm.data import encode_conversations, encode_documents
    from taoke.lm.dpo import encode_pairs

    n = recipe.lm.seq_len
    if recipe.task == "causal-lm":
        return encode_documents(tok, items, n)
    if recipe.task == "sft":
        return encode_conversations(tok, items, n)
    return encode_pairs(tok, items, n)


LM_EDITS = ("drop_layers", "expand_layers", "expand_vocab")


def _check_edits(recipe: Recipe, model) -> None:
    """Refuse bad edits before anything runs (the base is evaluated before the edits are applied)."""
    from taoke.edit.layers import check_indices, find_stack, kept_layers
    from taoke.edit.vocab import read_tokens

    depth = len(find_stack(model)[2]) if any(op != "expand_vocab" for op, _ in recipe.steps("edits")) else 0
    for op, cfg in recipe.steps("edits"):
        if op in ("drop_layers", "expand_layers") and _saves_adapter_only(recipe):
            raise RecipeError(f"edits.{op} changes the architecture, which an adapter saved alone cannot carry "
                              "(it is applied to the published base): set adapt.merge: true.")
        if op not in LM_EDITS:
            raise RecipeError(f"edit '{op}' does not apply to causal LMs (use {', '.join(LM_EDITS)}).")
        if op == "drop_layers":
            depth = len(kept_layers(cfg.keep, cfg.every, depth))
        elif op == "expand_layers":
            check_indices(cfg.after, depth, "expand_layers.after")
            depth += len(set(cfg.after))
            if cfg.train_only_new and recipe.adapt.method in ("lora", "dora"):
                raise RecipeError(f"edits.expand_layers.train_only_new trains the new blocks in full, which "
                                  f"adapt.method '{recipe.adapt.method}' contradicts: set adapt.method: full, "
                                  "or train_only_new: false.")
        else:
            read_tokens(cfg.tokens, cfg.file)


def _saves_adapter_only(recipe: Recipe) -> bool:
    return recipe.adapt.method in ("lora", "dora") and not recipe.adapt.merge


def _new_token_ids(edits: list[dict]) -> list[int] | None:
    """Ids of the tokens expand_vocab added, for LoRA/DoRA to train their embedding rows (else they stay at
    their initial value: the adapters do not touch the embedding; full/freeze ignore the list)."""
    ids = [i for e in edits if e["op"] == "expand_vocab" for i in range(e["vocab_before"], e["vocab_after"])]
    return ids or None


def _apply_edits(recipe: Recipe, model, tok) -> tuple[list[dict], list[str]]:
    """Apply the edits (already checked by _check_edits) in order; returns their records and, for
    train_only_new, the names that alone train."""
    from taoke.edit.layers import drop_layers, expand_layers
    from taoke.edit.vocab import expand_vocab, read_tokens

    records, train_only = [], []
    for op, cfg in recipe.steps("edits"):
        before = sum(p.numel() for p in model.parameters())
        if op == "drop_layers":
            detail = drop_layers(model, cfg.keep, cfg.every, {})
        elif op == "expand_layers":
            detail, prefixes = expand_layers(model, cfg.after, {})
            train_only += prefixes if cfg.train_only_new else []
        else:
            detail = expand_vocab(model, tok, read_tokens(cfg.tokens, cfg.file), cfg.init)
        records.append({"op": op, **cfg.model_dump(exclude_none=True), **detail, "params_before": before,
                        "params_after": sum(p.numel() for p in model.parameters())})
    if train_only and any(r["op"] == "expand_vocab" for r in records):
        # new tokens need trained rows too: embeddings (and an untied head) join the new blocks
        tables = [model.get_input_embeddings(), model.get_output_embeddings()]
        ids = {id(p) for m in tables if m is not None for p in m.parameters()}
        train_only += [n for n, p in model.named_parameters() if id(p) in ids]
    return records, train_only


def _prompts_and_refs(recipe: Recipe, held_items: list) -> tuple[list, list]:
    """Held-out prompts (all turns before the last assistant turn) and their reference answers."""
    if recipe.task != "sft":
        return [], []
    prompts, refs = [], []
    for conv in held_items[: recipe.lm.gen_prompts]:
        last = max(i for i, m in enumerate(conv) if m["role"] == "assistant")
        prompts.append(conv[:last])
        refs.append(conv[last]["content"])
    return prompts, refs


def _scores(recipe: Recipe, model, tok, held_rows, prompts, refs, cfg) -> dict:
    from taoke.lm.train import evaluate_lm, generate_eval

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if recipe.task == "dpo":
        from taoke.lm.dpo import evaluate_dpo

        return evaluate_dpo(model, tok, held_rows, beta=recipe.lm.beta)
    out = evaluate_lm(model, held_rows, cfg, pad)
    out["bits_per_byte"] = _bits_per_byte(out, held_rows, tok)
    if prompts:
        gen = generate_eval(model, tok, prompts, refs, recipe.lm.gen_metric, max_new_tokens=recipe.lm.max_new_tokens,
                            samples=len(prompts))
        out[recipe.lm.gen_metric] = gen["score"]
        out["samples"] = gen["samples"]
    return out


def _bits_per_byte(scores: dict, rows: list[dict], tok) -> float:
    """Held-out loss per UTF-8 byte of the labelled text, in bits: unlike loss per token it stays comparable
    when the tokenizer changes (vocabulary expansion)."""
    from taoke.lm.data import IGNORE

    n_bytes = sum(len(tok.decode([t for t in r["labels"][1:] if t != IGNORE]).encode("utf-8")) for r in rows)
    return scores["loss"] * scores["tokens"] / math.log(2) / max(n_bytes, 1)


def derive_lm(recipe: Recipe, base: BaseRef, out: str | None, quiet: bool = False, dry_run: bool = False):
    import torch

    from taoke.derive import new_run_dir
    from taoke.runs import complete, running
    from taoke.evaluate.plots import lm_curves_png
    from taoke.lineage.card import model_card
    from taoke.lineage.record import build_lineage
    from taoke.lm.load import load_adapter_run, load_causal_lm
    from taoke.lm.merge import parity_check, save_merged
    from taoke.lm.train import train_lm

    if base.is_scratch:
        raise ModelError(f"{recipe.task} needs a pretrained causal LM base (e.g. smollm2-135m), not {base.name}.")
    cfg = _lm_train_config(recipe)
    if recipe.lm.threads:
        torch.set_num_threads(recipe.lm.threads)
    model, tok = load_causal_lm(base.run_dir / "model" if base.is_run else base.path)
    if recipe.lm.chat_template or recipe.task in ("sft", "dpo"):
        from taoke.lm.data import set_chat_template

        set_chat_template(tok, recipe.lm.chat_template)
    train_items, held_items, files = _read(recipe, tok)
    _check_edits(recipe, model)  # a bad edit fails now, not after the base evaluation
    if dry_run:
        from taoke.lm.train import adapt_lm

        edits, train_only = _apply_edits(recipe, model, tok)
        model, counts = adapt_lm(model, {**cfg, "train_only": train_only or None,
                                         "trainable_tokens": _new_token_ids(edits)})
        Console().print(model)
        Console().print(f"{counts['total_params']:,} parameters, {counts['trainable_params']:,} trainable "
                        f"({counts['trainable_params'] / counts['total_params']:.2%}); adaptation "
                        f"{recipe.adapt.method}; edits {edits or 'none'}; {len(train_items)} train / "
                        f"{len(held_items)} held-out examples")
        return None
    prompts, refs = _prompts_and_refs(recipe, held_items)

    run_dir = new_run_dir(recipe, out)
    recipe_yaml = recipe_to_yaml(recipe)
    write_text_atomic(run_dir / "recipe.yaml", recipe_yaml)
    with running(run_dir) as log:
        console.print(f"[bold]{recipe.name}[/]: {base.name} -> {recipe.task}; {len(train_items)} train / "
                      f"{len(held_items)} held-out examples; adapt {recipe.adapt.method}")
        # the reference is the base as published: evaluated before any edit changes it
        held_rows = _encode(recipe, tok, held_items)
        base_scores = _scores(recipe, model, tok, held_rows, prompts, refs, cfg)
        log({"type": "base", **{k: v for k, v in base_scores.items() if k != "samples"}})
        edits, train_only = _apply_edits(recipe, model, tok)
        cfg["train_only"] = train_only or None
        cfg["trainable_tokens"] = _new_token_ids(edits)
        if any(e["op"] == "expand_vocab" for e in edits):  # the new tokens change how the held-out text splits
            held_rows = _encode(recipe, tok, held_items)
        train_rows = _encode(recipe, tok, train_items)
        if recipe.task == "dpo":
            from taoke.lm.dpo import train_dpo

            hist = train_dpo(model, tok, train_rows, None, cfg, beta=recipe.lm.beta,
                             on_step=lambda r: log({"type": "step", **r}))
        else:
            hist = train_lm(model, tok, train_rows, None, cfg, on_step=lambda r: log({"type": "step", **r}))
        trained = hist.model
        derived_scores = _scores(recipe, trained, tok, held_rows, prompts, refs, cfg)
        log({"type": "test", **{k: v for k, v in derived_scores.items() if k != "samples"}})

        model_dir = run_dir / "model"
        adapter_only = _saves_adapter_only(recipe)
        if adapter_only:
            trained.save_pretrained(model_dir)
            tok.save_pretrained(model_dir)
        else:
            save_merged(trained, tok, model_dir)
        write_json_atomic(model_dir / "taoke.json", {
            "format": "taoke-task-model", "task": recipe.task, "arch": "hf-causal-lm",
            "adapter": {"method": recipe.adapt.method, "merged": False,
                        "base": base.name if base.source.startswith(("package:", "hub:")) else str(base.path)}
            if adapter_only else None,
            "seq_len": recipe.lm.seq_len, "chat_template": tok.chat_template is not None})
        # an adapter is checked the way taoke chat/predict load it: its base with the adapter merged in
        load = (lambda d: load_adapter_run(d, device="cpu")[0]) if adapter_only else None
        parity = parity_check(model_dir, trained, tok, PARITY_PROMPTS, load=load)  # raises on a mismatch
        parity["reloaded"] = "as its base with the adapter merged in" if adapter_only else "with plain transformers"

        lm_curves_png(hist.steps, run_dir / "plots" / "loss.png", f"{recipe.name}: training loss")
        metric_names = [k for k in ("loss", "perplexity", "bits_per_byte", recipe.lm.gen_metric, "dpo_loss",
                                    "reward_acc", "preference_acc") if k in derived_scores]
        strip = lambda m: {k: v for k, v in m.items() if k in metric_names}  # noqa: E731
        reference = "parent" if base.is_run else "base"
        rows = [(reference, strip(base_scores)), ("derived", strip(derived_scores))]
        relation = "adapter" if adapter_only else "finetune"
        adaptation = {**recipe.adapt.model_dump(exclude_none=True), **hist.adaptation}
        lineage = build_lineage(
            name=recipe.name, run_id=run_dir.name, task=recipe.task, base=base, relation=relation, edits=edits,
            adaptation=adaptation,
            data={"files": {"train": [{"path": str(f), "sha256": sha256_file(f)} for f in files]},
                  "rows": {"train": len(train_rows), "test": len(held_rows)}, "preprocess": recipe.preprocess,
                  "split": recipe.data.split.model_dump()},
            recipe_sha256=sha256_bytes(recipe_yaml.encode()),
            metrics={reference: rows[0][1], "derived": rows[1][1], "reference": reference, "parity": parity,
                     "tokens_per_s": hist.tokens_per_s},
            license=base.license)
        write_text_atomic(model_dir / "README.md", model_card(lineage, rows, metric_names, "transformers"))
        write_text_atomic(run_dir / "report.md", _report(lineage, rows, metric_names, reference, base_scores,
                                                         derived_scores, hist, parity))
        complete(run_dir, lineage)
        from taoke.derive import print_table

        print_table(rows, metric_names, reference)
        console.print(f"run directory: [bold]{run_dir}[/]")
        return run_dir


def _report(lineage, rows, metrics, reference, base_scores, derived_scores, hist, parity) -> str:
    from taoke.evaluate.report import comparison_table

    lines = [f"# {lineage['name']}", "", f"- task: {lineage['task']}",
             f"- base: {lineage['base']['name']} ({lineage['base']['source']})",
             f"- adaptation: {lineage['adaptation'].get('method')} "
             f"({lineage['adaptation'].get('trainable_params') or 0:,} trainable parameters)",
             f"- edits: {', '.join(e['op'] for e in lineage['edits']) or 'none'}",
             f"- examples: {lineage['data']['rows']}",
             f"- training: {len(hist.steps)} steps, {hist.seconds:.1f} s, {hist.tokens_per_s:.0f} non-padding tokens/s"
             + (" (decoder layers compiled with torch.compile; the time includes compiling)" if hist.compiled else ""),
             f"- parity of the saved model (reloaded {parity.get('reloaded', 'with plain transformers')}) with the "
             f"trained one: {_parity(parity)}",
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
    lines += ["", "![loss](plots/loss.png)", ""]
    return "\n".join(lines)


def _parity(p: dict) -> str:
    if p.get("ok") is None:
        return p.get("note", "not checked")
    same = sum(g["identical"] for g in p.get("generations", []))
    return (f"{'passed' if p['ok'] else 'FAILED'}: max logit difference {p['max_logit_diff']:.2e}, "
            f"{same}/{len(p.get('generations', []))} greedy generations identical")


def evaluate_lm_model(model_dir: Path, data: str | None) -> dict:
    """`taoke eval RUN --data FILE` for a language model: held-out loss and perplexity on FILE."""
    from taoke.lm.data import encode_conversations, encode_documents, read_conversations, read_text_documents
    from taoke.lm.load import load_causal_lm
    from taoke.lm.train import evaluate_lm

    if not data:
        raise DataError("give --data FILE (a .txt/.jsonl text file, or chat/alpaca records)")
    meta = json.loads((Path(model_dir) / "taoke.json").read_text())
    model, tok = load_causal_lm(model_dir)
    seq = meta.get("seq_len", 512)
    if meta["task"] == "causal-lm" or Path(data).suffix == ".txt":
        rows = encode_documents(tok, read_text_documents(data), seq)
    else:
        rows = encode_conversations(tok, read_conversations(data), seq)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    m = evaluate_lm(model, rows, {"seq_len": seq, "progress": False}, pad)
    return {"model": str(model_dir), "data": data, "rows": len(rows), "metrics": m}


def predict_lm(model_dir: Path, inputs: list[str], file: str | None, output: str | None) -> list[dict]:
    """`taoke predict RUN "prompt" ...` or `--file prompts.jsonl [--out completions.jsonl]`."""
    from taoke.lm.chat import predict_file
    from taoke.lm.load import load_causal_lm
    from taoke.lm.train import generate

    model, tok = load_causal_lm(model_dir)
    if file:
        out = output or str(Path(file).with_suffix(".completions.jsonl"))
        predict_file(model, tok, file, out)
        return [json.loads(line) for line in Path(out).read_text().splitlines()]
    if not inputs:
        raise DataError("give prompts, or --file prompts.jsonl")
    completions = generate(model, tok, inputs, max_new_tokens=128)
    return [{"prompt": p, "completion": c} for p, c in zip(inputs, completions)]
