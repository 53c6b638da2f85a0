"""A classifier/regressor exported to ONNX (`taoke export RUN --format onnx`), run by ONNX Runtime.

OnnxPredictor has TaskPredictor's interface (predict, read_inputs, evaluate, labels, meta): inputs are encoded
by the same code from the same model/taoke.json, only the network runs in ONNX Runtime instead of PyTorch.

    predictor = OnnxPredictor.load(Path("runs/topics-onnx/model"))
    predictor.predict(["can you write bubble sort?"])      # [{"input", "label", "probability"}]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from taoke.errors import ModelError
from taoke.hardware import pick_device
from taoke.inference.task import TaskPredictor
from taoke.models.meta import read_meta
from taoke.models.task_model import saved_tokenizer
from taoke.run import Run
from taoke.train.batches import Encoded, batch_indices

RUNTIME = "onnxruntime"


def is_onnx_model(meta: dict) -> bool:
    return (meta.get("export") or {}).get("runtime") == RUNTIME


def providers(device: str | None) -> list[str]:
    """CUDA when the device picker chooses it and this ONNX Runtime build has it; always the CPU behind it."""
    want_cuda = pick_device(device).type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers()
    return (["CUDAExecutionProvider"] if want_cuda else []) + ["CPUExecutionProvider"]


@dataclass
class OnnxPredictor(TaskPredictor):
    batch_size: int = 64

    @classmethod
    def load(cls, model_dir: Path, run: Run | None = None, device: str | None = None) -> "OnnxPredictor":
        meta = read_meta(model_dir)
        if not is_onnx_model(meta):
            raise ModelError(f"{model_dir}: taoke.json names no ONNX model (export.runtime is not {RUNTIME}).")
        graph = Path(model_dir) / meta["export"]["file"]
        try:
            session = ort.InferenceSession(str(graph), providers=providers(device))
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types for unreadable graphs
            raise ModelError(f"{graph}: ONNX Runtime cannot load it ({e.__class__.__name__}: {str(e)[:200]})") from None
        return cls(session, saved_tokenizer(model_dir, meta), meta, Path(model_dir), run)

    @property
    def session(self) -> ort.InferenceSession:
        return self.model

    def forward(self, encoded: Encoded) -> torch.Tensor:
        names = [i.name for i in self.session.get_inputs()]
        outs = []
        for idx in batch_indices(encoded, self.batch_size, shuffle=False, bucket=False):
            batch = encoded.batch(idx)
            feed = {n: batch[n].numpy() for n in names}
            outs.append(self.session.run(["logits"], feed)[0].astype(np.float32))
        return torch.from_numpy(np.concatenate(outs)) if outs else torch.empty(0)
