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

from taoke.derive import derive
from taoke.errors import DataError, ModelError, RecipeError, TaokeError
from taoke.inference import load
from taoke.library import resolve
from taoke.provenance.endpoint import verify_endpoint
from taoke.provenance.verify import verify_references as verify
from taoke.recipe import Recipe, load_recipe
from taoke.run import Run
from taoke.ship import export
from taoke.version import __version__

__all__ = ["derive", "load", "verify", "verify_endpoint", "export", "resolve", "Recipe", "load_recipe", "Run", "TaokeError", "RecipeError",
           "DataError", "ModelError", "__version__"]
