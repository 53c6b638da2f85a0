"""taoke (套壳): build task models on open base models, and prove what a model is built on.

The public API (the `taoke` command calls these same functions):

    run = taoke.derive("recipes/text-topics.yaml", overrides=["train.epochs=1"], out="runs/topics")
    run.metrics["derived"], run.lineage                 # scores of base and derived; the lineage record
    model = taoke.load(run.path)                        # model, tokenizer, predict(...), evaluate(...)
    model.predict(["can you write bubble sort?"])
    taoke.verify("minilm-l6", run.path)                 # what `taoke verify --json` prints
    taoke.verify_endpoint("http://127.0.0.1:8000/v1", "smollm2-135m", controls=[...])   # a model behind an API
    taoke.export(run.path, "onnx", quant="int8")        # an ONNX export, checked in ONNX Runtime, with lineage
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from taoke.derive import derive   # light: each workflow imports its libraries when a run starts
from taoke.errors import DataError, ModelError, RecipeError, TaokeError
from taoke.library import resolve
from taoke.recipe import Recipe, load_recipe
from taoke.run import Run
from taoke.version import __version__

# name -> (module, attribute) of the heavy entry points, imported on first use (PEP 562): `import taoke` and every
# `taoke` command start without peft, onnx and the other libraries only some paths need
_LAZY = {"load": ("taoke.inference", "load"), "verify": ("taoke.provenance.verify", "verify_references"),
         "verify_endpoint": ("taoke.provenance.endpoint", "verify_endpoint"), "export": ("taoke.ship", "export")}

if TYPE_CHECKING:   # what editors and type checkers see
    from taoke.inference import load
    from taoke.provenance.endpoint import verify_endpoint
    from taoke.provenance.verify import verify_references as verify
    from taoke.ship import export


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'taoke' has no attribute '{name}'")
    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value   # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["derive", "load", "verify", "verify_endpoint", "export", "resolve", "Recipe", "load_recipe", "Run",
           "TaokeError", "RecipeError", "DataError", "ModelError", "__version__"]
