"""Helpers for the server tests: a tiny SFT run derived through the real CLI, and real servers on loopback."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.conftest import ROOT, run_cli

KEYS = {"alice": "sk-alice-" + "a1" * 20, "bob": "sk-bob-" + "b2" * 20}
SLOW_KEY = "sk-carl-" + "c4" * 20          # one request a minute


def tiny_sft_run(root: Path) -> Path:
    """An SFT run (LoRA, merged) of a 2-layer random LLaMA with SmolLM2's tokenizer and chat template."""
    from tests.lm_helpers import smollm_tokenizer, tiny_llama

    base = root / "tiny-base"
    tiny_llama().save_pretrained(base)
    smollm_tokenizer().save_pretrained(base)
    out = root / "tiny-sft"
    run_cli("derive", "recipes/sft-lora.yaml", "--out", out, "--quiet", "--set", f"base=file:{base}",
            "--set", "train.max_steps=2", "--set", "data.max_rows=40", "--set", "lm.gen_prompts=2",
            "--set", "lm.max_new_tokens=8", "--set", "lm.seq_len=64")
    return out


def write_keys(path: Path) -> Path:
    path.write_text("".join(f"{k} {v}\n" for k, v in KEYS.items()) + f"carl {SLOW_KEY} 1\n")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body=None, key: str | None = None, headers: dict | None = None, timeout=60):
    """(status, parsed JSON or text, headers) of a raw HTTP request; `body` bytes are sent as they are."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json",
                                                                          **(headers or {})})
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw, hdrs = r.status, r.read(), r.headers
    except urllib.error.HTTPError as e:
        status, raw, hdrs = e.code, e.read(), e.headers
    try:
        return status, json.loads(raw), hdrs
    except ValueError:
        return status, raw.decode("utf-8", "replace"), hdrs


class Server:
    """`taoke serve ...` in a subprocess on a free loopback port; stops itself (SIGTERM) at the end."""

    def __init__(self, *args, env: dict | None = None, log: Path | None = None, ready_s: float = 180):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log, "w") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen([sys.executable, "-m", "taoke.cli", "serve", *map(str, args),
                                      "--port", str(self.port)], cwd=ROOT, stdout=self.log, stderr=self.log,
                                     env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
        end = time.monotonic() + ready_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode} before it was ready")
            try:
                if http("GET", self.url + "/readyz", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise AssertionError("server not ready in time")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self, timeout: float = 400) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log is not subprocess.DEVNULL:
            self.log.close()
        return self.proc.returncode


class ThreadServer:
    """A real uvicorn server for an app built in this process, on a free loopback port, in a thread."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        end = time.monotonic() + 60
        while not self.server.started and time.monotonic() < end:
            time.sleep(0.05)
        assert self.server.started, "in-process server did not start"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def metric(url: str, name: str, key: str | None = None) -> float:
    """The value of an unlabelled metric (or the sum of a labelled one) from /metrics."""
    status, text, _ = http("GET", url + "/metrics", key=key)
    assert status == 200
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))
