"""The run directory, and the only code that reads or writes its record files.

    runs/<name>-<time>/
      .lock            held (flock) by the process that owns the run while it works: one writer per run
      recipe.yaml      the recipe, fully resolved
      status.json      starting/running (with the owner's pid and host) | failed (with the error) | complete;
                       a run whose owner died reads `interrupted`
      metrics.jsonl    one JSON object per line, flushed as training goes
      splits.json      classifiers: which rows of data.train went to which split
      checkpoints/     resumable training state, removed when the run completes
      plots/*.png  report.md  model/ (weights, taoke.json, README.md model card)
      lineage.json     written last: its presence marks a complete run

Workflows create a run (`Run.create`, which claims the directory), log inside `run.running()`, and end with
`run.finish(...)`; every other reader (runs list, eval, predict, the model library, provenance) goes through
`Run.open`. Commands that write files elsewhere check them with `check_output` first.
"""

from __future__ import annotations

import json
import math
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.table import Table

from taoke.errors import FormatError, ModelError, RecipeError, TaokeError
from taoke.files import cached_sha256, contained_path, sha256_file, write_json_atomic, write_text_atomic

try:
    import fcntl
except ImportError:  # Windows: byte-range locks through msvcrt instead
    fcntl = None
    import msvcrt

LINEAGE = "lineage.json"
STATUS = "status.json"
METRICS = "metrics.jsonl"
LOCK = ".lock"
SIGNATURE = "model.sig"   # written by `taoke sign` (provenance/signature.py)
# What a run directory holds: outputs of other commands may never replace these.
RUN_FILES = {"recipe.yaml", STATUS, METRICS, "splits.json", "report.md", LINEAGE, "model", "checkpoints", "plots", LOCK,
             SIGNATURE}
LIVE_STATES = ("starting", "running")


def base_chain(base: dict | None, limit: int = 64) -> list[dict]:
    """A lineage's base record, then its base run's base record, and so on up to the first base that is not a run
    (or a run no longer on disk): what the weights were first read from decides, e.g., which quantisation grid
    they still sit on."""
    chain: list[dict] = []
    while base and len(chain) < limit:   # a longer chain is a loop, not a lineage taoke wrote
        chain.append(base)
        run_dir = (base.get("run") or {}).get("dir")
        if base.get("format") != "run" or not run_dir or not Run.is_run(run_dir):
            break
        base = Run(Path(run_dir)).lineage.get("base")
    return chain


