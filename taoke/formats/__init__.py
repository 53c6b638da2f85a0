"""Weight formats: streaming readers (safetensors, torch weights_only, GGUF, ONNX) behind `open_weights`.

The names below load on first use (PEP 562): `taoke.formats.sealed` alone (the CLI's key handling) must not pull in
the ONNX, GGUF and transformers readers.
"""

import importlib

_LAZY = {"TensorMeta": "taoke.formats.base", "WeightReader": "taoke.formats.base",
         "check_model_dir": "taoke.formats.open", "hf_config": "taoke.formats.open",
         "open_weights": "taoke.formats.open"}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'taoke.formats' has no attribute '{name}'")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
