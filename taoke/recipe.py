"""The recipe: a pydantic schema that is the only configuration of a derive run.

YAML keys map one-to-one onto these models; every field says what it means and which tasks read it
(docs/recipe.md is generated from this file). Unknown keys are errors with a "did you mean" suggestion;
`--set a.b=value` overrides any key before validation. Rules that tie fields together are stated once,
on `Recipe`, so the CLI, `--dry-run` and the Python API refuse the same things.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from taoke.errors import RecipeError
from taoke.names import RULE as NAME_RULE, name_problem

CLASSIFICATION_TASKS = ("text-classification", "image-classification", "tabular-classification",
                        "tabular-regression")
LM_TASKS = ("causal-lm", "sft", "dpo")
TASKS = CLASSIFICATION_TASKS + LM_TASKS
CLASSIFICATION_METRICS = ("accuracy", "macro_f1", "weighted_f1", "macro_precision", "macro_recall")
REGRESSION_METRICS = ("mae", "rmse", "r2")
LM_EDITS = ("drop_layers", "expand_layers", "expand_vocab", "prune")
PRUNE_TASKS = ("text-classification",) + LM_TASKS


def field(default: Any = ..., doc: str = "", tasks: tuple[str, ...] = TASKS, **constraints) -> Any:
    """A recipe field with its one line of meaning and the tasks that read it (for docs/recipe.md)."""
    return Field(default, description=doc, json_schema_extra={"tasks": list(tasks)}, **constraints)


def factory(make, doc: str, tasks: tuple[str, ...] = TASKS) -> Any:
    return Field(default_factory=make, description=doc, json_schema_extra={"tasks": list(tasks)})


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SplitConfig(Strict):
    """How data.train is split when no explicit validation/test file is given."""
    validation: float = field(0.1, "fraction of rows held out for validation (early stopping, curves)",
                              CLASSIFICATION_TASKS, ge=0.0, lt=1.0)
    test: float = field(0.2, "fraction of rows held out to score base and derived", ge=0.0, lt=1.0)
    seed: int = field(0, "seed of the split (and of data.max_rows sampling)")
    stratify: bool = field(True, "keep class proportions in every split", CLASSIFICATION_TASKS)

    @model_validator(mode="after")
    def _fractions(self):
        if self.validation + self.test >= 1.0:
            raise ValueError("validation + test must leave rows for training (sum < 1)")
        return self


class DataConfig(Strict):
    """Where the examples come from and which columns hold what."""
    train: str = field(doc="csv | tsv | jsonl | json | parquet file, image folder, sklearn:<name>, or (causal-lm) "
                           "a folder of .txt files")
    validation: str | None = field(None, "explicit validation file (replaces split.validation)",
                                   CLASSIFICATION_TASKS)
    test: str | None = field(None, "explicit test file (replaces split.test)")
    split: SplitConfig = field(SplitConfig(), "split of data.train into train / validation / test")
    text: str = field("text", "column holding the text", ("text-classification",))
    label: str = field("label", "column holding the label (class name or number)", CLASSIFICATION_TASKS)
    image: str = field("image", "column holding image paths or arrays", ("image-classification",))
    features: list[str] | None = field(None, "feature columns (default: every column but the label)",
                                       ("tabular-classification", "tabular-regression"))
    categorical: list[str] | None = field(None, "columns to one-hot (default: the non-numeric ones)",
                                          ("tabular-classification", "tabular-regression"))
    max_rows: int | None = field(None, "use a seeded sample of this many rows (quick runs)", gt=0)


# Preprocessing steps: one key each, in order. Arguments validated per step.
class NormalizeText(Strict):
    """Unicode normalisation, lower-casing and whitespace clean-up of the text column."""
    lowercase: bool = field(True, "lower-case the text", ("text-classification",))
    strip: bool = field(True, "strip leading and trailing whitespace", ("text-classification",))
    unicode: Literal["NFKC", "NFC", "none"] = field("NFKC", "unicode normal form", ("text-classification",))
    collapse_whitespace: bool = field(True, "collapse runs of whitespace to one space", ("text-classification",))


class Dedup(Strict):
    """Drop rows whose (normalised) text repeats an earlier row, before splitting."""
    keep: Literal["first", "last"] = field("first", "which duplicate to keep", ("text-classification",))


class Tokenize(Strict):
    """Tokenizer limits."""
    max_length: int = field(128, "tokens per example; longer texts are cut", ("text-classification",), gt=0)
    vocab_size: int = field(20000, "word vocabulary of a tokenizer trained from scratch (scratch:lstm|gru|"
                                   "transformer)", ("text-classification",), gt=10)


class Resize(Strict):
    """Resize images to a square of `size` pixels."""
    size: int = field(32, "side in pixels", ("image-classification",), gt=0)
    channels: Literal[1, 3] | None = field(None, "convert to 1 (grey) or 3 (RGB) channels", ("image-classification",))


class NormalizeImage(Strict):
    """Per-channel standardisation of pixels."""
    mean: list[float] | None = field(None, "per-channel mean (default: measured on the training split)",
                                     ("image-classification",))
    std: list[float] | None = field(None, "per-channel std (default: measured on the training split)",
                                    ("image-classification",))


class Augment(Strict):
    """Random training-time augmentation, one affine warp per batch."""
    flip: bool = field(False, "random horizontal flips", ("image-classification",))
    crop: int = field(0, "random shifts of up to this many pixels", ("image-classification",), ge=0)
    rotate: float = field(0.0, "random rotations of up to this many degrees", ("image-classification",),
                          ge=0.0, le=45.0)


class Standardize(Strict):
    """Zero-mean, unit-variance numeric features (fitted on the training split)."""
    columns: list[str] | None = field(None, "reserved: every numeric feature is standardised",
                                      ("tabular-classification", "tabular-regression"))


class OneHot(Strict):
    """One-hot encode the categorical feature columns."""
    columns: list[str] | None = field(None, "reserved: data.categorical names the columns",
                                      ("tabular-classification", "tabular-regression"))


PREPROCESS_STEPS: dict[str, type[Strict]] = {
    "normalize_text": NormalizeText, "dedup": Dedup, "tokenize": Tokenize,
    "resize": Resize, "normalize": NormalizeImage, "augment": Augment,
    "standardize": Standardize, "one_hot": OneHot,
}


class InsertHidden(Strict):
    """The classic shell: hidden layers between the features and a new head."""
    units: list[int] = factory(lambda: [256], "widths of the inserted hidden layers", CLASSIFICATION_TASKS)
    dropout: float = field(0.5, "dropout after each inserted layer", CLASSIFICATION_TASKS, ge=0.0, lt=1.0)
    activation: Literal["relu", "gelu", "tanh"] = field("relu", "activation of the inserted layers",
                                                        CLASSIFICATION_TASKS)

    @field_validator("units")
    @classmethod
    def _positive(cls, units):
        if not units or any(u <= 0 for u in units):
            raise ValueError("units must be positive integers")
        return units


class ReplaceHead(Strict):
    """A new, freshly initialised head (automatic when the label set differs from the parent's)."""
    outputs: int | None = field(None, "outputs of the head; must agree with the data's label count",
                                CLASSIFICATION_TASKS, gt=0)


class DropLayers(Strict):
    """Keep a subset of the transformer layers (as MiniLM-L6 was cut from MiniLM-L12)."""
    keep: list[int] | None = field(None, "layer indices to keep")
    every: int | None = field(None, "or keep every k-th layer", ge=2)

    @model_validator(mode="after")
    def _one(self):
        if (self.keep is None) == (self.every is None):
            raise ValueError("give keep: [indices] or every: k, not both")
        return self


class ExpandLayers(Strict):
    """LLaMA-Pro block expansion: identity-initialised copies inserted after the named layers."""
    after: list[int] = field(doc="insert a copy after each of these layer indices")
    train_only_new: bool = field(True, "only the new blocks (and a classifier's head) train")


class Freeze(Strict):
    """Freeze parameters by layer index or by name pattern, after the adaptation method has run."""
    layers: list[int] | None = field(None, "layer indices to freeze", CLASSIFICATION_TASKS)
    pattern: list[str] | str | None = field(None, "parameter-name glob(s) or substrings to freeze",
                                            CLASSIFICATION_TASKS)

    @model_validator(mode="after")
    def _something(self):
        if not self.layers and not self.pattern:
            raise ValueError("give layers: [...] or pattern: '...'")
        return self


class ExpandVocab(Strict):
    """Add whole-word tokens to the tokenizer and rows to the embedding."""
    tokens: list[str] | None = field(None, "tokens to add", ("text-classification",) + LM_TASKS)
    file: str | None = field(None, "or a file with one token per line", ("text-classification",) + LM_TASKS)
    init: Literal["mean", "subtoken"] = field("subtoken", "new rows start at the mean of their sub-tokens' rows "
                                                          "(subtoken) or of all rows (mean)",
                                              ("text-classification",) + LM_TASKS)

    @model_validator(mode="after")
    def _something(self):
        if not self.tokens and not self.file:
            raise ValueError("give tokens: [...] or file: path (one token per line)")
        return self


class Prune(Strict):
    """Structured width pruning: whole MLP units and attention heads (KV groups under grouped-query attention)
    leave every block of a BERT-family encoder or LLaMA-family decoder; the training that follows heals it."""
    mlp: float = field(0.0, "fraction of each block's MLP units to remove", PRUNE_TASKS, ge=0.0, lt=1.0)
    heads: float = field(0.0, "fraction of each block's attention heads (KV groups when the model groups its "
                              "queries) to remove", PRUNE_TASKS, ge=0.0, lt=1.0)
    by: Literal["magnitude", "activation"] = field(
        "activation", "importance: weight magnitude, or activations measured on training examples (padding left "
                      "out) times the output weights", PRUNE_TASKS)
    samples: int = field(64, "by activation: training examples measured", PRUNE_TASKS, gt=0)
    compensate: bool = field(True, "by activation: fold what removed units and heads added on average into the "
                                   "output projection's bias, where it has one (FLAP's bias compensation)", PRUNE_TASKS)
    round_to: int = field(16, "keep a multiple of this many MLP units per block, rounding the kept count down (so "
                              "at least mlp: goes); aligned widths run faster on CPU matrix kernels; 1 = exact",
                          PRUNE_TASKS, ge=1)

    @model_validator(mode="after")
    def _something(self):
        if self.mlp == 0 and self.heads == 0:
            raise ValueError("give mlp: and/or heads: as fractions to remove, e.g. {mlp: 0.3, heads: 0.25}")
        return self


EDITS: dict[str, type[Strict]] = {"insert_hidden": InsertHidden, "replace_head": ReplaceHead,
                                  "drop_layers": DropLayers, "expand_layers": ExpandLayers, "freeze": Freeze,
                                  "expand_vocab": ExpandVocab, "prune": Prune}


class AdaptConfig(Strict):
    """Which parameters train."""
    method: Literal["full", "freeze", "head", "lora", "dora"] = field(
        "full", "full: everything; freeze: all but the bottom `layers`; head: the head only (classifiers); "
                "lora / dora: low-rank adapters through PEFT")
    layers: int | None = field(None, "freeze: how many bottom layers (with the embeddings) stay frozen "
                                     "(default: half)", ge=0)
    r: int = field(8, "lora/dora: adapter rank", gt=0)
    alpha: float = field(16.0, "lora/dora: scaling numerator (scale = alpha / r)")
    # 0 as in PEFT and LLaMA-Factory: drawing a dropout mask over every adapted layer's input costs more than the
    # adapter's own matmuls on a CPU (bench/RESULTS.md, sft_vs_hf with --dropout 0.05 vs 0)
    dropout: float = field(0.0, "lora/dora: dropout on the adapter's input (PEFT's lora_dropout)", ge=0.0, lt=1.0)
    target_modules: list[str] | str | None = field(
        None, "lora/dora: module names to adapt, or all-linear (default: attention query/value for classifiers, "
              "every attention and MLP projection for causal LMs)")
    merge: bool = field(False, "lora/dora: also save the adapter merged into the base (plain transformers loads it)")


class EarlyStopping(Strict):
    """Stop when a validation metric stops improving."""
    metric: str = field("val_loss", "val_loss or val_<metric>", CLASSIFICATION_TASKS)
    patience: int = field(2, "epochs without improvement before stopping", CLASSIFICATION_TASKS, ge=1)
    mode: Literal["min", "max", "auto"] = field("auto", "auto: min for losses and errors, max otherwise",
                                                CLASSIFICATION_TASKS)


class Distill(Strict):
    """Knowledge distillation: the student also matches a teacher's outputs (e.g. healing a pruned model)."""
    teacher: str = field("base", "base (the base as loaded, before the edits: a run with this task's head) or a "
                                 "run directory with the same labels and inputs", CLASSIFICATION_TASKS)
    weight: float = field(0.5, "share of the teacher term in the loss (the rest: the labels)", CLASSIFICATION_TASKS,
                          gt=0.0, le=1.0)
    temperature: float = field(2.0, "softmax temperature of both sides (classification; the term is scaled by its "
                                    "square, as Hinton et al.)", CLASSIFICATION_TASKS, gt=0.0)


class TrainConfig(Strict):
    """The optimisation."""
    epochs: float = field(3, "passes over the training split (ignored when max_steps is set)", gt=0)
    max_steps: int | None = field(None, "optimizer steps to run", gt=0)
    batch_size: int = field(32, "examples per micro-batch (causal LMs: packed rows of lm.seq_len tokens when "
                                "lm.packing)", gt=0)
    lr: float = field(5.0e-5, "peak learning rate", gt=0)
    optimizer: Literal["adamw", "sgd"] = field("adamw", "optimizer", CLASSIFICATION_TASKS)
    momentum: float = field(0.9, "sgd: momentum", CLASSIFICATION_TASKS, ge=0.0, lt=1.0)
    weight_decay: float = field(0.01, "decoupled weight decay (not on biases and norm gains)", ge=0.0)
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = field(
        "linear", "learning-rate schedule after warm-up (transformers.get_scheduler)")
    warmup_ratio: float = field(0.0, "fraction of steps spent warming up", ge=0.0, lt=1.0)
    grad_accum: int = field(1, "micro-batches per optimizer step", ge=1)
    max_grad_norm: float | None = field(1.0, "clip gradients to this global norm (null: no clipping)", gt=0)
    dropout: float | None = field(None, "override the model's dropout (classifiers)", CLASSIFICATION_TASKS,
                                  ge=0.0, lt=1.0)
    early_stopping: EarlyStopping | None = field(None, "stop on a validation metric", CLASSIFICATION_TASKS)
    distill: Distill | None = field(None, "learn from a teacher's outputs as well as the labels",
                                    CLASSIFICATION_TASKS)
    seed: int = field(0, "seed of initialisation, shuffling and dropout")
    precision: Literal["auto", "fp32", "bf16"] = field(
        "auto", "auto: bf16 autocast where it measures faster on this machine, else fp32")
    device: str = field("auto", "auto (CUDA when present), cpu, cuda, cuda:N")
    threads: int | None = field(None, "CPU threads for torch (default: torch's own choice)", gt=0)
    checkpoint_every: int | None = field(50, "optimizer steps between resumable checkpoints (null: none); LM runs "
                                         "save the trainable weights, optimizer, schedule, RNG and data position",
                                         gt=0)


class EvalConfig(Strict):
    """How base and derived are compared."""
    metrics: list[str] = factory(lambda: ["accuracy", "macro_f1"],
                                 f"classification metrics to report ({', '.join(CLASSIFICATION_METRICS)}); "
                                 f"regression always reports {', '.join(REGRESSION_METRICS)}", CLASSIFICATION_TASKS)
    compare_base: bool = field(True, "score the base (probe, zero-shot, parent or classical baseline) on the same "
                                     "test split", CLASSIFICATION_TASKS)
    zero_shot: bool = field(True, "also score a sentence encoder zero-shot by label-name similarity",
                            ("text-classification",))
    batch_size: int = field(64, "examples per evaluation batch", CLASSIFICATION_TASKS, gt=0)

    @field_validator("metrics")
    @classmethod
    def _known(cls, metrics):
        unknown = [m for m in metrics if m not in CLASSIFICATION_METRICS + REGRESSION_METRICS]
        if unknown:
            raise ValueError(f"unknown metric '{unknown[0]}'; known: "
                             f"{', '.join(CLASSIFICATION_METRICS + REGRESSION_METRICS)}")
        return metrics


class LMConfig(Strict):
    """Options of the language-model tasks."""
    seq_len: int = field(512, "tokens per row; longer examples are cut", LM_TASKS, gt=8)
    packing: bool = field(True, "pack several examples (dpo: chosen and rejected sequences) per row, none attending "
                                "to another", ("causal-lm", "sft", "dpo"))
    chat_template: str | None = field(None, "the tokenizer's own when null; chatml | plain | a Jinja string",
                                      LM_TASKS)
    separator: str | None = field(None, "split text files into documents on this string", ("causal-lm",))
    beta: float = field(0.1, "DPO temperature", ("dpo",), gt=0)
    gen_metric: Literal["exact_match", "contains", "rouge_l"] = field(
        "rouge_l", "how held-out generations are scored against the reference answers", ("sft",))
    gen_prompts: int = field(8, "held-out prompts generated from for the report", ("sft",), ge=0)
    max_new_tokens: int = field(48, "tokens generated per held-out prompt", ("sft",), gt=0)
    compile: bool | Literal["auto"] = field(
        "auto", "torch.compile the decoder layers; auto: packed runs of >= 300 steps", ("causal-lm", "sft"))


class Recipe(Strict):
    """A derive run: which base, which task, which data, what changes, how it trains and is judged."""
    name: str = field(doc=f"run name: {NAME_RULE}")
    base: str = field(doc="model reference: library name, hf:org/name[@rev], file:PATH, run:DIR, pkg:NAME, "
                          "an HF directory, a run directory or a weight file")
    task: Literal[TASKS] = field(doc="what the derived model does")  # type: ignore[valid-type]
    data: DataConfig = field(doc="the examples")
    model: dict[str, Any] = factory(dict, "sizes of a from-scratch architecture (scratch:*), e.g. {channels: "
                                          "[32, 64]}", CLASSIFICATION_TASKS)
    preprocess: list[dict[str, Any]] = factory(list, "ordered data preparation steps", CLASSIFICATION_TASKS)
    edits: list[dict[str, Any]] = factory(list, "ordered structure edits")
    adapt: AdaptConfig = field(AdaptConfig(), "which parameters train")
    train: TrainConfig = field(TrainConfig(), "the optimisation")
    eval: EvalConfig = field(EvalConfig(), "how base and derived are compared")
    k_fold: int | None = field(None, "also report mean ± std over k cross-validation folds",
                               CLASSIFICATION_TASKS, ge=2, le=20)
    lm: LMConfig = field(LMConfig(), "options of the language-model tasks", LM_TASKS)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        problem = name_problem(v)
        if problem:
            raise ValueError(problem)
        return v

    @field_validator("preprocess")
    @classmethod
    def _preprocess(cls, steps):
        return [_validate_step(s, PREPROCESS_STEPS, "preprocess", i) for i, s in enumerate(steps)]

    @field_validator("edits")
    @classmethod
    def _edits(cls, steps):
        return [_validate_step(s, EDITS, "edits", i) for i, s in enumerate(steps)]

    @model_validator(mode="after")
    def _consistent(self):
        """The rules that tie fields together, stated once."""
        a = self.adapt
        if self.is_lm:
            if a.method == "head":
                raise ValueError("adapt.method 'head' has no meaning for a causal LM; use full, freeze, lora or dora")
            for op, cfg in self.steps("edits"):
                if op not in LM_EDITS:
                    raise ValueError(f"edits: '{op}' does not apply to causal LMs (use {', '.join(LM_EDITS)})")
                if op in ("drop_layers", "expand_layers", "prune") and self.saves_adapter_only:
                    raise ValueError(f"edits.{op} changes the architecture, which an adapter saved alone cannot "
                                     "carry (it is applied to the published base): set adapt.merge: true")
                if op == "expand_layers" and cfg.train_only_new and a.method in ("lora", "dora"):
                    raise ValueError(f"edits.expand_layers.train_only_new trains the new blocks in full, which "
                                     f"adapt.method '{a.method}' contradicts: set adapt.method: full, or "
                                     "train_only_new: false")
            if self.k_fold:
                raise ValueError("k_fold applies to classification and regression tasks")
            if self.train.distill is not None:
                raise ValueError("train.distill applies to classification and regression tasks")
        elif any(op == "prune" for op, _ in self.steps("edits")):
            if self.task != "text-classification":
                raise ValueError(f"edits.prune applies to transformer text classifiers and causal LMs, not {self.task}")
            if self.saves_adapter_only:
                raise ValueError("edits.prune changes the architecture, which an adapter saved alone cannot carry "
                                 "(it is applied to the unpruned base): set adapt.merge: true")
        return self

    @property
    def is_lm(self) -> bool:
        return self.task in LM_TASKS

    @property
    def saves_adapter_only(self) -> bool:
        """LoRA/DoRA without merge: the run's model/ holds the adapter alone."""
        return self.adapt.method in ("lora", "dora") and not self.adapt.merge

    def steps(self, kind: Literal["preprocess", "edits"]) -> list[tuple[str, Strict]]:
        """Parsed (op, args) pairs of `preprocess` or `edits`, in order."""
        table = PREPROCESS_STEPS if kind == "preprocess" else EDITS
        out = []
        for step in getattr(self, kind):
            (op, args), = step.items()
            out.append((op, table[op](**(args or {}))))
        return out

    def preprocess_step(self, op: str) -> Strict | None:
        """The arguments of preprocessing step `op`, or None when the recipe has no such step."""
        return next((args for name, args in self.steps("preprocess") if name == op), None)


def _validate_step(step: Any, table: dict[str, type[Strict]], where: str, i: int) -> dict:
    if isinstance(step, str):
        step = {step: {}}
    if not isinstance(step, dict) or len(step) != 1:
        raise ValueError(f"{where}[{i}] must be one mapping like '- {next(iter(table))}: {{...}}'")
    (op, args), = step.items()
    if op not in table:
        close = difflib.get_close_matches(op, list(table), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"{where}[{i}]: unknown step '{op}'.{hint} Known: {', '.join(table)}")
    try:
        table[op](**(args or {}))
    except ValidationError as e:
        raise ValueError(f"{where}[{i}].{op}: {_first_error(e)}") from None
    except TypeError:
        raise ValueError(f"{where}[{i}].{op}: arguments must be a mapping") from None
    return {op: dict(args or {})}


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"])
    return f"{loc + ': ' if loc else ''}{err['msg'].removeprefix('Value error, ')}"


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model whose fields a location's last key belongs to (for suggestions)."""
    model: Any = Recipe
    for part in loc[:-1]:
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        ann = model.model_fields[part].annotation
        args = getattr(ann, "__args__", None)
        model = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None) if args else ann
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _explain(e: ValidationError, source: str) -> str:
    lines = []
    for err in e.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(x) for x in loc)
        if err["type"] == "extra_forbidden":
            owner = _model_at(loc)
            hint = ""
            if owner is not None:
                close = difflib.get_close_matches(str(loc[-1]), list(owner.model_fields), n=1, cutoff=0.5)
                if close:
                    prefix = ".".join(str(x) for x in loc[:-1])
                    hint = f" Did you mean '{prefix + '.' if prefix else ''}{close[0]}'?"
                else:
                    hint = f" Valid keys here: {', '.join(owner.model_fields)}."
            lines.append(f"unknown key '{key}'.{hint}")
        elif err["type"] == "missing":
            lines.append(f"missing required key '{key}'.")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            got = err.get("input")
            shown = repr(got) if len(repr(got)) <= 60 else repr(got)[:56] + "...'"  # a 10 kB value is no message
            got_s = f" (got {shown})" if got is not None and not isinstance(got, (dict, list)) and key else ""
            lines.append(f"'{key}': {msg}{got_s}." if key else f"{msg}.")
    return f"{source}: " + " ".join(lines[:3]) + (" ..." if len(lines) > 3 else "")


