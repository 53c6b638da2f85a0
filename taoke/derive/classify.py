"""The classification / regression workflow: data -> model + edits + adaptation -> train -> evaluate derived
AND base on the same test split -> the run directory.

Read top to bottom; each stage calls one module. Everything that can fail on user input (base, data,
edits) runs before the run directory is created.
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rich.console import Console
from rich.table import Table
from sklearn.model_selection import KFold, StratifiedKFold

from taoke.adapt.methods import adapt
from taoke.data.encode import encode_frame, targets_of, text_column, to_target_units
from taoke.data.image import augment as augment_images
from taoke.data.prepare import DataPlan
from taoke.data.tabular import feature_names
from taoke.data.text import train_word_tokenizer
from taoke.derive.card import model_card
from taoke.derive.record import build_lineage, runtime_section
from taoke.edit import EditResult, apply_edits, apply_post_adapt
from taoke.errors import RecipeError
from taoke.evaluate import baselines
from taoke.evaluate.latency import latency_ms, row_batches
from taoke.evaluate.metrics import confusion, metrics_from_outputs
from taoke.evaluate.plots import comparison_png, confusion_png, curves_png
from taoke.evaluate.report import render_report
from taoke.files import sha256_bytes
from taoke.library import BaseRef, resolve
from taoke.models.scratch import build_scratch
from taoke.models.task_model import (HFClassifier, head_io, load_hf_classifier, load_task_model, save_task_model,
                                     scratch_kwargs)
from taoke.models.tokenizer import load_tokenizer
from taoke.recipe import CLASSIFICATION_METRICS, REGRESSION_METRICS, Augment, Recipe, recipe_to_yaml
from taoke.run import Run
from taoke.train.checkpoint import checkpoint_position
from taoke.train.batches import batch_indices
from taoke.train.classifier import fit, predict
from taoke.train.core import seed_everything

console = Console(stderr=True)


@dataclass
class Built:
    model: torch.nn.Module
    tokenizer: object | None
    meta: dict            # what goes to model/taoke.json
    edits: list[dict]
    edited: EditResult
    compression: list[tuple[str, dict]] = field(default_factory=list)   # prune: before / after, measured
    teacher: torch.nn.Module | None = None                              # train.distill's teacher


def build_model(recipe: Recipe, base: BaseRef, plan: DataPlan, measure: bool = False) -> Built:
    """The model with its edits applied; `measure` also scores the model before and after a prune edit."""
    kind = plan.spec["inputs"]["kind"]
    regression = plan.regression
    outputs = 1 if regression else len(plan.labels)
    edits = recipe.steps("edits")
    tokenizer = None
    head_spec = None
    parent_meta: dict = {}
    labels_changed = False

    if base.is_scratch:
        arch = base.name.split(":", 1)[1]
        inputs = plan.spec["inputs"]
        derived = {}
        if kind == "text":
            texts = text_column(plan.splits["train"], inputs)
            tokenizer = train_word_tokenizer(texts, inputs["vocab_size"])
            derived = {"vocab_size": len(tokenizer), "pad_id": tokenizer.pad_token_id,
                       "max_length": inputs["max_length"]}
        elif kind == "image":
            derived = {"in_channels": inputs["channels"], "image_size": inputs["size"],
                       "in_features": inputs["channels"] * inputs["size"] ** 2}
        else:
            derived = {"in_features": len(feature_names(inputs["params"]))}
        cfg = scratch_kwargs(arch, dict(recipe.model), derived)
        if recipe.train.dropout is not None:
            cfg["dropout"] = recipe.train.dropout
        model = build_scratch(arch, outputs, cfg)
        arch_name, arch_cfg, num_outputs_base = base.name, cfg, outputs
    elif base.format == "run":
        model, parent_meta, tokenizer = load_task_model(base.path)
        if kind == "text" and parent_meta["inputs"].get("max_length"):
            plan.spec["inputs"]["max_length"] = min(plan.spec["inputs"]["max_length"],
                                                    parent_meta["inputs"]["max_length"])
        if parent_meta["inputs"]["kind"] == "text" and parent_meta["inputs"].get("normalize") and \
                not plan.spec["inputs"].get("normalize"):
            plan.spec["inputs"]["normalize"] = parent_meta["inputs"]["normalize"]
        if kind == "image":  # the parent's network expects its own input size/normalisation
            for key in ("size", "channels", "mean", "std"):
                plan.spec["inputs"][key] = parent_meta["inputs"][key]
        labels_changed = parent_meta.get("labels") != plan.labels
        head_spec = parent_meta.get("head")
        arch_name, arch_cfg = parent_meta["arch"], parent_meta.get("arch_config", {})
        num_outputs_base = parent_meta.get("num_outputs_base", outputs)
    else:
        model = load_hf_classifier(base.path, outputs, plan.labels, regression, recipe.train.dropout)
        tokenizer = load_tokenizer(base.path)
        arch_name, arch_cfg, num_outputs_base = "hf", {}, outputs

    _, current_out = head_io(model)
    if not labels_changed and current_out != outputs:
        labels_changed = True
    teacher = teacher_model(recipe, base, model, labels_changed, plan)
    arch_cfg = dict(arch_cfg)
    prunes = any(op == "prune" for op, _ in edits)
    test = encode_frame(plan.splits["test"], plan.spec, tokenizer) if measure and prunes and "test" in plan.splits \
        else None
    compression = [compression_row("unpruned (before the edits)", model, test, plan)] if test is not None else []
    calibration = lambda n: calibration_batches(plan, tokenizer, n, recipe.train.seed)  # noqa: E731
    edited = apply_edits(model, tokenizer, edits, outputs, labels_changed, head_spec, arch_cfg, calibration)
    if test is not None:
        compression.append(compression_row("pruned, before healing", model, test, plan))
    meta = {"task": recipe.task, "arch": arch_name, "arch_config": arch_cfg, "num_outputs_base": num_outputs_base,
            "labels": plan.labels, "label_column": plan.spec["label_column"], "inputs": plan.spec["inputs"],
            "target_scale": plan.spec.get("target_scale"), "head": edited.head_spec}
    # heads pruned here or in the parent: a BERT config cannot say so, the loader resizes the attention
    heads = next((r["heads"][1] for r in edited.records if r["op"] == "prune" and not r["plain_transformers"]),
                 parent_meta.get("attention_heads"))
    if heads:
        meta["attention_heads"] = heads
    return Built(model, tokenizer, meta, edited.records, edited, compression, teacher)


def teacher_model(recipe: Recipe, base: BaseRef, model: torch.nn.Module, labels_changed: bool,
                  plan: DataPlan) -> torch.nn.Module | None:
    """train.distill's teacher: the base as loaded (a copy taken before the edits), or another run."""
    cfg = recipe.train.distill
    if cfg is None:
        return None
    if cfg.teacher == "base":
        if base.format != "run" or labels_changed:
            raise RecipeError("train.distill.teacher: base needs a base that already predicts these labels (a run "
                              "of this task with the same labels, e.g. the run a prune edit cuts down); give a "
                              "teacher run instead")
        return copy.deepcopy(model).eval()
    teacher, meta, _ = load_task_model(resolve(cfg.teacher).path)
    if meta.get("labels") != plan.labels:
        raise RecipeError(f"train.distill.teacher '{cfg.teacher}' predicts {meta.get('labels')}, not this "
                          f"recipe's labels {plan.labels}")
    if meta.get("inputs") != plan.spec["inputs"]:
        differ = sorted(k for k in {*meta.get("inputs", {}), *plan.spec["inputs"]}
                        if meta.get("inputs", {}).get(k) != plan.spec["inputs"].get(k))
        raise RecipeError(f"train.distill.teacher '{cfg.teacher}' reads its inputs differently ({', '.join(differ)}); "
                          "a teacher must take the same encoded inputs as the student")
    return teacher.eval()


