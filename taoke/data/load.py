"""Load a data source into a pandas DataFrame, with errors that name the file and line.

Sources: CSV/TSV, JSONL/JSON and Parquet files (read through HF `datasets`), image folders
(one sub-folder per class), and datasets bundled with scikit-learn (`sklearn:digits`, ...), which
need no download.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from taoke.errors import DataError, FormatError
from taoke.files import sha256_file

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SKLEARN_SOURCES = {
    # name: (loader function, task family, data file shipped inside scikit-learn)
    "digits": ("load_digits", "image", "digits.csv.gz"),
    "iris": ("load_iris", "tabular", "iris.csv"),
    "wine": ("load_wine", "tabular", "wine_data.csv"),
    "breast_cancer": ("load_breast_cancer", "tabular", "breast_cancer.csv"),
    "diabetes": ("load_diabetes", "tabular", "diabetes_data_raw.csv.gz"),
}


@dataclass
class Table:
    frame: pd.DataFrame
    source: str                 # the path or source name as given
    kind: str                   # csv | json | parquet | image-folder | sklearn
    files: list[dict] = field(default_factory=list)   # [{path, sha256}] for lineage

    def line_of(self, index: int) -> str:
        """Human location of a row: file line for text files (header counts), else row index."""
        if self.kind == "csv":
            return f"{self.source}:{index + 2}"
        if self.kind == "json":
            return f"{self.source}:{index + 1}"
        return f"{self.source} (row {index})"


def load_source(spec: str) -> Table:
    if spec.startswith("sklearn:"):
        return _load_sklearn(spec)
    path = Path(spec)
    if not path.exists():
        raise DataError(f"{spec}: data file not found. Check data.train / data.test in the recipe.")
    if path.is_dir():
        return _load_image_folder(path)
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return _load_csv(path, "\t" if suffix == ".tsv" else ",")
    if suffix in (".jsonl", ".json"):
        return _load_json(path)
    if suffix == ".parquet":
        return _load_with_datasets("parquet", path, "parquet")
    raise DataError(f"{spec}: unsupported data file type '{suffix}'. Use .csv, .tsv, .jsonl, .json, .parquet "
                    "or an image folder (one sub-folder per class).")


def _load_with_datasets(builder: str, path: Path, kind: str, **kwargs) -> Table:
    from datasets import load_dataset   # imported here: it costs a second that csv, json and image data never need

    try:
        ds = load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except Exception as e:  # datasets wraps parser errors in several types
        raise DataError(f"{path}: could not be read as {kind} ({e.__class__.__name__}: {str(e)[:200]})") from None
    return Table(ds.to_pandas(), str(path), kind, [{"path": str(path), "sha256": sha256_file(path)}])


def _load_csv(path: Path, delimiter: str) -> Table:
    # Check field counts with the csv module first: datasets/pandas errors do not always say which line.
    with open(path, newline="", encoding="utf-8", errors="strict") as f:
        try:
            reader = csv.reader(f, delimiter=delimiter)
            header = next(reader, None)
            if not header:
                raise DataError(f"{path}: file is empty; expected a header row with column names.")
            for row in reader:
                if row and len(row) != len(header):
                    raise DataError(f"{path}:{reader.line_num}: expected {len(header)} fields ({', '.join(header)}), "
                                    f"saw {len(row)}. Quote fields that contain '{delimiter}'.")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason}). Re-save the file as UTF-8.") from None
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: malformed CSV ({e}).") from None
    table = _load_with_datasets("csv", path, "csv", delimiter=delimiter)
    return table


def _load_json(path: Path) -> Table:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}). Re-save the file as UTF-8.") \
            from None
    stripped = text.lstrip()
    if path.suffix.lower() == ".json" and stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg}).") from None
        except RecursionError:
            raise FormatError(f"{path}: JSON nested too deeply to be a list of examples.") from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise DataError(f"{path}: expected a JSON list of objects (one per example).")
        frame = pd.DataFrame(rows)
        return Table(frame, str(path), "json-array", [{"path": str(path), "sha256": sha256_file(path)}])
    # JSON Lines: validate each line so a bad row is reported with its line number.
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg}). Each line must be one JSON object.") from None
        except RecursionError:
            raise FormatError(f"{path}:{lineno}: JSON nested too deeply to be an example.") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}.")
    return _load_with_datasets("json", path, "json")


def _load_image_folder(root: Path) -> Table:
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: an image folder needs one sub-folder per class (e.g. {root}/cat/1.png).")
    rows, files = [], []
    for d in classes:
        images = sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise DataError(f"{d}: class folder '{d.name}' has no images ({', '.join(sorted(IMAGE_SUFFIXES))}).")
        for p in images:
            rows.append({"image": str(p), "label": d.name})
            files.append({"path": str(p.relative_to(root)), "sha256": sha256_file(p)})
    # One combined digest keeps lineage.json small for folders with thousands of files.
    digest = hashlib.sha256("".join(f["path"] + f["sha256"] for f in files).encode()).hexdigest()
    return Table(pd.DataFrame(rows), str(root), "image-folder",
                 [{"path": str(root), "sha256": digest, "files": len(files)}])


def _load_sklearn(spec: str) -> Table:
    name = spec.split(":", 1)[1]
    if name not in SKLEARN_SOURCES:
        raise DataError(f"unknown bundled dataset '{spec}'. Available: "
                        + ", ".join(f"sklearn:{k}" for k in SKLEARN_SOURCES))
    import sklearn.datasets as skd   # 0.7 s to import: only for these datasets

    loader, family, data_file = SKLEARN_SOURCES[name]
    bunch = getattr(skd, loader)()
    if family == "image":
        images = [img.astype(np.float32) / 16.0 for img in bunch.images]  # digits pixels are 0..16
        frame = pd.DataFrame({"image": images, "label": [str(t) for t in bunch.target]})
    else:
        frame = pd.DataFrame(bunch.data, columns=[str(c) for c in bunch.feature_names])
        if hasattr(bunch, "target_names") and name != "diabetes":
            frame["label"] = [str(bunch.target_names[t]) for t in bunch.target]
        else:
            frame["label"] = bunch.target.astype(float)
    data_path = Path(skd.__file__).parent / "data" / data_file
    files = [{"path": f"scikit-learn/datasets/data/{data_file}",
              "sha256": sha256_file(data_path) if data_path.exists() else None}]
    return Table(frame, spec, "sklearn", files)


def require_columns(table: Table, columns: list[str], role: str) -> None:
    missing = [c for c in columns if c not in table.frame.columns]
    if missing:
        raise DataError(f"{table.source}: column '{missing[0]}' ({role}) not found. Columns are: "
                        f"{', '.join(map(str, table.frame.columns))}. Set data.{role} in the recipe.")
