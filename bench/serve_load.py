"""Serving under load: `taoke serve` vs `transformers serve` (default, and --continuous-batching) on one SFT run.

All servers serve the same merged model directory (the run's model/) in fp32 on the CPU and run side by side
(idle ones use no CPU); the load generator sends streaming chat requests from N concurrent clients on
loopback (fixed prompts, greedy, max_tokens 64), one request per client per level, and measures requests/s,
output tokens/s (outputs re-tokenized with the model's tokenizer, the same count for every server), p50/p95
latency, p50 time to first token and the server's peak RSS. Every output is compared with the model's own
unbatched greedy generation (`model.generate`, one prompt at a time). Levels and servers are interleaved
(each repeat runs every server at every level, in rotated order) because the machine's speed drifts; the
table reports medians with the min-max spread and the ratios to each peer.

Two data shapes: short prompts (a dialog opening, ~35 tokens with the chat template) and long prompts (the
same question after ~450 tokens of prior conversation). The long prompts all resend one history, as the turns of
a conversation or users of one system prompt do: taoke serve reuses its keys and values (prefix cache) where the
other servers prefill it again. `--servers taoke-noprefix` adds taoke with the prefix cache off, which is what
long prompts that share nothing get. `--servers taoke@REV` (any git revision, e.g. `taoke@HEAD~1`) adds taoke as
it was at that commit, checked out in a git worktree under --logs, so a change is measured against the code before
it in the same interleaved run.

    .venv/bin/python bench/serve_load.py --run runs/sft-lora --clients 1 8 32 --repeats 3
    .venv/bin/python bench/serve_load.py --run runs/sft-lora --clients 1 8 --repeats 1 --shapes short --no-record
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from results import record  # noqa: E402
DATA = ROOT / "data" / "chatterbot" / "dialogs.jsonl"


# ---------------------------------------------------------------------------------------------- prompts

def prompts(shape: str, n: int) -> list[list[dict]]:
    """n distinct chat prompts: short (one question) or long (the question after a long prior conversation)."""
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines()]
    questions, seen = [], set()
    for r in rows:
        q = r["messages"][0]["content"]
        if q not in seen:
            seen.add(q)
            questions.append(q)
    picked = questions[::max(1, len(questions) // n)][:n]
    if shape == "short":
        return [[{"role": "user", "content": q}] for q in picked]
    history = []
    for r in rows[200:]:
        history += r["messages"]
        if sum(len(m["content"]) for m in history) > 1800:
            break
    return [history + [{"role": "user", "content": q}] for q in picked]


def references(run: Path, shapes: list[str], n: int, max_tokens: int) -> tuple[dict, object]:
    """{(shape, i): greedy text of model.generate alone}, and the tokenizer."""
    import torch

    import taoke

    pred = taoke.load(run)
    model, tok = pred.model, pred.tokenizer
    out = {}
    for shape in shapes:
        for i, msgs in enumerate(prompts(shape, n)):
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            x = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                gen = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens,
                                     do_sample=False, pad_token_id=tok.pad_token_id)
            out[(shape, i)] = tok.decode(gen[0, x.shape[1]:], skip_special_tokens=True)
    return out, tok


# ---------------------------------------------------------------------------------------------- servers

def thread_env(threads: int | None) -> dict:
    """The same intra-op thread count for every server (OpenMP/MKL read these at start)."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, name: str, cmd: list[str], model_id: str, port: int, log: Path, threads: int | None,
                 cwd: Path = ROOT):
        self.name, self.model_id, self.port = name, model_id, port
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd, cwd=cwd, stdout=self.log, stderr=self.log,
                                     env={**os.environ, "HF_HUB_OFFLINE": "1", **thread_env(threads)})
        self.peak_rss = 0

    def wait_ready(self, path: str, timeout: float = 600) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}); see {self.log.name}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s")

    def rss(self) -> int:
        try:
            p = psutil.Process(self.proc.pid)
            return p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
        except psutil.Error:
            return 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def checkout(rev: str, logs: Path) -> Path:
    """A git worktree of this repository at `rev` (made once, reused), for serving taoke as it was then."""
    commit = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=ROOT, capture_output=True,
                            text=True)
    if commit.returncode:
        raise SystemExit(f"taoke@{rev}: not a git revision of {ROOT} ({commit.stderr.strip()})")
    tree = logs / f"taoke-{commit.stdout.strip()[:12]}"
    if not (tree / "taoke" / "cli.py").exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), commit.stdout.strip()], cwd=ROOT, check=True,
                       capture_output=True)
    return tree


