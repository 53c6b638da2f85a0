"""taoke.json, the file that says what a saved task model is (task, architecture, labels): read and checked here,
apart from the weights, so commands that only need to know what a folder holds do not wait for torch."""

from __future__ import annotations

from pathlib import Path

from taoke.errors import FormatError, ModelError
from taoke.files import read_json_object

SCRATCH_ARCHS = ("cnn", "mlp", "lstm", "gru", "transformer")
LM_ARCHS = ("hf-causal-lm", "gguf")   # language-model runs and their GGUF exports (derive/language.py, ship/)
META_FILE = "taoke.json"


def read_meta(model_dir: Path) -> dict:
    meta_path = Path(model_dir) / META_FILE
    if not meta_path.exists():
        raise ModelError(f"{model_dir}: no {META_FILE}; this is not a taoke task model. "
                         "Give a run directory (runs/<name>-<time>) or its model/ folder.")
    meta = read_json_object(meta_path, META_FILE)
    arch = meta.get("arch")
    known = arch in ("hf", *LM_ARCHS) or (isinstance(arch, str) and arch.startswith("scratch:")
                                          and arch.split(":", 1)[1] in SCRATCH_ARCHS)
    if not isinstance(meta.get("task"), str) or not known:
        raise FormatError(f"{meta_path}: 'task' and 'arch' (hf, {', '.join(LM_ARCHS)} or "
                          f"scratch:<{'|'.join(SCRATCH_ARCHS)}>) are required; got task "
                          f"{str(meta.get('task'))[:40]!r}, arch {str(arch)[:40]!r}")
    return meta
