"""Classifiers and regressors in use: encode inputs exactly as in training, predict, score."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from taoke.data.encode import encode_frame, to_target_units
from taoke.data.load import load_source
from taoke.errors import DataError, ModelError
from taoke.evaluate.metrics import metrics_from_outputs
from taoke.hardware import pick_device
from taoke.models.meta import read_meta
from taoke.models.task_model import load_task_model
from taoke.run import Run
from taoke.train.batches import Encoded, to_device
from taoke.train.classifier import predict


@dataclass
class TaskPredictor:
    model: torch.nn.Module
    tokenizer: object | None
    meta: dict                     # model/taoke.json: task, labels, input preprocessing
    model_dir: Path
    run: Run | None = None

    @staticmethod
    def read_task(model_dir: Path) -> str | None:
        return read_meta(model_dir).get("task")

    @classmethod
    def load(cls, model_dir: Path, run: Run | None = None, device: str | None = None,
             state: dict | None = None) -> "TaskPredictor":
        model, meta, tokenizer = load_task_model(model_dir, pick_device(device), state=state)
        return cls(model, tokenizer, meta, model_dir, run)

    @property
    def labels(self) -> list[str] | None:
        return self.meta["labels"]

    def outputs(self, frame: pd.DataFrame) -> torch.Tensor:
        """Raw outputs (logits, or standardised predictions for regression) for the rows of a frame."""
        encoded = encode_frame(frame.drop(columns=[self.meta["label_column"]], errors="ignore"), self.meta,
                               self.tokenizer)
        return self.finite(self.forward(encoded))

    def forward(self, encoded: Encoded) -> torch.Tensor:
        """Outputs for encoded rows (the one place a backend runs the network)."""
        return predict(self.model, encoded)

    def finite(self, outputs: torch.Tensor) -> torch.Tensor:
        """Outputs as they are, or a ModelError when any is NaN/inf: such a number is never shown as a result."""
        bad = ~torch.isfinite(to_target_units(outputs, self.meta)).reshape(len(outputs), -1).all(-1)
        if bad.any():
            row = int(bad.nonzero()[0, 0])
            raise ModelError(f"{self.run.path if self.run else self.model_dir}: the model's output for input {row} is "
                             f"not a finite number ({int(bad.sum())} of {len(outputs)} inputs); its weights are "
                             "corrupt or training diverged. Nothing is reported.")
        return outputs

    def predict(self, inputs: list | pd.DataFrame) -> list[dict]:
        """Label and probability (or predicted value) per input: texts, image paths, or a frame of rows."""
        kind = self.meta["inputs"]["kind"]
        if isinstance(inputs, pd.DataFrame):
            frame = inputs
        elif kind == "tabular":
            raise DataError("tabular models take rows with the feature columns (a csv/jsonl/parquet file)")
        else:
            frame = pd.DataFrame({self.meta["inputs"]["column"]: list(inputs)})
        out = self.outputs(frame)
        shown = frame[self.meta["inputs"]["column"]].astype(str).tolist() if kind != "tabular" else \
            [f"row {i}" for i in range(len(frame))]
        if self.labels is None:
            values = to_target_units(out.view(-1), self.meta).tolist()
            return [{"input": s, "prediction": float(v)} for s, v in zip(shown, values)]
        probs = torch.softmax(out, -1)
        top = probs.argmax(-1)
        return [{"input": s, "label": self.labels[int(t)], "probability": float(probs[i, t])}
                for i, (s, t) in enumerate(zip(shown, top))]

    @torch.no_grad()
    def embed(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """Mean-pooled features of texts (the vector the head reads), for text models built on an encoder."""
        if self.meta["inputs"]["kind"] != "text" or not hasattr(self.model, "features"):
            raise DataError(f"{self.model_dir}: this model does not provide text embeddings")
        encoded = encode_frame(pd.DataFrame({self.meta["inputs"]["column"]: texts}), self.meta, self.tokenizer)
        device = next(self.model.parameters()).device
        self.model.eval()
        out = []
        for start in range(0, len(texts), batch_size):
            batch = to_device(encoded.batch(list(range(start, min(start + batch_size, len(texts))))), device)
            batch.pop("labels")
            out.append(self.model.features(**batch).float().cpu())
        return torch.cat(out)

    def read_inputs(self, file: str | Path) -> pd.DataFrame:
        """Inputs from a file: one text or image path per line (.txt), or a csv/jsonl/parquet table."""
        p = Path(file)
        if not p.is_file():
            raise DataError(f"{file}: file not found")
        if p.suffix.lower() == ".txt":
            if self.meta["inputs"]["kind"] == "tabular":
                raise DataError(f"{file}: tabular models take a csv/jsonl/parquet file with the feature columns.")
            lines = [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
            return pd.DataFrame({self.meta["inputs"]["column"]: lines})
        return load_source(str(p)).frame

    def evaluate(self, data: str | Path | None = None, split: str | None = None) -> dict:
        """Metrics on a labelled file, or on one of the run's own splits (train | validation | test)."""
        if (data is None) == (split is None):
            raise DataError("give exactly one of --data FILE or --split NAME")
        if split:
            frame, source = self.split_frame(split)
        else:
            frame, source = load_source(str(data)).frame, str(data)
            if self.meta["label_column"] not in frame.columns:
                raise DataError(f"{data}: label column '{self.meta['label_column']}' not found; columns are: "
                                f"{', '.join(map(str, frame.columns))}.")
        encoded = encode_frame(frame, self.meta, self.tokenizer)
        outputs = self.finite(self.forward(encoded))
        metrics = metrics_from_outputs(to_target_units(outputs, self.meta), to_target_units(encoded.targets, self.meta),
                                       self.labels is None, self.labels, per_class=True)
        return {"model": str(self.run.path if self.run else self.model_dir), "data": source, "rows": len(frame),
                "metrics": metrics}

    def split_frame(self, split: str) -> tuple[pd.DataFrame, str]:
        """The rows of data.train that went to `split` when the run was derived."""
        if self.run is None:
            raise DataError(f"{self.model_dir}: --split needs a run directory (it records the splits).")
        splits = self.run.splits()
        if split not in splits["rows"]:
            raise DataError(f"{self.run.path}: no '{split}' split recorded; choose one of {', '.join(splits['rows'])}.")
        frame = load_source(splits["source"]).frame
        rename = {}
        if "image" in frame.columns and self.meta["inputs"].get("column") not in frame.columns:
            rename["image"] = self.meta["inputs"].get("column")
        if "label" in frame.columns and self.meta["label_column"] not in frame.columns:
            rename["label"] = self.meta["label_column"]
        frame = frame.rename(columns=rename)
        return frame.iloc[splits["rows"][split]].reset_index(drop=True), f"{splits['source']} ({split} split)"

