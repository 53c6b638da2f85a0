"""Streaming demonstration: `taoke verify` on two models that together do not fit in RAM.

    .venv/bin/python bench/verify_big.py [--work /tmp/taoke-verify-big] [--gib 13] [--shard-gib 2] [--noise 0.01]
                                         [--mmap-baseline] [--no-append]

A: SmolLM2-135M's real weights with its decoder layers repeated (0..29, 0..29, ...) until the float32 safetensors
   file reaches --gib GiB; one file, written tensor by tensor.
B: a derived variant of A: tensors renamed as in the 2023 case (ln1/ln2, attn.wq, transformer.blocks, ...), every
   weight matrix plus Gaussian noise of --noise x its std, sharded into ~--shard-gib GiB files with an index.
Both are built once under --work (reused when present); building holds one tensor of the big models at a time.
Then `taoke verify A B --json` runs in a fresh process: wall time, that process's peak RSS (VmHWM) against the two
largest tensors, and the verdict are printed and appended as a dated section to bench/RESULTS.md.
--mmap-baseline also streams A through safetensors' own mmap reader (safe_open) and reports its peak RSS.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from results import record  # noqa: E402

GIB = 2 ** 30

PEAK_RSS = r"""
def peak_rss_mb():
    # VmHWM: this process's own peak (ru_maxrss of a child would carry the parent's peak across fork/exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
"""

# The real CLI entry point, run in this process so that VmHWM is the CLI's own.
VERIFY_CHILD = PEAK_RSS + r"""
import contextlib, io, json, sys, time
t0 = time.perf_counter()
from taoke.cli import main
if sys.argv[1] == "--imports-only":
    from taoke.provenance import verify  # noqa: F401
    print(json.dumps({"rss_mb": peak_rss_mb()}))
    sys.exit(0)
sys.argv = ["taoke", "verify", sys.argv[1], sys.argv[2], "--json"]
out, code = io.StringIO(), 0
with contextlib.redirect_stdout(out):
    try:
        main()
    except SystemExit as e:
        code = e.code or 0
print(json.dumps({"code": code, "wall_s": time.perf_counter() - t0, "rss_mb": peak_rss_mb(),
                  "verify": json.loads(out.getvalue()) if code == 0 else None}))
"""

MMAP_CHILD = PEAK_RSS + r"""
import json, sys, time
from safetensors import safe_open
t0 = time.perf_counter()
with safe_open(sys.argv[1], framework="pt") as f:
    for name in f.keys():
        f.get_tensor(name).float().sum()   # read every tensor once, keep none
print(json.dumps({"wall_s": time.perf_counter() - t0, "rss_mb": peak_rss_mb()}))
"""


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") else None


def big_specs(base: dict, n_base: int, n_layers: int) -> list[tuple[str, tuple, np.dtype, str]]:
    """(name in A, shape, dtype, base tensor it copies) with base layer i % n_base as A's layer i."""
    specs = [(k, v.shape, np.float32, k) for k, v in base.items() if _layer_of(k) is None]
    for i in range(n_layers):
        src = i % n_base
        pre = f"model.layers.{src}."
        specs += [(f"model.layers.{i}." + k[len(pre):], v.shape, np.float32, k)
                  for k, v in base.items() if k.startswith(pre)]
    return specs


def _nbytes(spec) -> int:
    return int(np.prod(spec[1], dtype=np.int64)) * 4


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).exists():
            shutil.copyfile(src / name, dst / name)


