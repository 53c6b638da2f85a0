"""Writes docs/recipe.md from the recipe schema (taoke/recipe.py): every key, its type, default, allowed values,
meaning and the tasks that read it. tests/test_docs.py fails when the file and the schema drift.

    python docs/recipe_reference.py          # rewrite docs/recipe.md
"""

from __future__ import annotations

import sys
import typing
from pathlib import Path

from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from taoke import recipe as R  # noqa: E402

OUT = Path(__file__).with_name("recipe.md")
ALL_TASKS = set(R.TASKS)


def _type_name(ann) -> str:
    origin = typing.get_origin(ann)
    if origin is typing.Literal:
        return "one of " + ", ".join(f"`{a}`" for a in typing.get_args(ann))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(_type_name(a) for a in typing.get_args(ann))
    if origin in (list, dict):
        args = ", ".join(_type_name(a) for a in typing.get_args(ann))
        return f"{origin.__name__}[{args}]"
    if ann is type(None):
        return "null"
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return "mapping"
    return getattr(ann, "__name__", str(ann)).replace("typing.", "")


def _bounds(info) -> str:
    out = []
    for m in info.metadata:
        for cls, sym in ((Ge, ">="), (Gt, ">"), (Le, "<="), (Lt, "<")):
            if isinstance(m, cls):
                out.append(f"{sym} {getattr(m, {Ge: 'ge', Gt: 'gt', Le: 'le', Lt: 'lt'}[cls])}")
    return ", ".join(out)


def _default(info) -> str:
    if info.default_factory is not None:
        value = info.default_factory()
    elif info.default is PydanticUndefined:
        return "required"
    else:
        value = info.default
    if isinstance(value, BaseModel):
        return "(see below)"
    return f"`{value!r}`" if value is not None else "`null`"


def _tasks(info) -> str:
    tasks = set((info.json_schema_extra or {}).get("tasks", R.TASKS))
    if tasks == ALL_TASKS:
        return "all"
    if tasks == set(R.LM_TASKS):
        return "causal-lm, sft, dpo"
    if tasks == set(R.CLASSIFICATION_TASKS):
        return "classification, regression"
    return ", ".join(t for t in R.TASKS if t in tasks)


def table(model: type[BaseModel], prefix: str) -> list[str]:
    lines = ["| key | type | default | allowed | meaning | tasks |", "|---|---|---|---|---|---|"]
    for name, info in model.model_fields.items():
        cells = [f"`{prefix}{name}`", _type_name(info.annotation), _default(info), _bounds(info) or "-",
                 info.description or "", _tasks(info)]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return lines


def render() -> str:
    sections = [("Top level", R.Recipe, ""), ("data", R.DataConfig, "data."), ("data.split", R.SplitConfig, "data.split."),
                ("adapt", R.AdaptConfig, "adapt."), ("train", R.TrainConfig, "train."),
                ("train.early_stopping", R.EarlyStopping, "train.early_stopping."),
                ("train.distill", R.Distill, "train.distill."), ("eval", R.EvalConfig, "eval."),
                ("lm", R.LMConfig, "lm.")]
    lines = ["# Recipe reference", "",
             "Generated from `taoke/recipe.py` by `python docs/recipe_reference.py`; do not edit by hand "
             "(`tests/test_docs.py` fails when the two drift).", "",
             "A recipe is one YAML mapping. Any key can be overridden on the command line: "
             "`taoke derive RECIPE --set train.lr=3e-5 --set data.split.seed=1`. Relative data paths are looked up "
             "in the current directory, then beside the recipe, then in the recipe folder's parent.", ""]
    for title, model, prefix in sections:
        lines += [f"## {title}", "", (model.__doc__ or "").strip(), ""] + table(model, prefix) + [""]
    for title, registry, key in (("Preprocessing steps (`preprocess:`, in order)", R.PREPROCESS_STEPS, "preprocess"),
                                 ("Structure edits (`edits:`, in order)", R.EDITS, "edits")):
        lines += [f"## {title}", "", "Each item is one mapping: `- <step>: {arguments}`.", ""]
        for op, model in registry.items():
            lines += [f"### `{op}`", "", (model.__doc__ or "").strip(), ""] + table(model, f"{op}.") + [""]
    lines += ["## Rules that tie keys together", "",
              "Stated once, on the recipe (`Recipe._consistent`), so `--dry-run` and the Python API refuse the same "
              "things:", "",
              "- causal-lm, sft and dpo take `adapt.method` full, freeze, lora or dora (not head);",
              f"- their edits are {', '.join(R.LM_EDITS)};",
              "- `drop_layers` / `expand_layers` need `adapt.merge: true` when the adapter would be saved alone;",
              "- `expand_layers.train_only_new` trains blocks in full, so it cannot go with lora/dora;",
              "- `k_fold` applies to classification and regression;",
              "- `drop_layers` takes `keep` or `every`; `freeze` takes `layers` or `pattern`; `expand_vocab` takes "
              "`tokens` or `file`.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    OUT.write_text(render(), encoding="utf-8")
    print(f"wrote {OUT}")
