"""Weight formats: streaming readers (safetensors, torch weights_only, GGUF, ONNX) behind `open_weights`."""

from taoke.formats.base import TensorMeta, WeightReader  # noqa: F401
from taoke.formats.open import open_weights  # noqa: F401
