"""Another OpenAI-compatible server behind taoke's keys, limits, metrics and audit log.

`--engine vllm` launches vLLM's OpenAI server (`python -m vllm.entrypoints.openai.api_server`) on the run's
merged model, bound to loopback on a free port, and proxies to it; `--upstream URL` proxies to a server
that is already running. Requests are validated and capped here exactly as for taoke's own engine, then
forwarded (with the upstream's model name); responses and SSE streams pass through byte for byte, and
token counts are read from them for the metrics and the audit line.

The proxy is tested against a real upstream (a second taoke server) in tests/test_serve.py. vLLM itself
needs a GPU and is not installed on the machines taoke is developed on: the launch path is untested there.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from taoke.errors import ModelError
from taoke.ship.serve.app import ServeSettings, check_model, read_body
from taoke.ship.serve.errors import ApiError
from taoke.ship.serve.schemas import ChatRequest, CompletionRequest, GenerationRequest

UPSTREAM_KEY_ENV = "TAOKE_UPSTREAM_API_KEY"
HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive", "content-encoding", "server",
               "date"}


class UpstreamService:
    def __init__(self, base_url: str, settings: ServeSettings, metrics, upstream_model: str | None = None,
                 process: subprocess.Popen | None = None):
        self.base_url = base_url.rstrip("/")
        self.settings = settings
        self.metrics = metrics
        self.upstream_model = upstream_model or settings.model_id
        self.process = process
        self.client: httpx.AsyncClient | None = None
        self.created = int(time.time())

    async def start(self) -> None:
        timeout = httpx.Timeout(self.settings.request_timeout_s, connect=10.0)
        key = os.environ.get(UPSTREAM_KEY_ENV)   # the upstream's own key, if it wants one
        self.client = httpx.AsyncClient(base_url=self.base_url, timeout=timeout,
                                        headers={"Authorization": f"Bearer {key}"} if key else None,
                                        limits=httpx.Limits(max_connections=256, max_keepalive_connections=64))

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.aclose()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def ready(self) -> bool:
        return self.client is not None and (self.process is None or self.process.poll() is None)

    def register(self, app: FastAPI) -> None:
        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": self.settings.model_id, "object": "model",
                                                "created": self.created, "owned_by": "taoke"}]}

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            return await self._forward(request, "/v1/chat/completions", ChatRequest)

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await self._forward(request, "/v1/completions", CompletionRequest)

    async def _forward(self, request: Request, path: str, schema):
        body: GenerationRequest = await read_body(request, schema)
        check_model(self.settings, body.model)
        body.check_supported()
        wanted = body.requested_max_tokens
        cap = self.settings.max_tokens_cap
        if wanted is not None and not 1 <= wanted <= cap:
            raise ApiError(400, f"max_tokens must be between 1 and {cap}, got {wanted}", param="max_tokens")
        payload = json.loads(await request.body())
        payload["model"] = self.upstream_model
        if wanted is None:
            payload["max_tokens"] = cap        # the cap holds for requests that leave it open too
        audit = request.state.audit
        audit["model"] = body.model
        if self.settings.audit_prompts:
            audit["prompt"] = body.messages[-1].text() if isinstance(body, ChatRequest) else body.prompt_text
        started = time.monotonic()
        upstream = self.client.build_request("POST", path, json=payload)
        try:
            response = await self.client.send(upstream, stream=True)
        except httpx.HTTPError as e:
            raise ApiError(502, f"upstream server unreachable ({e.__class__.__name__})") from None
        headers = {k: v for k, v in response.headers.items() if k.lower() not in HOP_HEADERS}
        if not body.stream or response.status_code != 200:
            data = await response.aread()
            await response.aclose()
            self._count(audit, data)
            return Response(data, status_code=response.status_code, headers=headers,
                            media_type=response.headers.get("content-type"))
        return StreamingResponse(self._relay(response, audit, started), status_code=200, headers=headers,
                                 media_type="text/event-stream")

    async def _relay(self, response: httpx.Response, audit: dict, started: float):
        first = True
        pieces = 0
        try:
            async for line in response.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    if first:
                        self.metrics.ttft.observe(time.monotonic() - started)
                        first = False
                    pieces += self._count_chunk(audit, line[6:])
                yield line + "\n"
        finally:
            await response.aclose()
            audit.setdefault("completion_tokens", pieces)

    def _count(self, audit: dict, data: bytes) -> None:
        """Token counts of a whole (non-streamed) response, from its usage."""
        try:
            usage = json.loads(data).get("usage") or {}
        except (ValueError, AttributeError):
            return
        self._usage(audit, usage)
        self.metrics.tokens(int(usage.get("completion_tokens") or 0))

    def _count_chunk(self, audit: dict, text: str) -> int:
        """Content chunks in a stream (one token each in vLLM's and taoke's streams); reads usage if sent."""
        try:
            chunk = json.loads(text)
        except ValueError:
            return 0
        if chunk.get("usage"):
            self._usage(audit, chunk["usage"])
        n = sum(1 for c in chunk.get("choices") or [] if (c.get("delta") or {}).get("content") or c.get("text"))
        self.metrics.tokens(n)
        return n

    def _usage(self, audit: dict, usage: dict) -> None:
        if "prompt_tokens" in usage:
            audit["prompt_tokens"] = usage["prompt_tokens"]
            self.metrics.prompt_tokens.inc(usage["prompt_tokens"])
        if "completion_tokens" in usage:
            audit["completion_tokens"] = usage["completion_tokens"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_command(model_dir: Path, served_name: str, port: int, extra: list[str]) -> list[str]:
    """`vllm serve` on loopback only: taoke's server in front is the one clients reach."""
    script = Path(sys.executable).parent / "vllm"
    return [str(script) if script.is_file() else (shutil.which("vllm") or "vllm"), "serve", str(model_dir),
            "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port), *extra]


def launch_vllm(model_dir: Path, served_name: str, extra: list[str], wait_s: float = 900) -> tuple[str, subprocess.Popen]:
    """Start vLLM on the model and wait until its /health answers; (base URL, process)."""
    if importlib.util.find_spec("vllm") is None:
        raise ModelError("--engine vllm needs vLLM on a GPU machine: pip install vllm (see docs/serve.md)")
    if not (model_dir / "config.json").is_file():
        raise ModelError(f"{model_dir}: vLLM serves a merged model (config.json + weights); derive with "
                         "adapt.merge: true")
    port = free_port()
    proc = subprocess.Popen(vllm_command(model_dir, served_name, port, extra), env={**os.environ})
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + wait_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise ModelError(f"vLLM exited with code {proc.returncode} while loading {model_dir}; see its log above")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return url, proc
        except httpx.HTTPError:
            pass
        time.sleep(2)
    proc.terminate()
    raise ModelError(f"vLLM did not become ready within {wait_s:.0f} s")
