"""The model library: turn a model reference (library name, hf:/file:/run:/pkg: source, path) into a BaseRef."""

from taoke.library.registry import load_registry, registry_path  # noqa: F401
from taoke.library.resolve import (BaseRef, add_model, card_metadata, is_library_reference, list_models,  # noqa: F401
                                  resolve, weight_files)