def calibration_batches(plan: DataPlan, tokenizer, samples: int, seed: int):
    """Training batches for edits that measure activations: a seeded sample of the training split."""
    train = plan.splits["train"]
    frame = train.sample(min(samples, len(train)), random_state=seed)
    encoded = encode_frame(frame, plan.spec, tokenizer)
    return (encoded.batch(idx) for idx in batch_indices(encoded, 16, shuffle=False))


def compression_row(name: str, model: torch.nn.Module, test, plan: DataPlan) -> tuple[str, dict]:
    """Test-split scores, parameter count and measured latency of the model as it is now."""
    out = predict(model, test, precision="fp32")
    units = lambda x: to_target_units(x, plan.spec)  # noqa: E731
    m = {k: v for k, v in metrics_from_outputs(units(out), units(test.targets), plan.regression).items()
         if not isinstance(v, dict)}
    return name, {**m, "params": sum(p.numel() for p in model.parameters()), **latency_ms(model, row_batches(test))}


def evaluate_base(recipe: Recipe, base: BaseRef, plan: DataPlan, test_targets: torch.Tensor) -> tuple[list, list]:
    """Score what the derived model is compared with. Returns (rows, notes)."""
    regression, labels = plan.regression, plan.labels
    inputs = plan.spec["inputs"]
    train, test = plan.splits["train"], plan.splits["test"]
    y_train = to_target_units(targets_of(train, plan.spec), plan.spec).numpy()
    y_test = to_target_units(test_targets, plan.spec).numpy()
    rows, notes = [], []
    if base.format == "run":
        parent, parent_meta, tok = load_task_model(base.path)
        if parent_meta.get("labels") == labels:
            enc = encode_frame(test, parent_meta, tok)
            out = predict(parent, enc, recipe.eval.batch_size)
            rows.append(("parent", metrics_from_outputs(to_target_units(out, parent_meta),
                                                        to_target_units(enc.targets, parent_meta), regression, labels)))
            notes.append(f"parent = the run this model derives from ({base.name}), scored as is.")
        else:
            notes.append("parent has a different label set; it cannot be scored on this test split.")
        return rows, notes
    if base.is_scratch:
        if inputs["kind"] == "text":
            pred = baselines.classical_text_baseline(text_column(train, inputs), y_train, text_column(test, inputs),
                                                     regression, recipe.train.seed)
            what = "TF-IDF (1-2 grams) + logistic regression"
        else:
            xtr = encode_frame(train, plan.spec).dense.flatten(1).numpy()
            xte = encode_frame(test, plan.spec).dense.flatten(1).numpy()
            pred = baselines.linear_probe(xtr, y_train, xte, regression, recipe.train.seed)
            what = "ridge regression" if regression else "logistic regression on the raw features/pixels"
        rows.append(("baseline", baselines.score(y_test, pred, regression, labels)))
        notes.append(f"trained from scratch: no pretrained base; baseline = {what} on the same split.")
        return rows, notes
    # A pretrained encoder: linear probe on its frozen features (+ zero-shot by label names).
    zero_shot = recipe.eval.zero_shot and not regression and (Path(base.path) / "modules.json").exists()
    text_sets = [text_column(train, inputs), text_column(test, inputs)] + ([labels] if zero_shot else [])
    emb_train, emb_test, *label_emb = baselines.encoder_embeddings(base.path, text_sets, inputs["max_length"])
    pred = baselines.linear_probe(emb_train, y_train, emb_test, regression, recipe.train.seed)
    rows.append(("base (linear probe)", baselines.score(y_test, pred, regression, labels)))
    notes.append("base (linear probe) = logistic regression on the base's frozen mean-pooled embeddings, "
                 "fitted on the training split.")
    if zero_shot:
        zs = baselines.zero_shot(emb_test, label_emb[0])
        rows.append(("base (zero-shot)", baselines.score(y_test, zs, False, labels)))
        notes.append("base (zero-shot) = nearest label name by cosine similarity of sentence embeddings.")
    return rows, notes


