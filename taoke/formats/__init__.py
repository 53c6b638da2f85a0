"""Weight formats: streaming readers (safetensors, torch weights_only, GGUF, ONNX) behind `open_weights`."""

from taoke.formats.base import TensorMeta, WeightReader  # noqa: F401
from taoke.formats.open import check_model_dir, hf_config, open_weights  # noqa: F401