def start_servers(names: list[str], run: Path, args, logs: Path) -> list[Server]:
    model_dir = str((run / "model").resolve())
    py = sys.executable
    hf = [str(Path(py).parent / "transformers"), "serve", model_dir, "--device", "cpu", "--dtype", "float32",
          "--host", "127.0.0.1"]
    servers = []
    for name in names:
        port = free_port()
        if name in ("taoke", "taoke-noprefix") or name.startswith("taoke@"):
            # python -m runs the taoke package of its working directory: this checkout, or a worktree at REV
            cwd = checkout(name.split("@", 1)[1], logs) if "@" in name else ROOT
            cmd = [py, "-m", "taoke.cli", "serve", str(run.resolve()), "--port", str(port), "--model-name", "model",
                   "--max-batch", str(max(args.clients)), "--max-queue", "256", "--timeout", "3600",
                   "--audit-log", os.devnull] + (["--prefix-cache-mb", "0"] if name == "taoke-noprefix" else [])
            log = logs / f"{name.replace('@', '-at-').replace('/', '_')}.log"
            servers.append(Server(name, cmd, "model", port, log, args.threads, cwd))
        elif name == "hf":
            servers.append(Server(name, hf + ["--port", str(port)], model_dir, port, logs / "hf.log", args.threads))
        elif name == "hf-cb":
            # transformers sizes its paged cache from free memory (it took 13.7 GB here before the OOM killer
            # stopped it); give it room for every client's prompt + completion instead
            blocks = max(64, (max(args.clients) * (600 + args.max_tokens)) // 32 + 16)
            cmd = hf + ["--port", str(port), "--continuous-batching", "--cb-block-size", "32",
                        "--cb-num-blocks", str(blocks)]
            servers.append(Server(name, cmd, model_dir, port, logs / "hf-cb.log", args.threads))
        else:
            raise SystemExit(f"unknown server {name}")
    for s in servers:
        s.wait_ready("/readyz" if s.name.startswith("taoke") else "/v1/models")
    return servers


# ---------------------------------------------------------------------------------------------- load

async def one_request(client: httpx.AsyncClient, server: Server, messages, max_tokens: int) -> dict:
    body = {"model": server.model_id, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "stream": True}
    started = time.perf_counter()
    first, text = None, []
    async with client.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:                 # a stream that ends in an error event is a failed request
                return {"error": json.dumps(chunk["error"])[:200]}
            for c in chunk.get("choices") or []:
                piece = (c.get("delta") or {}).get("content")
                if piece:
                    first = first or time.perf_counter() - started
                    text.append(piece)
    return {"latency": time.perf_counter() - started, "ttft": first, "text": "".join(text)}


async def level(server: Server, shape: str, clients: int, prompt_list, max_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0), limits=limits) as client:
        started = time.perf_counter()
        results = await asyncio.gather(*[one_request(client, server, prompt_list[i % len(prompt_list)], max_tokens)
                                         for i in range(clients)])
        wall = time.perf_counter() - started
    for i, r in enumerate(results):
        r["prompt"] = i % len(prompt_list)
    return {"wall": wall, "results": results}


def run_level(server: Server, shape: str, clients: int, prompt_list, max_tokens: int) -> dict:
    peak = [server.rss()]
    stop = threading.Event()

    def sample():
        while not stop.wait(0.25):
            peak.append(server.rss())
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        out = asyncio.run(level(server, shape, clients, prompt_list, max_tokens))
    finally:
        stop.set()
        t.join()
    out["peak_rss"] = max(peak)
    return out


# ---------------------------------------------------------------------------------------------- report