def cross_validate(recipe: Recipe, base: BaseRef, plan: DataPlan, quiet: bool) -> dict:
    """k-fold cross-validation over the non-test rows: a fresh model per fold, scored on its held-out fold."""
    pool = pd.concat([plan.splits["train"], plan.splits.get("validation", plan.splits["train"].iloc[:0])],
                     ignore_index=True)
    k = recipe.k_fold
    y = pool[recipe.data.label].astype(str)
    splitter = KFold(k, shuffle=True, random_state=recipe.data.split.seed) if plan.regression or \
        y.value_counts().min() < k else StratifiedKFold(k, shuffle=True, random_state=recipe.data.split.seed)
    folds = []
    for i, (tr, te) in enumerate(splitter.split(pool, y)):
        seed_everything(recipe.train.seed)
        fold_plan = DataPlan({"train": pool.iloc[tr].reset_index(drop=True),
                              "test": pool.iloc[te].reset_index(drop=True)}, plan.labels, plan.spec, plan.files)
        built = build_model(recipe, base, fold_plan)
        adapt(built.model, recipe.adapt)
        apply_post_adapt(built.model, built.edited)
        train_enc = encode_frame(fold_plan.splits["train"], built.meta, built.tokenizer)
        test_enc = encode_frame(fold_plan.splits["test"], built.meta, built.tokenizer)
        cfg = recipe.train.model_copy(update={"early_stopping": None})  # no validation split inside a fold
        fit(built.model, train_enc, None, cfg, regression=plan.regression, quiet=True, teacher=built.teacher)
        out = predict(built.model, test_enc, recipe.eval.batch_size)
        units = lambda x: to_target_units(x, built.meta)  # noqa: E731
        m = metrics_from_outputs(units(out), units(test_enc.targets), plan.regression)
        folds.append({k2: v for k2, v in m.items() if not isinstance(v, dict)})
        if not quiet:
            console.print(f"fold {i + 1}/{k}: " + ", ".join(f"{k2} {v:.4f}" for k2, v in folds[-1].items()))
    keys = folds[0].keys()
    return {"k": k, "folds": folds, "mean": {m: float(np.mean([f[m] for f in folds])) for m in keys},
            "std": {m: float(np.std([f[m] for f in folds], ddof=1)) for m in keys}}


