"""The model library: turn a model reference (library name, HF dir, run dir, weight file) into a BaseRef."""

from taoke.library.resolve import BaseRef, resolve, list_models, weight_files  # noqa: F401
from taoke.library.registry import add_model, load_registry  # noqa: F401