def _process_start(pid: int) -> str | None:
    """When a process started (clock ticks since boot, Linux), so a recycled pid is not taken for the owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()   # the command name may hold spaces and parentheses
    if len(fields) < 20:
        return None
    return "zombie" if fields[0] == "Z" else fields[19]


def owner_record() -> dict:
    return {"pid": os.getpid(), "pid_start": _process_start(os.getpid()), "host": socket.gethostname(),
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def owner_alive(status: dict) -> bool | None:
    """Whether the process a status record names still runs: True, False, or None when this machine cannot tell
    (another host, no pid, or an OS where a signal-0 probe is not available)."""
    pid = status.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or os.name == "nt":
        return None
    if status.get("host") not in (None, socket.gethostname()):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    except OSError:
        return None
    started = _process_start(pid)
    if started == "zombie" or (status.get("pid_start") and started and started != status["pid_start"]):
        return False  # exited (not yet reaped), or the pid now belongs to another process
    return True


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
    _lock: object = field(default=None, repr=False, compare=False)   # open lock file while we hold it

    # ------------------------------------------------------------------------------------------ creating

    @staticmethod
    def check_free(out: str | Path) -> None:
        """Refuse `--out` early when it already holds something (a run or anything else); nothing is touched."""
        path = Path(out)
        try:
            busy = path.exists() and (not path.is_dir() or any(path.iterdir()))
        except OSError as e:
            raise RecipeError(f"--out {out}: cannot be used ({e.strerror or e}).") from None
        if busy:
            raise RecipeError(f"--out {out}: exists and is not an empty directory; choose a new one"
                              + (f" (or continue it: taoke derive --resume {out})" if (path / "recipe.yaml").is_file()
                                 and not (path / LINEAGE).exists() else "") + ".")

    @classmethod
    def create(cls, name: str, out: str | Path | None = None, root: str | Path = "runs") -> "Run":
        """A new run directory, claimed by this process: `out` (absent or empty), or <root>/<name>-<time> (a suffix
        keeps names unique). Two processes given the same `out` cannot both get it: the loser leaves it untouched."""
        if out is not None:
            cls.check_free(out)
            path = Path(out)
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise RecipeError(f"--out {out}: cannot create it ({e.strerror or e}).") from None
            return cls(path)._claim(f"--out {out}")
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        for n in range(1000):
            path = Path(root) / (f"{name}-{stamp}" + (f"-{n}" if n else ""))
            try:
                path.mkdir(parents=True)  # exclusive: two runs started in the same second get different names
            except FileExistsError:
                continue
            except OSError as e:
                raise RecipeError(f"{path}: cannot create the run directory ({e.strerror or e}).") from None
            return cls(path)._claim(str(path))
        raise RecipeError(f"{root}: cannot find a free run directory name for {name}-{stamp}")

    def _claim(self, label: str) -> "Run":
        """Hold the run's lock, then make sure nothing else got in first; status says starting, with our pid."""
        self.hold_lock()
        if any(p.name != LOCK for p in self.path.iterdir()):
            self.release_lock()
            raise RecipeError(f"{label}: another taoke process claimed this directory first; choose a new one.")
        write_json_atomic(self.path / STATUS, {"state": "starting", **owner_record()})
        return self

    def hold_lock(self) -> None:
        """An exclusive lock on the run for as long as this process works on it. The OS drops it when the process
        dies (so a killed owner never blocks a resume), and Python when this Run object goes away."""
        if self._lock is not None:
            return
        lock = open(self.path / LOCK, "a+b")  # noqa: SIM115 - held open for the run's lifetime, closed by release_lock
        try:
            if fcntl is not None:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            else:
                msvcrt.locking(lock.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            lock.close()
            pid = self.status().get("pid")
            raise RecipeError(f"{self.path}: in use by another taoke process{f' (pid {pid})' if pid else ''}; "
                              "wait for it to end, or choose another directory.") from None
        self._lock = lock

    def release_lock(self) -> None:
        if self._lock is not None:
            self._lock.close()   # closing the file drops the lock
            self._lock = None

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
        """status.json, with `interrupted` for a starting/running run whose owner process is gone."""
        f = self.path / STATUS
        if f.is_file():
            try:
                status = json.loads(f.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError, OSError):
                return {"state": "unreadable"}
            if not isinstance(status, dict):
                return {"state": "unreadable"}
            if status.get("state") in LIVE_STATES and owner_alive(status) is False:
                status = {**status, "state": "interrupted", "was": status["state"]}
            return status
        return {"state": "complete" if (self.path / LINEAGE).is_file() else "unknown"}

    def next_step(self) -> str | None:
        """What the user can do with an interrupted or failed run."""
        if self.state not in ("interrupted", "failed"):
            return None
        if (self.checkpoint_dir / "last.pt").exists():
            return f"taoke derive --resume {self.path}"
        return f"no checkpoint to resume from; start it again: taoke derive {self.recipe_path}"

    @property
    def state(self) -> str:
        return self.status().get("state", "unknown")

    @property
    def complete(self) -> bool:
        return (self.path / LINEAGE).is_file()

    def check_resumable(self) -> None:
        """A run resumes when it has its recipe and a checkpoint, is not complete, and no process works on it."""
        if self.complete:
            raise RecipeError(f"{self.path}: run is already complete; nothing to resume.")
        status = self.status()
        if status.get("state") in LIVE_STATES and status.get("pid") != os.getpid() and owner_alive(status) is not False:
            raise RecipeError(f"{self.path}: still {status['state']} (pid {status.get('pid')} on "
                              f"{status.get('host', 'this host')}); wait for it, or stop it before resuming.")
        if not (self.checkpoint_dir / "last.pt").exists():
            raise RecipeError(f"{self.path}: no checkpoint yet (killed before the first one); start it again instead.")

    @contextmanager
    def running(self):
        """status.json says running while the block runs and failed (with the error) if it raises; yields the log.
        The run's lock is held throughout and dropped at the end."""
        self.hold_lock()
        write_json_atomic(self.path / STATUS, {"state": "running", **owner_record()})
        log = MetricsLog(self.path / METRICS)
        try:
            yield log
        except BaseException as e:
            write_json_atomic(self.path / STATUS, {"state": "failed", "error": f"{e.__class__.__name__}: {e}"})
            raise
        finally:
            log.close()
            self.release_lock()

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

    def _model_files(self) -> list[str]:
        return sorted(p.relative_to(self.model_dir).as_posix() for p in self.model_dir.rglob("*") if p.is_file())

    def hash_model_files(self) -> dict[str, dict]:
        """{path under model/: {bytes, sha256}} for every file the run wrote there."""
        return {rel: {"bytes": (self.model_dir / rel).stat().st_size, "sha256": cached_sha256(self.model_dir / rel)}
                for rel in self._model_files()}

    def check_model_files(self) -> None:
        """Refuse a run whose model files differ from what lineage.json recorded (changed, missing or added).

        A sealed weight file (see `sealed`) is checked as its sealed form; its plaintext hash stays recorded and
        is checked when it is decrypted, and again once the run is unsealed."""
        lineage = self.lineage
        recorded = lineage.get("model_files")
        if recorded is None:
            return  # runs written before taoke recorded model hashes
        where = self.path / LINEAGE
        if not isinstance(recorded, dict) or not all(isinstance(v, dict) for v in recorded.values()):
            raise FormatError(f"{where}: 'model_files' must map file names to {{bytes, sha256}}")
        sealed = lineage.get("sealed")
        sealed = sealed.get("files") if isinstance(sealed, dict) else None
        if not isinstance(sealed, dict) or not all(isinstance(v, dict) for v in sealed.values()):
            sealed = {}
        for rel, want in recorded.items():
            f = contained_path(self.model_dir, rel, where, "model_files entry")
            if rel in sealed and not f.exists():
                f = contained_path(self.model_dir, sealed[rel].get("file"), where, "sealed file entry")
                want = sealed[rel]
            if not f.is_file():
                raise ModelError(f"{f}: recorded in {where} but missing; the run was changed after it "
                                 "completed. Derive it again or restore the file.")
            if f.stat().st_size != want.get("bytes") or cached_sha256(f) != want.get("sha256"):
                raise ModelError(f"{f}: sha256 differs from the one {where} recorded; the file was "
                                 "changed after the run completed. Derive it again or restore the file.")
        sealed_names = {entry.get("file") for entry in sealed.values()}
        added = [rel for rel in self._model_files() if rel not in recorded and rel not in sealed_names]
        if added:
            raise ModelError(f"{self.model_dir / added[0]}: not written by the run ({where} does not record it), and "
                             "loaders read every weight file in model/. Remove it, or derive the run again.")

    @property
    def sealed(self) -> dict | None:
        """lineage.json's record of sealed weight files ({"cipher", "files": {name: {file, bytes, sha256}}}), or
        None when the weights are plain."""
        return self.lineage.get("sealed") if self.complete else None

    def record_sealed(self, record: dict | None) -> None:
        """Record (or, with None, remove) the sealed state in lineage.json. The key goes last and nothing else
        changes, so removing it restores the record byte for byte (children pin its sha256)."""
        lineage = {k: v for k, v in self.lineage.items() if k != "sealed"}
        if record is not None:
            lineage["sealed"] = record
        write_json_atomic(self.path / LINEAGE, lineage)

    # ------------------------------------------------------------------------------------------ reading

    @property
    def lineage(self) -> dict:
        f = self.path / LINEAGE
        if not f.is_file():
            raise ModelError(f"{self.path}: run is not complete (state: {self.state}); it has no {LINEAGE}.")
        try:
            lineage = json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise FormatError(f"{f}: not valid JSON ({e.msg} at line {e.lineno})") from None
        except (UnicodeDecodeError, RecursionError) as e:
            raise FormatError(f"{f}: not a lineage record ({str(e)[:100]})") from None
        if not isinstance(lineage, dict):
            raise FormatError(f"{f}: a lineage record is a JSON object, not {type(lineage).__name__}")
        return lineage

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


def _score(metrics: object, key: str) -> str | None:
    value = metrics.get(key) if isinstance(metrics, dict) else None
    return f"{value:.4f}" if isinstance(value, (int, float)) and math.isfinite(value) else None


def list_runs(root: str | Path) -> list[dict]:
    """Runs under a folder, newest first, with their state, headline metric and, for an interrupted or failed
    run, what to do next."""
    root = Path(root)
    rows = []
    if not root.is_dir():
        return rows
    for d in sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True):
        if not (d / STATUS).exists() and not (d / LINEAGE).exists():
            continue
        run = Run(d)
        row = {"run": d.name, "path": str(d), "state": run.state}
        if run.next_step():
            row["next"] = run.next_step()
        if run.complete:
            try:
                lin = run.lineage
            except TaokeError as e:
                rows.append({**row, "state": "corrupt", "error": str(e)})
                continue
            m = lin.get("metrics") if isinstance(lin.get("metrics"), dict) else {}
            ref = m.get("reference") if isinstance(m.get("reference"), str) else None
            derived = m.get("derived") if isinstance(m.get("derived"), dict) else {}
            key = next((k for k in ("macro_f1", "accuracy", "r2", "loss") if _score(derived, k)), None)
            base = lin.get("base")
            row.update(task=str(lin.get("task")), base=str(base.get("name")) if isinstance(base, dict) else None)
            if key:
                row["derived_score"] = f"{key} {_score(derived, key)}"
                if ref and _score(m.get(ref), key):
                    row["reference_score"] = f"{ref}: {_score(m.get(ref), key)}"
        rows.append(row)
    return rows


def check_output(path: str | Path, force: bool = False) -> Path:
    """Refuse to write `path` over a file of a run directory (its records, model/, checkpoints/, plots/: never)
    or over any existing file (unless force). Returns the path."""
    path = Path(path)
    target = path.parent.resolve() / path.name
    for d in target.parents:
        if (d / "recipe.yaml").is_file() and ((d / STATUS).exists() or (d / LINEAGE).exists()):
            part = target.relative_to(d).parts[0]
            if part in RUN_FILES:
                raise TaokeError(f"{path}: is part of the run {d} ({part}); write the output somewhere else.")
            break
    if path.is_dir():
        raise TaokeError(f"{path}: is a directory; name a file to write.")
    if (path.exists() or path.is_symlink()) and not force:
        raise TaokeError(f"{path}: already exists; choose another name, or pass --force to overwrite it.")
    return path


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
