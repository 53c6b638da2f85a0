"""The run directory, and the only code that reads or writes its record files.

    runs/<name>-<time>/
      recipe.yaml      the recipe, fully resolved
      status.json      running (with the owner's pid) | failed (with the error) | complete
      metrics.jsonl    one JSON object per line, flushed as training goes
      splits.json      classifiers: which rows of data.train went to which split
      checkpoints/     resumable training state, removed when the run completes
      plots/*.png  report.md  model/ (weights, taoke.json, README.md model card)
      lineage.json     written last: its presence marks a complete run

Workflows create a run (`Run.create`), log inside `run.running()`, and end with `run.finish(...)`; every
other reader (runs list, eval, predict, the model library, provenance) goes through `Run.open`.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from taoke.errors import ModelError, RecipeError
from taoke.files import cached_sha256, sha256_file, write_json_atomic, write_text_atomic

LINEAGE = "lineage.json"
STATUS = "status.json"
METRICS = "metrics.jsonl"


class MetricsLog:
    """metrics.jsonl: one JSON object per line, flushed as it goes so a crash keeps what was logged."""

    def __init__(self, path: Path):
        self.f = open(path, "a", buffering=1, encoding="utf-8")

    def __call__(self, row: dict) -> None:
        self.f.write(json.dumps(row) + "\n")

    def close(self) -> None:
        self.f.close()


@dataclass
class Run:
    """A run directory. `metrics` and `lineage` read its records (a complete run has both)."""
    path: Path

    # ------------------------------------------------------------------------------------------ creating

    @classmethod
    def create(cls, name: str, out: str | Path | None = None, root: str | Path = "runs") -> "Run":
        """A new, empty run directory: `out`, or <root>/<name>-<time> (a suffix keeps names unique)."""
        if out is not None:
            path = Path(out)
            if path.exists() and (not path.is_dir() or any(path.iterdir())):
                raise RecipeError(f"--out {out}: exists and is not an empty directory; choose a new one.")
            path.mkdir(parents=True, exist_ok=True)
            return cls(path)
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        for n in range(1000):
            path = Path(root) / (f"{name}-{stamp}" + (f"-{n}" if n else ""))
            try:
                path.mkdir(parents=True)  # exclusive: two runs started in the same second get different names
                return cls(path)
            except FileExistsError:
                continue
        raise RecipeError(f"{root}: cannot find a free run directory name for {name}-{stamp}")

    @classmethod
    def open(cls, path: str | Path) -> "Run":
        """An existing run directory (complete or not); a ModelError names what is missing."""
        path = Path(path)
        if not (path / "recipe.yaml").is_file():
            raise ModelError(f"{path}: not a taoke run directory (no recipe.yaml).")
        return cls(path)

    @staticmethod
    def is_run(path: str | Path) -> bool:
        """A complete run: a lineage record beside a model/ folder."""
        path = Path(path)
        return (path / LINEAGE).is_file() and (path / "model").is_dir()

    # ------------------------------------------------------------------------------------------ layout

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def recipe_path(self) -> Path:
        return self.path / "recipe.yaml"

    # ------------------------------------------------------------------------------------------ state

    def status(self) -> dict:
        f = self.path / STATUS
        if f.is_file():
            try:
                return json.loads(f.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                return {"state": "unreadable"}
        return {"state": "complete" if (self.path / LINEAGE).is_file() else "unknown"}

    @property
    def state(self) -> str:
        return self.status().get("state", "unknown")

    @property
    def complete(self) -> bool:
        return (self.path / LINEAGE).is_file()

    def check_resumable(self) -> None:
        """A run resumes when it has its recipe and a checkpoint and is not complete."""
        if self.complete:
            raise RecipeError(f"{self.path}: run is already complete; nothing to resume.")
        if not (self.checkpoint_dir / "last.pt").exists():
            raise RecipeError(f"{self.path}: no checkpoint yet (killed before the first one); start it again instead.")

    @contextmanager
    def running(self):
        """status.json says running while the block runs and failed (with the error) if it raises; yields the log."""
        write_json_atomic(self.path / STATUS, {"state": "running", "pid": os.getpid()})
        log = MetricsLog(self.path / METRICS)
        try:
            yield log
        except BaseException as e:
            write_json_atomic(self.path / STATUS, {"state": "failed", "error": f"{e.__class__.__name__}: {e}"})
            raise
        finally:
            log.close()

    # ------------------------------------------------------------------------------------------ writing

    def write_recipe(self, text: str) -> None:
        write_text_atomic(self.recipe_path, text)

    def write_json(self, name: str, obj) -> None:
        write_json_atomic(self.path / name, obj)

    def truncate_metrics(self, step: int, epoch: int) -> None:
        """Drop metrics logged after the checkpoint being resumed from (step, epoch); they will be logged again."""
        path = self.path / METRICS
        if not path.exists():
            return
        keep = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the kill
            if (row.get("type") == "step" and row["step"] <= step) or \
                    (row.get("type") == "epoch" and row["epoch"] < epoch):
                keep.append(line)
        write_text_atomic(path, "".join(k + "\n" for k in keep))

    def finish(self, *, lineage: dict, card: str, report: str, rows: list[tuple[str, dict]], metrics: list[str],
               reference: str | None, quiet: bool = False) -> "Run":
        """Write the card, the report and, last, lineage.json (with the sha256 of every file under model/, so a
        changed weight is noticed when the run is loaded); mark the run complete and print the table."""
        write_text_atomic(self.model_dir / "README.md", card)
        write_text_atomic(self.path / "report.md", report)
        lineage = {**lineage, "model_files": self.hash_model_files()}
        write_json_atomic(self.path / LINEAGE, lineage)   # written last: its presence marks a complete run
        write_json_atomic(self.path / STATUS, {"state": "complete"})
        if not quiet:
            print_table(rows, metrics, reference)
            Console(stderr=True).print(f"run directory: [bold]{self.path}[/]")
        return self

    def hash_model_files(self) -> dict[str, dict]:
        """{path under model/: {bytes, sha256}} for every file the run wrote there."""
        files = sorted(p for p in self.model_dir.rglob("*") if p.is_file())
        return {p.relative_to(self.model_dir).as_posix(): {"bytes": p.stat().st_size, "sha256": cached_sha256(p)}
                for p in files}

    def check_model_files(self) -> None:
        """Refuse a run whose model files differ from what lineage.json recorded (changed, missing or added)."""
        recorded = self.lineage.get("model_files")
        if recorded is None:
            return  # runs written before taoke recorded model hashes
        for rel, want in recorded.items():
            f = self.model_dir / rel
            if not f.is_file():
                raise ModelError(f"{f}: recorded in {self.path / LINEAGE} but missing; the run was changed after it "
                                 "completed. Derive it again or restore the file.")
            if f.stat().st_size != want["bytes"] or cached_sha256(f) != want["sha256"]:
                raise ModelError(f"{f}: sha256 differs from the one {self.path / LINEAGE} recorded; the file was "
                                 "changed after the run completed. Derive it again or restore the file.")

    # ------------------------------------------------------------------------------------------ reading

    @property
    def lineage(self) -> dict:
        f = self.path / LINEAGE
        if not f.is_file():
            raise ModelError(f"{self.path}: run is not complete (state: {self.state}); it has no {LINEAGE}.")
        try:
            return json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ModelError(f"{f}: not valid JSON ({e.msg} at line {e.lineno})") from None

    def lineage_sha256(self) -> str:
        """Hash of the lineage record as written (children record it to pin their parent)."""
        return sha256_file(self.path / LINEAGE)

    @property
    def metrics(self) -> dict:
        """Scores of base (or parent) and derived on the same held-out split, as lineage.json records them."""
        return self.lineage.get("metrics", {})

    def report(self) -> str:
        return (self.path / "report.md").read_text(encoding="utf-8")

    def splits(self) -> dict:
        """splits.json of a classifier run: {"source": data.train, "rows": {split: [row indices]}}."""
        f = self.path / "splits.json"
        if not f.is_file():
            raise ModelError(f"{self.path}: no splits.json (language-model runs record no row splits).")
        return json.loads(f.read_text(encoding="utf-8"))

    def logged(self, kind: str | None = None) -> list[dict]:
        """Rows of metrics.jsonl (of one type: step | epoch | base | test), skipping a line cut by a kill."""
        path = self.path / METRICS
        rows = []
        for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if kind is None or row.get("type") == kind:
                rows.append(row)
        return rows

    def __str__(self) -> str:
        return str(self.path)


def read_lineage(path: str | Path) -> dict:
    """lineage.json of a complete run directory."""
    return Run(Path(path)).lineage


def list_runs(root: str | Path) -> list[dict]:
    """Runs under a folder, newest first, with their state and headline metric."""
    root = Path(root)
    rows = []
    if not root.is_dir():
        return rows
    for d in sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True):
        if not (d / STATUS).exists() and not (d / LINEAGE).exists():
            continue
        run = Run(d)
        row = {"run": d.name, "path": str(d), "state": run.state}
        if run.complete:
            try:
                lin = run.lineage
            except ModelError as e:
                rows.append({**row, "state": "corrupt", "error": str(e)})
                continue
            m = lin.get("metrics", {})
            ref = m.get("reference")
            key = next((k for k in ("macro_f1", "accuracy", "r2", "loss") if k in m.get("derived", {})), None)
            row.update(task=lin.get("task"), base=(lin.get("base") or {}).get("name"))
            if key:
                row["derived_score"] = f"{key} {m['derived'][key]:.4f}"
                if ref and key in m.get(ref, {}):
                    row["reference_score"] = f"{ref}: {m[ref][key]:.4f}"
        rows.append(row)
    return rows


def print_table(rows: list[tuple[str, dict]], metrics: list[str], reference: str | None) -> None:
    """Base (or parent) and derived side by side, with the delta."""
    table = Table(title="held-out split: base vs derived")
    table.add_column("model")
    for m in metrics:
        table.add_column(m, justify="right")
    for name, m in rows:
        table.add_row(name, *[f"{m[k]:.4f}" if k in m else "-" for k in metrics])
    ref = dict(rows).get(reference) if reference else None
    if ref:
        d = dict(rows)["derived"]
        # a metric only the derived model has (e.g. DPO loss against its own reference) has no delta
        table.add_row(f"delta vs {reference}", *[f"{d[k] - ref[k]:+.4f}" if k in d and k in ref else "-"
                                                 for k in metrics], style="bold")
    Console().print(table)