def build_a(work: Path, base_dir: Path, base: dict, cfg: dict, gib: float) -> tuple[Path, list]:
    from taoke.formats.safetensors_io import save_streaming
    from taoke.files import write_json_atomic

    n_base = cfg["num_hidden_layers"]
    one = big_specs(base, n_base, 1)
    glob_bytes = sum(_nbytes(s) for s in one if _layer_of(s[0]) is None)
    layer_bytes = sum(_nbytes(s) for s in one) - glob_bytes
    n_layers = max(n_base, math.ceil((gib * GIB - glob_bytes) / layer_bytes))
    specs = big_specs(base, n_base, n_layers)
    d = work / f"A-{n_layers}L"
    f = d / "model.safetensors"
    if not f.exists():
        d.mkdir(parents=True, exist_ok=True)
        src = {s[0]: s[3] for s in specs}
        tmp = f.with_suffix(".tmp")
        save_streaming(tmp, [s[:3] for s in specs], lambda n: base[src[n]], {"format": "pt"})
        tmp.replace(f)
        write_json_atomic(d / "config.json", {**cfg, "num_hidden_layers": n_layers})
        _copy_tokenizer(base_dir, d)
    return d, specs


def build_b(work: Path, a_dir: Path, specs: list, base: dict, cfg: dict, noise: float, shard_gib: float) -> Path:
    """Renamed + noisy copy of A, sharded; each tensor's noise is seeded by its position (reproducible)."""
    from taoke.formats.safetensors_io import save_streaming
    from bench.verify_models import RENAMED_ARCH, rename
    from taoke.files import write_json_atomic

    d = work / f"B-{a_dir.name}-renamed-noise{noise:g}"
    index = d / "model.safetensors.index.json"
    if index.exists():
        return d
    d.mkdir(parents=True, exist_ok=True)
    shards, cur, size = [], [], 0
    for s in specs:
        if cur and size + _nbytes(s) > shard_gib * GIB:
            shards.append(cur)
            cur, size = [], 0
        cur.append(s)
        size += _nbytes(s)
    shards.append(cur)
    pos = {s[0]: i for i, s in enumerate(specs)}
    src = {rename(s[0]): s for s in specs}

    def produce(name):
        a_name, shape, _, base_name = src[name]
        w = base[base_name]
        if w.ndim != 2:
            return w
        rng = np.random.default_rng(pos[a_name])
        return w + (noise * float(w.std())) * rng.standard_normal(w.shape, dtype=np.float32)

    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_streaming(d / fname, [(rename(s[0]), s[1], s[2]) for s in shard], produce, {"format": "pt"})
        weight_map.update({rename(s[0]): fname for s in shard})
    write_json_atomic(d / "config.json", {**json.loads((a_dir / "config.json").read_text()), **RENAMED_ARCH})
    _copy_tokenizer(a_dir, d)
    write_json_atomic(index, {"metadata": {"total_size": sum(_nbytes(s) for s in specs)}, "weight_map": weight_map})
    return d


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