def summarize(out: dict, refs: dict, shape: str, tok) -> dict:
    ok = [r for r in out["results"] if "error" not in r]
    tokens = sum(len(tok(r["text"], add_special_tokens=False)["input_ids"]) for r in ok)
    lat = sorted(r["latency"] for r in ok)
    ttft = sorted(r["ttft"] for r in ok if r["ttft"] is not None)
    same = sum(r["text"] == refs[(shape, r["prompt"])] for r in ok)
    return {"rps": len(ok) / out["wall"], "tps": tokens / out["wall"], "p50": pct(lat, 50), "p95": pct(lat, 95),
            "ttft50": pct(ttft, 50), "rss_mb": out["peak_rss"] / 2**20, "same": same, "n": len(out["results"]),
            "errors": len(out["results"]) - len(ok)}


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def table(runs: dict, args) -> list[str]:
    med = statistics.median
    lines = ["| shape | clients | server | req/s | output tok/s (min-max) | vs hf | vs hf-cb | p50 latency s | "
             "p95 latency s | p50 TTFT s | peak RSS MB | greedy = unbatched |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for shape in args.shapes:
        for clients in args.clients:
            tps = {s: [r["tps"] for r in runs.get((shape, clients, s), [])] for s in args.servers}
            for s in args.servers:
                rs = runs.get((shape, clients, s), [])
                if not rs:
                    continue
                ratio = {p: (f"{med(tps[s]) / med(tps[p]):.2f}x" if tps.get(p) else "not run")
                         for p in ("hf", "hf-cb")}
                errors = sum(r["errors"] for r in rs)
                lines.append(
                    f"| {shape} | {clients} | {s} | {med(r['rps'] for r in rs):.3f} | {med(tps[s]):.1f} "
                    f"({min(tps[s]):.1f}-{max(tps[s]):.1f}) | {ratio['hf']} | {ratio['hf-cb']} | "
                    f"{med(r['p50'] for r in rs):.2f} | {med(r['p95'] for r in rs):.2f} | "
                    f"{med(r['ttft50'] for r in rs):.2f} | {max(r['rss_mb'] for r in rs):.0f} | "
                    f"{sum(r['same'] for r in rs)}/{sum(r['n'] for r in rs)}"
                    + (f" ({errors} failed)" if errors else "") + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="an SFT run directory (merged model)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--shapes", nargs="+", default=["short", "long"], choices=["short", "long"])
    ap.add_argument("--servers", nargs="+", default=["taoke", "hf", "hf-cb"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--distinct-prompts", type=int, default=8, help="client i sends prompt i mod this")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads of every server (OMP_NUM_THREADS); "
                    "default: each library's own choice")
    ap.add_argument("--logs", type=Path, default=Path("/tmp/taoke-serve-bench"))
    ap.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = ap.parse_args()
    args.logs.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    print("reference generations (model.generate, one prompt at a time) ...", flush=True)
    refs, tok = references(args.run, args.shapes, args.distinct_prompts, args.max_tokens)
    prompt_lists = {shape: prompts(shape, args.distinct_prompts) for shape in args.shapes}
    servers = start_servers(args.servers, args.run, args, args.logs)
    runs: dict = {}
    signal.signal(signal.SIGTERM, signal.default_int_handler)   # a stopped bench still reports what it measured
    cut, rep = None, 0
    try:
        for s in servers:       # warm-up (first-request allocations, lazy init) outside the measurements
            run_level(s, args.shapes[0], 1, prompt_lists[args.shapes[0]], 8)
        for rep in range(args.repeats):
            for shape in args.shapes:
                for clients in args.clients:
                    order = servers[rep % len(servers):] + servers[:rep % len(servers)]
                    for s in order:
                        out = run_level(s, shape, clients, prompt_lists[shape], args.max_tokens)
                        row = summarize(out, refs, shape, tok)
                        runs.setdefault((shape, clients, s.name), []).append(row)
                        print(f"repeat {rep + 1} {shape:5s} {clients:3d} clients {s.name:6s} "
                              f"{row['tps']:7.1f} tok/s  p50 {row['p50']:.2f}s  same {row['same']}/{row['n']}",
                              flush=True)
    except KeyboardInterrupt:
        cut = f"stopped during repeat {rep + 1}; the table holds the levels measured until then"
    finally:
        for s in servers:
            s.stop()
    write_report(runs, args, load_before, cut)


def write_report(runs: dict, args, load_before, cut: str | None = None) -> None:
    import torch
    import transformers

    from taoke.hardware import cpu_flags, cpu_model

    flags, cpu = cpu_flags(), cpu_model()
    load_after = os.getloadavg()
    head = (f"\n## serve_load — {datetime.datetime.now().isoformat(timespec='minutes')}\n\n"
            f"Run {args.run.name} (SmolLM2-135M SFT, merged, fp32, CPU). Streaming chat requests, greedy, "
            f"max_tokens {args.max_tokens}, one request per client per level, {args.distinct_prompts} distinct "
            f"prompts per shape, {args.repeats} interleaved repeat(s) (medians; tok/s spread min-max), "
            f"intra-op threads per server: {args.threads or 'library default'}. "
            f"Servers: {', '.join(args.servers)} (transformers serve --device cpu --dtype float32; hf-cb adds "
            f"--continuous-batching with a paged cache sized for the clients; taoke-noprefix: taoke serve "
            f"--prefix-cache-mb 0; taoke@REV: taoke serve as of git revision REV). The long prompts share one ~450-token history. Machine: {os.cpu_count()} cores, {cpu}, "
            f"AVX512-BF16: {'avx512_bf16' in flags}, AMX: {'amx_bf16' in flags}, AVX2: {'avx2' in flags}; "
            f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after (shared machine). "
            f"torch {torch.__version__}, transformers {transformers.__version__}. "
            "'greedy = unbatched': outputs identical to model.generate on the prompt alone."
            + (f" **Partial: {cut}.**" if cut else "") + "\n\n")
    text = head + "\n".join(table(runs, args)) + "\n"
    print(text)
    if not args.no_record:
        record(text)


if __name__ == "__main__":
    main()