def describe(recipe: Recipe, base: BaseRef, built: Built, adaptation: dict, plan: DataPlan) -> None:
    """--dry-run: the resulting architecture, parameter counts and what changed; nothing is trained or written."""
    c = Console()
    c.print(f"[bold]{recipe.name}[/]: {base.name} -> {recipe.task} (dry run; nothing trained or written)")
    c.print(f"data rows: {plan.rows()}; outputs: {len(plan.labels) if plan.labels else 1}")
    c.print(built.model)
    t = Table(title="parameters")
    t.add_column("total", justify="right")
    t.add_column("trainable", justify="right")
    t.add_column("trainable %", justify="right")
    total, trainable = adaptation["total_params"], adaptation["trainable_params"]
    t.add_row(f"{total:,}", f"{trainable:,}", f"{100 * trainable / total:.2f}")
    c.print(t)
    c.print(f"adaptation: {recipe.adapt.method}")
    for e in built.edits or [{"op": "none"}]:
        c.print("edit: " + ", ".join(f"{k}={v}" for k, v in e.items()))


def derive_classifier(recipe: Recipe, base: BaseRef, plan: DataPlan, out: str | None = None, quiet: bool = False,
                      dry_run: bool = False, resume: Run | None = None) -> Run | None:
    """Train and judge a classifier/regressor as the recipe says, on `plan` (prepare_data of the recipe, made by
    `derive` after check_classifier_base); returns the complete run (None for a dry run)."""
    # 2. model + structure edits + adaptation (step 1, the data, is `plan`)
    seed_everything(recipe.train.seed)  # model init (new heads, scratch weights) is seeded too
    built = build_model(recipe, base, plan, measure=not dry_run)
    adaptation = adapt(built.model, recipe.adapt)
    apply_post_adapt(built.model, built.edited)
    adaptation["trainable_params"] = sum(p.numel() for p in built.model.parameters() if p.requires_grad)
    if adaptation["trainable_params"] == 0:
        raise RecipeError("the edits and adaptation leave no trainable parameters.")
    if recipe.train.distill is not None:
        adaptation["distill"] = recipe.train.distill.model_dump()
    if recipe.adapt.method in ("lora", "dora"):
        built.meta["adapter"] = {"method": recipe.adapt.method, "merged": recipe.adapt.merge, "base": base.reference}
    if dry_run:
        return describe(recipe, base, built, adaptation, plan)
    regression = plan.regression
    metric_names = list(REGRESSION_METRICS) if regression else \
        [m for m in recipe.eval.metrics if m in CLASSIFICATION_METRICS] or ["accuracy", "macro_f1"]
    if "test" not in plan.splits or not len(plan.splits["test"]):
        raise RecipeError("no test split: set data.split.test > 0 or data.test to a file.")
    encoded = {k: encode_frame(v, built.meta, built.tokenizer) for k, v in plan.splits.items()}

    # 3. run directory (from here on, a failure leaves status.json saying so)
    run = resume or Run.create(recipe.name, out)
    recipe_yaml = recipe_to_yaml(recipe)
    if resume:
        position = checkpoint_position(run.checkpoint_dir)
        run.truncate_metrics(position["step"], position["epoch"])
    run.write_recipe(recipe_yaml)
    run.write_json("splits.json", {"source": recipe.data.train, "rows": plan.row_index})
    with run.running() as log:
        total, trainable = adaptation["total_params"], adaptation["trainable_params"]
        console.print(f"[bold]{recipe.name}[/]: {base.name} -> {recipe.task}; rows {plan.rows()}; "
                      f"trainable {trainable:,} / {total:,} params")
        # 4. train
        aug_cfg = built.meta["inputs"].get("augment")
        augment = None
        if aug_cfg:
            a = Augment(**aug_cfg)
            augment = lambda b: {**b, "pixel_values": augment_images(b["pixel_values"], a)}  # noqa: E731
        units = lambda x: to_target_units(x, built.meta)  # noqa: E731
        evaluate = lambda o, t: {k: v for k, v in metrics_from_outputs(units(o), units(t), regression).items()  # noqa: E731
                                 if not isinstance(v, dict)}
        result = fit(built.model, encoded["train"], encoded.get("validation"), recipe.train, regression=regression,
                     evaluate=evaluate, augment=augment, on_epoch=lambda r: log({"type": "epoch", **r}),
                     on_step=lambda r: log({"type": "step", **r}), checkpoint_dir=run.checkpoint_dir,
                     resume=resume is not None, quiet=quiet, teacher=built.teacher)
        cv = cross_validate(recipe, base, plan, quiet) if recipe.k_fold else None
        # 5. evaluate derived and base on the same test split
        test_out = predict(built.model, encoded["test"], recipe.eval.batch_size)
        derived = metrics_from_outputs(units(test_out), units(encoded["test"].targets), regression, plan.labels,
                                       per_class=True)
        base_rows, notes = evaluate_base(recipe, base, plan, encoded["test"].targets) if recipe.eval.compare_base \
            else ([], [])
        rows = base_rows + [("derived", {k: v for k, v in derived.items() if k != "per_class"})]
        compression = built.compression and built.compression + [
            compression_row("derived (pruned and healed)", built.model, encoded["test"], plan)]
        reference = base_rows[0][0] if base_rows else None
        log({"type": "test", "derived": rows[-1][1], **{name: m for name, m in base_rows}})

        # 6. plots
        plots_dir = run.path / "plots"
        plots = ["curves.png"]
        curves_png(result.history, plots_dir / "curves.png", f"{recipe.name}: training curves")
        if not regression:
            cm = confusion(encoded["test"].targets.numpy(), test_out.argmax(-1).numpy(), len(plan.labels))
            confusion_png(cm, plan.labels, plots_dir / "confusion_derived.png", "derived model, test split")
            plots.append("confusion_derived.png")
        comparison_png(rows, metric_names, plots_dir / "comparison.png", "base vs derived (test split)")
        plots.append("comparison.png")

        # 7. model, then lineage, card and report
        # HF's base_model_relation: an unmerged LoRA is an adapter; a merged one is a fine-tune of one base.
        relation = "adapter" if "adapter" in built.meta and not recipe.adapt.merge else "finetune"
        lineage = build_lineage(
            name=recipe.name, run_id=run.name, task=recipe.task, base=base, relation=relation,
            edits=built.edits, adaptation=adaptation,
            data={"files": plan.files, "rows": plan.rows(), "columns": {"text": recipe.data.text,
                  "label": recipe.data.label}, "preprocess": recipe.preprocess,
                  "split": recipe.data.split.model_dump(), "labels": plan.labels},
            recipe_sha256=sha256_bytes(recipe_yaml.encode()),
            metrics={"derived": rows[-1][1], "derived_per_class": derived.get("per_class"), "k_fold": cv,
                     **({"compression": dict(compression)} if compression else {}),
                     **{name: m for name, m in base_rows}, "reference": reference},
            license=base.license if not base.is_scratch else None,
            runtime=runtime_section(next(built.model.parameters()).device, precision=result.precision_choice,
                                    seconds=result.seconds, samples_per_s=result.samples_per_s))
        save_task_model(built.model.cpu(), run.model_dir, built.meta, built.tokenizer)
        library = "transformers" if isinstance(built.model, HFClassifier) and not built.meta.get("head") else "taoke"
        fit_info = {"epochs_run": len(result.history), "seconds": result.seconds, "precision": result.precision,
                    "samples_per_s": result.samples_per_s, "best_epoch": result.best_epoch, "monitor": result.monitor}
        report = render_report(lineage=lineage, rows=rows, metrics=metric_names, reference=reference, notes=notes,
                               per_class=derived.get("per_class"), fit=fit_info, plots=plots, k_fold=cv,
                               compression=compression)
        run.finish(lineage=lineage, card=model_card(lineage, rows, metric_names, library), report=report,
                   rows=rows, metrics=metric_names, reference=reference, quiet=quiet)
    shutil.rmtree(run.checkpoint_dir, ignore_errors=True)  # only needed while the run can be resumed
    return run
