"""The recipe: a pydantic schema that is the single source of truth for a derive run.

YAML keys map one-to-one onto these models. Unknown keys are errors with a "did you mean"
suggestion; `--set a.b=value` overrides any key before validation.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from taoke.errors import RecipeError

TASKS = ("text-classification", "image-classification", "tabular-classification", "tabular-regression",
         "causal-lm", "sft", "dpo")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SplitConfig(Strict):
    validation: float = Field(0.1, ge=0.0, lt=1.0)
    test: float = Field(0.2, ge=0.0, lt=1.0)
    seed: int = 0
    stratify: bool = True

    @model_validator(mode="after")
    def _fractions(self):
        if self.validation + self.test >= 1.0:
            raise ValueError("validation + test must leave rows for training (sum < 1)")
        return self


class DataConfig(Strict):
    train: str
    validation: str | None = None
    test: str | None = None
    split: SplitConfig = SplitConfig()
    text: str = "text"
    label: str = "label"
    image: str = "image"
    features: list[str] | None = None      # tabular: feature columns (default: every column but the label)
    categorical: list[str] | None = None   # tabular: columns to one-hot (default: non-numeric ones)
    max_rows: int | None = Field(None, gt=0)  # take a seeded sample of this many rows (quick runs)


# Preprocessing steps: one key each, in order. Arguments validated per step.
class NormalizeText(Strict):
    lowercase: bool = True
    strip: bool = True
    unicode: Literal["NFKC", "NFC", "none"] = "NFKC"
    collapse_whitespace: bool = True


class Dedup(Strict):
    keep: Literal["first", "last"] = "first"


class Tokenize(Strict):
    max_length: int = Field(128, gt=0)
    vocab_size: int = Field(20000, gt=10)   # only for tokenizers trained from scratch


class Resize(Strict):
    size: int = Field(32, gt=0)
    channels: Literal[1, 3] | None = None


class NormalizeImage(Strict):
    mean: list[float] | None = None   # default: computed on the training split
    std: list[float] | None = None


class Augment(Strict):
    flip: bool = False
    crop: int = Field(0, ge=0)          # random crop after padding by this many pixels
    rotate: float = Field(0.0, ge=0.0, le=45.0)   # max degrees


class Standardize(Strict):
    columns: list[str] | None = None


class OneHot(Strict):
    columns: list[str] | None = None


PREPROCESS_STEPS: dict[str, type[Strict]] = {
    "normalize_text": NormalizeText, "dedup": Dedup, "tokenize": Tokenize,
    "resize": Resize, "normalize": NormalizeImage, "augment": Augment,
    "standardize": Standardize, "one_hot": OneHot,
}


class InsertHidden(Strict):
    units: list[int] = Field(default_factory=lambda: [256])
    dropout: float = Field(0.5, ge=0.0, lt=1.0)
    activation: Literal["relu", "gelu", "tanh"] = "relu"


class ReplaceHead(Strict):
    outputs: int | None = Field(None, gt=0)   # must agree with the data's label count when given


class DropLayers(Strict):
    keep: list[int] | None = None     # explicit layer indices to keep
    every: int | None = Field(None, ge=2)  # or keep every k-th layer


class ExpandLayers(Strict):
    after: list[int]                  # insert an identity-initialised copy after each of these layers
    train_only_new: bool = True       # LLaMA-Pro: only the new blocks (and the head) train


class Freeze(Strict):
    layers: list[int] | None = None
    pattern: list[str] | str | None = None   # parameter-name glob(s) or substrings


class ExpandVocab(Strict):
    tokens: list[str] | None = None
    file: str | None = None
    init: Literal["mean", "subtoken"] = "subtoken"


EDITS: dict[str, type[Strict]] = {"insert_hidden": InsertHidden, "replace_head": ReplaceHead,
                                  "drop_layers": DropLayers, "expand_layers": ExpandLayers, "freeze": Freeze,
                                  "expand_vocab": ExpandVocab}


class AdaptConfig(Strict):
    method: Literal["full", "freeze", "head", "lora", "dora"] = "full"
    layers: int | None = Field(None, ge=0)  # freeze: how many bottom layers to freeze
    r: int = Field(8, gt=0)
    alpha: float = 16.0
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | str | None = None
    merge: bool = False


class EarlyStopping(Strict):
    metric: str = "val_loss"
    patience: int = Field(2, ge=1)
    mode: Literal["min", "max", "auto"] = "auto"


class TrainConfig(Strict):
    epochs: int = Field(3, ge=1)
    max_steps: int | None = Field(None, gt=0)
    batch_size: int = Field(32, gt=0)
    lr: float = Field(5.0e-5, gt=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.01, ge=0.0)
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    grad_accum: int = Field(1, ge=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    dropout: float | None = Field(None, ge=0.0, lt=1.0)
    early_stopping: EarlyStopping | None = None
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    device: str = "auto"
    checkpoint_every: int | None = Field(50, gt=0)   # optimizer steps between resumable checkpoints


class EvalConfig(Strict):
    metrics: list[str] = Field(default_factory=lambda: ["accuracy", "macro_f1"])
    compare_base: bool = True
    zero_shot: bool = True
    batch_size: int = Field(64, gt=0)


class LMConfig(Strict):
    """Options of the language-model tasks (causal-lm, sft, dpo)."""
    seq_len: int = Field(512, gt=8)
    packing: bool = True
    chat_template: str | None = None        # the tokenizer's own when None; or chatml | plain | a Jinja string
    separator: str | None = None            # causal-lm: split text files into documents on this string
    beta: float = Field(0.1, gt=0)          # dpo
    gen_metric: Literal["exact_match", "contains", "rouge_l"] = "rouge_l"
    gen_prompts: int = Field(8, ge=0)       # held-out prompts generated from for the report
    max_new_tokens: int = Field(48, gt=0)
    threads: int | None = Field(None, gt=0)
    compile: bool | Literal["auto"] = "auto"  # causal-lm/sft: torch.compile the decoder layers; auto: packed
                                              # runs of >= 300 steps (DPO runs eagerly)


class Recipe(Strict):
    name: str
    base: str
    task: Literal[TASKS]  # type: ignore[valid-type]
    data: DataConfig
    model: dict[str, Any] = Field(default_factory=dict)   # sizes of from-scratch architectures
    preprocess: list[dict[str, Any]] = Field(default_factory=list)
    edits: list[dict[str, Any]] = Field(default_factory=list)
    adapt: AdaptConfig = AdaptConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    k_fold: int | None = Field(None, ge=2, le=20)
    lm: LMConfig = LMConfig()   # also report mean ± std over k cross-validation folds

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v or any(c in v for c in "/\\ \t"):
            raise ValueError("name must be non-empty, without spaces or slashes")
        return v

    @field_validator("preprocess")
    @classmethod
    def _preprocess(cls, steps):
        return [_validate_step(s, PREPROCESS_STEPS, "preprocess", i) for i, s in enumerate(steps)]

    @field_validator("edits")
    @classmethod
    def _edits(cls, steps):
        return [_validate_step(s, EDITS, "edits", i) for i, s in enumerate(steps)]

    def steps(self, kind: str) -> list[tuple[str, Strict]]:
        """Parsed (op, args) pairs of `preprocess` or `edits`."""
        table = PREPROCESS_STEPS if kind == "preprocess" else EDITS
        out = []
        for step in getattr(self, kind):
            (op, args), = step.items()
            out.append((op, table[op](**(args or {}))))
        return out

    def step(self, op: str) -> Strict | None:
        for name, args in self.steps("preprocess"):
            if name == op:
                return args
        return None


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
    return f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}"


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
            got_s = f" (got {got!r})" if got is not None and not isinstance(got, (dict, list)) else ""
            lines.append(f"'{key}': {msg}{got_s}.")
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


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> tuple[Recipe, dict]:
    """Read, override and validate a recipe. Returns the Recipe and the raw dict it came from.

    Relative data paths are resolved against the recipe file's folder, then the current directory.
    """
    path = Path(path)
    if not path.exists():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}:{where} is not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping with keys name, base, task, data, ...")
    raw = apply_overrides(raw, overrides or [])
    try:
        recipe = Recipe(**raw)
    except ValidationError as e:
        raise RecipeError(_explain(e, str(path))) from None
    _resolve_data_paths(recipe, path.parent)
    return recipe, raw


def _resolve_path(value: str, recipe_dir: Path) -> str:
    p = Path(value).expanduser()
    if not p.is_absolute():
        cand = [Path.cwd() / p, recipe_dir / p, recipe_dir.parent / p]
        p = next((c for c in cand if c.exists()), cand[0])
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
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