def run_child(code: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"child failed ({out.returncode}):\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["process_s"] = time.perf_counter() - t
    return res


def two_largest_mb(*dirs: Path) -> float:
    """The two largest tensors of either model, as float32 (what the readers hand out)."""
    from taoke.formats import open_weights

    sizes = sorted((m.numel * 4 for d in dirs for m in open_weights(str(d)).tensors()), reverse=True)
    return sum(sizes[:2]) / 2 ** 20


def fingerprints_mb(*dirs: Path) -> tuple[int, float]:
    """Matrices verify keeps a fingerprint of (m(m-1)/2 float32 each, in memory for the whole run), and their MB."""
    from taoke.formats import open_weights
    from taoke.provenance.canonical import canonical_view
    from taoke.provenance.verify import SUBSET, _fingerprinted, _residual_subset

    n = 0
    for d in dirs:
        view = canonical_view(open_weights(str(d)))
        n += len(_fingerprinted(view, _residual_subset(view.hidden, SUBSET)))
    return n, n * SUBSET * (SUBSET - 1) // 2 * 4 / 2 ** 20


def mem_total_gib() -> float:
    for line in open("/proc/meminfo"):
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 2 ** 20
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/taoke-verify-big"))
    ap.add_argument("--gib", type=float, default=13.0, help="size of A's float32 file in GiB (B is as large)")
    ap.add_argument("--shard-gib", type=float, default=2.0)
    ap.add_argument("--noise", type=float, default=0.01, help="noise added to B's matrices, x each matrix's std")
    ap.add_argument("--mmap-baseline", action="store_true", help="also stream A through safe_open (mmap)")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    from safetensors.numpy import load_file

    from taoke.provenance.verify import SUBSET

    from bench import verify_models as suite

    args.work.mkdir(parents=True, exist_ok=True)
    need = 2 * args.gib * GIB * 1.02
    free = shutil.disk_usage(args.work).free + sum(dir_bytes(d) for d in args.work.glob("*") if d.is_dir())
    if free < need:
        raise SystemExit(f"{args.work}: {free / GIB:.1f} GiB free, {need / GIB:.1f} needed; lower --gib")
    t = time.perf_counter()
    base_dir = suite.smollm2_hf(args.work)
    base, cfg = load_file(str(base_dir / "model.safetensors")), json.loads((base_dir / "config.json").read_text())
    a_dir, specs = build_a(args.work, base_dir, base, cfg, args.gib)
    b_dir = build_b(args.work, a_dir, specs, base, cfg, args.noise, args.shard_gib)
    del base
    build_s = time.perf_counter() - t
    size_a, size_b = dir_bytes(a_dir), dir_bytes(b_dir)
    n_layers = json.loads((a_dir / "config.json").read_text())["num_hidden_layers"]
    print(f"A {a_dir}: {size_a / GIB:.2f} GiB, {n_layers} layers; B {b_dir}: {size_b / GIB:.2f} GiB in "
          f"{len(list(b_dir.glob('*.safetensors')))} shards; RAM {mem_total_gib():.1f} GiB; ready in {build_s:.0f} s",
          flush=True)
    top2 = two_largest_mb(a_dir, b_dir)
    n_fp, fp_mb = fingerprints_mb(a_dir, b_dir)
    imports = run_child(VERIFY_CHILD, "--imports-only", "-")["rss_mb"]
    r = run_child(VERIFY_CHILD, str(a_dir), str(b_dir))
    v = r["verify"]
    lines = [f"A: SmolLM2-135M layers repeated to {n_layers} layers, one float32 safetensors file of "
             f"{size_a / GIB:.2f} GiB",
             f"B: A renamed (ln1/ln2, attn.wq, transformer.blocks...) + noise {args.noise:g} x std on every matrix, "
             f"{size_b / GIB:.2f} GiB in {len(list(b_dir.glob('*.safetensors')))} shards",
             f"A + B = {(size_a + size_b) / GIB:.2f} GiB on disk; machine RAM {mem_total_gib():.1f} GiB",
             f"`taoke verify A B --json`: verdict {v['verdict']}, p = {v['p_value']:.3g}, relation {v['relation']}, "
             f"{len(v['layers'])} of {n_layers} B layers matched",
             f"wall {r['process_s']:.0f} s for the process ({v['seconds']:.0f} s inside verify)",
             f"peak RSS (VmHWM) {r['rss_mb']:.0f} MB = interpreter + imports {imports:.0f} MB + "
             f"{r['rss_mb'] - imports:.0f} MB; two largest tensors {top2:.0f} MB; fingerprints kept for the "
             f"test: {n_fp} matrices x {SUBSET * (SUBSET - 1) // 2} floats = {fp_mb:.0f} MB"]
    if args.mmap_baseline:
        m = run_child(MMAP_CHILD, str(a_dir / "model.safetensors"))
        lines.append(f"baseline: reading A once through safetensors' safe_open (mmap) peaks at {m['rss_mb']:.0f} MB "
                     f"RSS ({m['wall_s']:.0f} s)")
    text = "\n".join(f"- {x}" for x in lines) + "\n"
    print("\n" + text)
    if not args.no_append:
        from bench.verify_suite import machine

        cmd = " ".join(["bench/verify_big.py"] + sys.argv[1:])
        section = (f"\n## verify on models larger than RAM — {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}\n\n"
                   f"Command: `.venv/bin/python {cmd}`  \nMachine: {machine()}\n\n" + text)
        record(section)


if __name__ == "__main__":
    main()
