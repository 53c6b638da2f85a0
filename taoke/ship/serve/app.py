"""The HTTP server: a FastAPI app around one model service, with the guard every request passes through.

    Guard (pure ASGI, outermost but CORS): request id, API key (constant-time, per-key rate limit), body
    size cap, then after the response: Prometheus request metrics and one audit log line (key id, route,
    status, tokens; never the key, and the prompt only with --audit-prompts).
    Routes: /healthz, /readyz, /metrics, and the service's own (/v1/... from language.py, classify.py or
    upstream.py). Every error is an OpenAI-style JSON body.

`run(app, host, port)` runs uvicorn; SIGTERM stops accepting connections, lets in-flight requests finish for
up to `drain_s` seconds, then exits 0.
"""

from __future__ import annotations

import json
import logging
import secrets
import signal
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from taoke.ship.serve.auth import KeyRing, bearer, retry_seconds
from taoke.ship.serve.errors import ApiError
from taoke.ship.serve.metrics import ServeMetrics
from taoke.ship.serve.schemas import Unsupported, first_error

PUBLIC_PATHS = {"/healthz", "/readyz"}
ROUTES = {"/healthz", "/readyz", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions",
          "/v1/classify", "/v1/embeddings"}
audit_log = logging.getLogger("taoke.audit")


@dataclass
class ServeSettings:
    model_id: str
    keys: KeyRing | None = None
    max_body_bytes: int = 1 << 20
    max_tokens_cap: int = 1024
    request_timeout_s: float = 300.0
    cors_origins: list[str] = field(default_factory=list)
    audit_prompts: bool = False
    drain_s: float = 30.0


