"""Export a classifier/regressor run: ONNX (fp32 or int8) checked in ONNX Runtime, or a plain transformers
directory checked by a plain transformers reload, both on the run's whole test split.

fp32 exports must match the run's model in PyTorch (fp32, no autocast) to max |Δ logit| < 1e-4 with identical
predicted labels; an int8 export reports the test-split metric delta and the share of labels that agree.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from peft import PeftModel
from rich.console import Console
from transformers import AutoModelForSequenceClassification

from taoke.data.encode import encode_frame, to_target_units
from taoke.errors import ModelError
from taoke.evaluate.metrics import metrics_from_outputs
from taoke.files import write_json_atomic
from taoke.inference.onnx_runtime import RUNTIME, OnnxPredictor
from taoke.inference.task import TaskPredictor
from taoke.lm.merge import ParityError
from taoke.models.parts import count_parameters
from taoke.models.meta import read_meta
from taoke.models.task_model import HFClassifier, load_task_model
from taoke.run import Run
from taoke.ship.onnx import export_onnx, quantize_int8
from taoke.train.batches import Encoded
from taoke.train.classifier import predict

console = Console(stderr=True)
LOGIT_TOLERANCE = 1e-4
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "added_tokens.json", "chat_template.jinja")
HF_DTYPES = {None: torch.float32, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def check_classifier_run(parent: Run, fmt: str) -> None:
    arch = read_meta(parent.model_dir).get("arch", "")
    if fmt == "hf" and arch != "hf":
        raise ModelError(f"{parent.path}: --format hf needs a transformers-based run; this one is {arch}. "
                         "Export it with --format onnx.")


def _plain(model: torch.nn.Module) -> torch.nn.Module:
    """LoRA/DoRA adapters merged into their layers (PEFT's merge_and_unload): one plain network to export."""
    if isinstance(model, HFClassifier) and isinstance(model.hf, PeftModel):
        model.hf = model.hf.merge_and_unload()
    return model.float().eval()


def _metrics(outputs: torch.Tensor, encoded: Encoded, meta: dict) -> dict:
    m = metrics_from_outputs(to_target_units(outputs, meta), to_target_units(encoded.targets, meta),
                             meta["labels"] is None, meta["labels"])
    return {k: v for k, v in m.items() if not isinstance(v, dict)}


def compare(ref: torch.Tensor, out: torch.Tensor, encoded: Encoded, meta: dict, exact: bool, runtime: str) -> dict:
    """Outputs of the export vs the run's model on the same rows; ParityError when an fp32 export differs."""
    diff = float((ref - out).abs().max()) if len(ref) else 0.0
    regression = meta["labels"] is None
    agree = 1.0 if regression else float((ref.argmax(-1) == out.argmax(-1)).float().mean())
    m_ref, m_out = _metrics(ref, encoded, meta), _metrics(out, encoded, meta)
    report = {"split": "test", "rows": len(encoded), "max_abs_logit_diff": diff,
              "labels_identical": None if regression else agree == 1.0, "label_agreement": agree,
              "metrics": {"pytorch": m_ref, runtime: m_out, "delta": {k: m_out[k] - m_ref[k] for k in m_ref}},
              "tolerance": LOGIT_TOLERANCE if exact else None}
    if exact and (diff >= LOGIT_TOLERANCE or agree < 1.0):
        raise ParityError(f"{runtime} output differs from the run's model on its test split: max |Δ| {diff:.3g} "
                          f"(must be < {LOGIT_TOLERANCE:g}), labels agree on {agree:.2%} of {len(encoded)} rows")
    return report


def _copy_side_files(src: Path, dst: Path, names: tuple[str, ...]) -> None:
    for name in names:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def export_classifier(parent: Run, model_dir: Path, fmt: str, quant: str | None, check: bool) -> dict:
    model, meta, tok = load_task_model(parent.model_dir, "cpu")
    model = _plain(model)
    frame, _ = TaskPredictor(model, tok, meta, parent.model_dir, parent).split_frame("test")
    encoded = encode_frame(frame, meta, tok)
    reference = predict(model, encoded, precision="fp32")
    model_dir.mkdir(parents=True, exist_ok=True)
    result: dict = {"parameters": count_parameters(model)[0]}
    export_meta = {k: v for k, v in meta.items() if k != "adapter"}
    _copy_side_files(parent.model_dir, model_dir, TOKENIZER_FILES)
    if fmt == "onnx":
        kind = meta["inputs"]["kind"]
        console.print(f"exporting to ONNX ({quant or 'fp32'}); checking in ONNX Runtime on {len(encoded)} test rows")
        with tempfile.TemporaryDirectory(dir=model_dir.parent) as work:
            fp32 = Path(work) / "model.onnx"
            names = export_onnx(model, kind, encoded, fp32)
            if quant == "int8":
                quantize_int8(fp32, model_dir / "model.onnx")
            else:
                shutil.move(fp32, model_dir / "model.onnx")
        _copy_side_files(parent.model_dir, model_dir, ("config.json",))   # what the encoder is, for provenance
        export_meta["export"] = {"runtime": RUNTIME, "file": "model.onnx", "quant": quant or "fp32", "inputs": names,
                                 "outputs": ["logits"], "opset": 17}
        write_json_atomic(model_dir / "taoke.json", export_meta)
        result["file"] = "model.onnx"
        if check:
            out = OnnxPredictor.load(model_dir, device="cpu").forward(encoded)
            result["parity"] = compare(reference, out, encoded, meta, exact=quant is None, runtime=RUNTIME)
    else:
        hf = model.hf.to(HF_DTYPES[quant])
        hf.save_pretrained(model_dir, safe_serialization=True)
        export_meta["export"] = {"runtime": "transformers", "dtype": quant or "F32"}
        write_json_atomic(model_dir / "taoke.json", export_meta)
        result["file"] = "model.safetensors"
        if check:
            if meta.get("head"):  # a custom head: only taoke's loader rebuilds it
                reloaded, _, _ = load_task_model(model_dir, "cpu")
            else:
                reloaded = HFClassifier(AutoModelForSequenceClassification.from_pretrained(model_dir,
                                                                                         dtype=torch.float32))
            out = predict(reloaded.float().eval(), encoded, precision="fp32")
            result["parity"] = compare(reference, out, encoded, meta, exact=quant in (None, "F32"),
                                       runtime="transformers")
    if check:
        result["parity"]["reference"] = "the run's model in PyTorch (fp32) on the run's whole test split"
    return result

