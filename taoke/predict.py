"""`taoke eval` and `taoke predict` for task models: load model/, encode inputs as in training, score."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch

from taoke.data.encode import encode_frame, to_target_units
from taoke.data.load import load_source
from taoke.errors import DataError, ModelError
from taoke.evaluate.metrics import metrics_from_outputs
from taoke.models.task_model import load_task_model, read_meta
from taoke.train.loop import predict
from taoke.utils import pick_device


def model_dir_of(ref: str) -> tuple[Path, Path | None]:
    """(model dir, run dir or None) for a run directory or a model/ folder."""
    p = Path(ref)
    if (p / "model" / "taoke.json").exists():
        return p / "model", p
    if (p / "taoke.json").exists():
        return p, p.parent if (p.parent / "lineage.json").exists() else None
    if p.exists() and (p / "status.json").exists():
        state = json.loads((p / "status.json").read_text()).get("state")
        raise ModelError(f"{ref}: run is not complete (state: {state}); it has no model to load.")
    raise ModelError(f"{ref}: not a taoke run directory or model folder (no taoke.json). "
                     "For a base model, derive a task model first.")


def _split_frame(run_dir: Path, split: str, meta: dict) -> tuple[pd.DataFrame, str]:
    splits = json.loads((run_dir / "splits.json").read_text())
    if split not in splits["rows"]:
        raise DataError(f"{run_dir}: no '{split}' split recorded; choose one of {', '.join(splits['rows'])}.")
    frame = load_source(splits["source"]).frame
    rename = {}
    if "image" in frame.columns and meta["inputs"].get("column") not in frame.columns:
        rename["image"] = meta["inputs"].get("column")
    if "label" in frame.columns and meta["label_column"] not in frame.columns:
        rename["label"] = meta["label_column"]
    frame = frame.rename(columns=rename)
    return frame.iloc[splits["rows"][split]].reset_index(drop=True), f"{splits['source']} ({split} split)"


def evaluate_model(ref: str, data: str | None, split: str | None) -> dict:
    model_dir, run_dir = model_dir_of(ref)
    meta = read_meta(model_dir)
    if meta.get("task") in ("causal-lm", "sft", "dpo"):
        from taoke.lm.pipeline import evaluate_lm_model

        return evaluate_lm_model(model_dir, data)
    if (data is None) == (split is None):
        raise DataError("give exactly one of --data FILE or --split NAME")
    if split:
        if run_dir is None:
            raise DataError(f"{ref}: --split needs a run directory (it records the splits).")
        frame, source = _split_frame(run_dir, split, meta)
    else:
        table = load_source(data)
        frame, source = table.frame, data
        if meta["label_column"] not in frame.columns:
            raise DataError(f"{data}: label column '{meta['label_column']}' not found; columns are: "
                            f"{', '.join(map(str, frame.columns))}.")
    model, meta, tokenizer = load_task_model(model_dir, pick_device())
    encoded = encode_frame(frame, meta, tokenizer)
    outputs = predict(model, encoded)
    metrics = metrics_from_outputs(to_target_units(outputs, meta), to_target_units(encoded.targets, meta),
                                   meta["labels"] is None, meta["labels"], per_class=True)
    return {"model": str(ref), "data": source, "rows": len(frame), "metrics": metrics}


def _read_inputs(file: str, meta: dict) -> pd.DataFrame:
    p = Path(file)
    if not p.exists():
        raise DataError(f"{file}: file not found")
    inputs = meta["inputs"]
    if p.suffix.lower() == ".txt":
        lines = [line for line in p.read_text().splitlines() if line.strip()]
        if inputs["kind"] == "tabular":
            raise DataError(f"{file}: tabular models take a csv/jsonl/parquet file with the feature columns.")
        return pd.DataFrame({inputs["column"]: lines})
    return load_source(file).frame


def predict_inputs(ref: str, inputs: list[str], file: str | None, output: str | None) -> list[dict]:
    model_dir, _ = model_dir_of(ref)
    meta = read_meta(model_dir)
    if meta.get("task") in ("causal-lm", "sft", "dpo"):
        from taoke.lm.pipeline import predict_lm

        return predict_lm(model_dir, inputs, file, output)
    if not inputs and not file:
        raise DataError("give inputs to predict, or --file FILE")
    kind = meta["inputs"]["kind"]
    if inputs and kind == "tabular":
        raise DataError("tabular models take --file with the feature columns")
    frame = _read_inputs(file, meta) if file else pd.DataFrame({meta["inputs"]["column"]: inputs})
    model, meta, tokenizer = load_task_model(model_dir, pick_device())
    encoded = encode_frame(frame.drop(columns=[meta["label_column"]], errors="ignore"), meta, tokenizer)
    outputs = predict(model, encoded)
    shown = frame[meta["inputs"]["column"]].astype(str).tolist() if kind != "tabular" else \
        [f"row {i}" for i in range(len(frame))]
    rows = []
    if meta["labels"] is None:
        values = to_target_units(outputs.view(-1), meta).tolist()
        rows = [{"input": s, "prediction": float(v)} for s, v in zip(shown, values)]
    else:
        probs = torch.softmax(outputs, -1)
        top = probs.argmax(-1)
        rows = [{"input": s, "label": meta["labels"][int(t)], "probability": float(probs[i, t])}
                for i, (s, t) in enumerate(zip(shown, top))]
    if output:
        from taoke.utils import write_text_atomic

        write_text_atomic(output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return rows
