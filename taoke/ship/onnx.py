"""A task model (classifier or regressor: transformers encoders and taoke's scratch CNN/LSTM/GRU/MLP/transformer)
as an ONNX graph with dynamic batch (and sequence) axes, optionally int8 through ONNX Runtime's dynamic
quantisation.

The inputs are the ones training fed the model (taoke.train.batches.Encoded.batch): `input_ids` +
`attention_mask` (int64, [batch, sequence]) for text, `pixel_values` for images, `features` for tables;
the output is `logits` (standardised predictions for regression, as in PyTorch).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from taoke.errors import ModelError
from taoke.train.batches import Encoded

INPUT_NAMES = {"text": ["input_ids", "attention_mask"], "image": ["pixel_values"], "tabular": ["features"]}
OPSET = 17
QUANTS = ("int8",)


class _Positional(nn.Module):
    """The exporter passes positional tensors; taoke's task models take keyword inputs."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.names, inputs)))


def export_onnx(model: nn.Module, kind: str, sample: Encoded, path: Path) -> list[str]:
    """Trace `model` on a few rows of `sample` and write `path`; returns the graph's input names."""
    names = INPUT_NAMES[kind]
    batch = sample.batch(list(range(min(2, len(sample)))))
    axes = {n: {0: "batch", 1: "sequence"} if kind == "text" else {0: "batch"} for n in names}
    axes["logits"] = {0: "batch"}
    model = model.to("cpu").float().eval()
    # The TorchScript exporter (dynamo=False): it exports packed RNN sequences and keeps module scopes in node
    # names (which provenance reads); the dynamo exporter needs a rewrite of both.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Positional(model, names), tuple(batch[n] for n in names), str(path), input_names=names,
                          output_names=["logits"], dynamic_axes=axes, opset_version=OPSET, dynamo=False)
    onnx.checker.check_model(str(path))
    return names


def quantize_int8(src: Path, dst: Path) -> None:
    """ONNX Runtime dynamic quantisation: int8 weights, activations quantised per batch at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic  # heavy optional import, only for --quant

    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises plain exceptions for graphs it cannot quantise
        raise ModelError(f"ONNX Runtime could not quantise {src.name} to int8 ({e.__class__.__name__}: "
                         f"{str(e)[:200]}).") from None