async def read_body(request: Request, schema):
    """The request's JSON body validated against `schema`; ApiError 400 naming the field otherwise."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON ({e.__class__.__name__}: {str(e)[:100]})") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:
        body = schema.model_validate(data)
    except ValidationError as e:
        param, message = first_error(e)
        raise ApiError(400, message, param=param) from None
    return body


def check_model(settings: ServeSettings, requested: str) -> None:
    """The model named in a request must be the one served (it is a name, never a path)."""
    if requested != settings.model_id:
        shown = requested if len(requested) <= 80 else requested[:80] + "..."
        raise ApiError(404, f"model '{shown}' does not exist; this server serves '{settings.model_id}'",
                       param="model", code="model_not_found")


class Guard:
    """Pure ASGI middleware: identity, limits, metrics and audit for every HTTP request."""

    def __init__(self, app, settings: ServeSettings, metrics: ServeMetrics):
        self.app, self.settings, self.metrics = app, settings, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        path = scope["path"]
        request_id = secrets.token_hex(8)
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        audit = state["audit"] = {}
        status = [500]

        async def send_tracked(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": list(message.get("headers", [])) +
                           [(b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            problem, key_id, replay = await self._admit(scope, receive)
            audit["key_id"] = key_id
            if problem is not None:
                await problem.response()(scope, receive, send_tracked)
            else:
                await self.app(scope, replay, send_tracked)
        finally:
            seconds = time.perf_counter() - started
            route = path if path in ROUTES else "other"
            self.metrics.request(route, status[0], seconds)
            self._audit(scope, request_id, route, status[0], seconds, audit)

    async def _admit(self, scope, receive):
        """(error or None, key id, receive that replays the body) for a request."""
        key_id = None
        if self.settings.keys is not None and scope["path"] not in PUBLIC_PATHS and scope["method"] != "OPTIONS":
            headers = dict(scope.get("headers") or [])
            presented = bearer(headers.get(b"authorization", b"").decode("latin-1"))
            if presented is None:
                return ApiError(401, "missing API key: send 'Authorization: Bearer KEY'", code="invalid_api_key"), \
                    None, receive
            key = self.settings.keys.identify(presented)
            if key is None:
                return ApiError(401, "invalid API key", code="invalid_api_key"), None, receive
            key_id = key.id
            wait = self.settings.keys.admit(key)
            if wait > 0:
                return ApiError(429, f"rate limit of key '{key.id}' reached", code="rate_limit_exceeded",
                                headers={"Retry-After": str(retry_seconds(wait))}), key_id, receive
        body, problem = await self._read_body(scope, receive)
        if problem is not None:
            return problem, key_id, receive
        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()      # afterwards: the real channel (http.disconnect when the client leaves)

        return None, key_id, replay

    async def _read_body(self, scope, receive) -> tuple[bytes, ApiError | None]:
        cap = self.settings.max_body_bytes
        too_big = ApiError(413, f"request body is larger than this server's limit of {cap} bytes")
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                if int(declared) > cap:
                    return b"", too_big
            except ValueError:
                return b"", ApiError(400, "invalid Content-Length header")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > cap:
                return b"", too_big
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks), None

    def _audit(self, scope, request_id, route, status, seconds, audit: dict) -> None:
        client = scope.get("client")
        line = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "request_id": request_id,
                "key_id": audit.get("key_id"), "client": client[0] if client else None, "method": scope["method"],
                "route": route, "status": status, "duration_ms": round(seconds * 1000, 1)}
        for k in ("model", "prompt_tokens", "completion_tokens", "inputs", "finish_reason", "prompt"):
            if k in audit:
                line[k] = audit[k]
        audit_log.info(json.dumps(line, ensure_ascii=False))


def create_app(service, settings: ServeSettings, metrics: ServeMetrics) -> FastAPI:
    """The app for one model service (it registers its /v1 routes and owns start/stop of its engine)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        app.state.ready = True
        try:
            yield
        finally:
            app.state.ready = False
            await service.stop()

    app = FastAPI(title="taoke serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ready = False
    app.state.draining = False

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return e.response()

    @app.exception_handler(Unsupported)
    async def unsupported(request: Request, e: Unsupported):
        return ApiError(400, str(e), param=e.param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        message = "no such route" if e.status_code == 404 else str(e.detail)
        return ApiError(e.status_code, message).response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        return ApiError(400, str(e.errors()[0].get("msg", "invalid request"))).response()

    @app.exception_handler(Exception)
    async def crashed(request: Request, e: Exception):
        logging.getLogger("taoke.serve").exception("request %s failed", request.state.request_id)
        return ApiError(500, f"internal error ({e.__class__.__name__}); see the server log").response()

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if app.state.ready and not app.state.draining and service.ready():
            return {"status": "ready", "model": settings.model_id}
        return JSONResponse({"status": "draining" if app.state.draining else "starting"}, status_code=503)

    @app.get("/metrics")
    async def prometheus():
        data, content_type = metrics.exposition()
        return Response(data, media_type=content_type)

    service.register(app)
    app.add_middleware(Guard, settings=settings, metrics=metrics)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    return app


class DrainingServer(uvicorn.Server):
    """uvicorn's server, telling the app it is draining (readyz 503) as soon as a shutdown signal arrives."""

    def __init__(self, config: uvicorn.Config, app: FastAPI):
        super().__init__(config)
        self.taoke_app = app

    def handle_exit(self, sig, frame) -> None:
        self.taoke_app.state.draining = True
        super().handle_exit(sig, frame)


def configure_audit(path: str | None) -> None:
    """Audit lines go to stderr, or appended to a file."""
    audit_log.setLevel(logging.INFO)
    audit_log.propagate = False
    audit_log.handlers.clear()
    handler = logging.FileHandler(path, encoding="utf-8") if path else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    audit_log.addHandler(handler)


def run(app: FastAPI, host: str, port: int, drain_s: float, log_level: str = "warning") -> None:
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=drain_s,
                            server_header=False, date_header=True, access_log=False)
    # uvicorn re-raises SIGTERM to the handler it found once its graceful shutdown is done; with Python's default
    # there, a clean drain would end as "killed by SIGTERM". A drained server exits 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    DrainingServer(config, app).run()
