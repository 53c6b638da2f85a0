"""Ship a derived model: export it to the formats its runtimes load (GGUF, ONNX, HF), checked in those runtimes
and recorded as a derivation of the run (export.py); serve it (serve/); keep its weights encrypted at rest
(seal.py)."""

from taoke.ship.export import export

__all__ = ["export"]