def parse_value(text: str) -> Any:
    """`--set` values are YAML scalars/lists: 3e-5, true, [a, b], null."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    # YAML 1.1 reads 3e-5 as a string; accept it as a float.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"--set {item!r}: expected key=value, e.g. --set train.lr=3e-5")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {} if node.get(p) is None else node[p]
                if not isinstance(node[p], dict):
                    raise RecipeError(f"--set {key}: '{p}' is not a mapping in the recipe")
            node = node[p]
        node[parts[-1]] = parse_value(value)
    return raw


def recipe_from_dict(raw: dict, source: str = "recipe", base_dir: Path | None = None) -> Recipe:
    """Validate a recipe mapping; relative data paths resolve against `base_dir` (else the current directory)."""
    try:
        recipe = Recipe(**raw)
    except ValidationError as e:
        raise RecipeError(_explain(e, source)) from None
    _resolve_data_paths(recipe, base_dir or Path.cwd())
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file.

    A relative data path is looked up in the current directory first, then beside the recipe file, then in
    the recipe folder's parent (so `recipes/x.yaml` can name `data/...` from the repository root).
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}:{where} is not valid YAML ({getattr(e, 'problem', e)})") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not UTF-8 text; save the recipe as UTF-8") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping with keys name, base, task, data, ...")
    return recipe_from_dict(apply_overrides(raw, overrides or []), str(path), path.parent)


def _resolve_path(value: str, recipe_dir: Path) -> str:
    p = Path(value).expanduser()
    if not p.is_absolute():
        candidates = [Path.cwd() / p, recipe_dir / p, recipe_dir.parent / p]
        p = next((c for c in candidates if c.exists()), candidates[0])
    return str(p.resolve())


def _resolve_data_paths(recipe: Recipe, recipe_dir: Path) -> None:
    for step in recipe.edits:
        args = step.get("expand_vocab")
        if args and args.get("file"):
            args["file"] = _resolve_path(args["file"], recipe_dir)
    for key in ("train", "validation", "test"):
        value = getattr(recipe.data, key)
        if value and ":" not in value.split("/")[0]:  # leave sources like sklearn:digits alone
            setattr(recipe.data, key, _resolve_path(value, recipe_dir))


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
