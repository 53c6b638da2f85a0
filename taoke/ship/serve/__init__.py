"""`taoke serve`: a derived model behind an OpenAI-compatible HTTP API.

    build_app(ref, options) -> FastAPI      the app for a run, model folder or causal-LM reference
    serve(ref, options)                     check the binding, build the app and run uvicorn until SIGTERM

Causal LMs are served by taoke's continuous-batching engine (engine.py), or by vLLM (`engine="vllm"`) or
any running OpenAI-compatible server (`upstream=URL`) behind the same keys, limits and metrics
(upstream.py); classifiers, regressors and encoders by classify.py.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI

from taoke.errors import ModelError, RecipeError
from taoke.inference import load, locate
from taoke.inference.language import LanguagePredictor, load_chat_model
from taoke.lm.load import plain_model_dir
from taoke.formats.sealed import resolve_key
from taoke.ship.serve.app import ServeSettings, configure_audit, create_app, run
from taoke.ship.serve.auth import KeyRing, read_keys
from taoke.ship.serve.classify import ClassifierService
from taoke.ship.serve.language import LanguageService
from taoke.ship.serve.metrics import ServeMetrics
from taoke.ship.serve.upstream import UpstreamService, launch_vllm


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: Path | None = None
    rate_limit: float | None = None          # requests per minute per key (the keys file may set its own)
    model_name: str | None = None
    engine: str = "taoke"                   # taoke | vllm
    upstream: str | None = None             # an OpenAI-compatible server to put taoke in front of
    upstream_model: str | None = None
    vllm_args: list[str] = field(default_factory=list)
    key_file: Path | None = None            # the seal key of a sealed run
    max_batch: int = 32
    max_queue: int = 64
    max_model_len: int | None = None
    prefix_cache_mb: int = 256              # keys/values of recent prompts kept for reuse (0: off)
    max_tokens: int = 1024
    max_body_bytes: int = 1 << 20
    timeout_s: float = 300.0
    drain_s: float = 30.0
    cors_origins: list[str] = field(default_factory=list)
    audit_log: str | None = None
    audit_prompts: bool = False
    device: str | None = None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False    # a host name other than localhost may resolve to anything


def model_id_for(ref: str, name: str | None) -> str:
    if name:
        return name
    p = Path(ref)
    if p.exists():
        return (p.parent.name if p.name == "model" and (p / "taoke.json").is_file() else p.resolve().name)
    return ref


def build_app(ref: str, opts: ServeOptions) -> FastAPI:
    """The app serving `ref` as `opts` say (loads the model; raises TaokeError on anything the user can fix)."""
    if opts.engine not in ("taoke", "vllm"):
        raise RecipeError(f"--engine {opts.engine}: choose taoke or vllm")
    keys = KeyRing(read_keys(opts.api_keys), opts.rate_limit) if opts.api_keys else None
    if keys is None and not is_loopback(opts.host):
        raise RecipeError(f"--host {opts.host} is reachable from other machines: give --api-keys FILE "
                          "(or bind 127.0.0.1)")
    settings = ServeSettings(model_id=model_id_for(ref, opts.model_name), keys=keys,
                             max_body_bytes=opts.max_body_bytes, max_tokens_cap=opts.max_tokens,
                             request_timeout_s=opts.timeout_s, cors_origins=opts.cors_origins,
                             audit_prompts=opts.audit_prompts, drain_s=opts.drain_s)
    metrics = ServeMetrics(queue_capacity=opts.max_queue)
    return create_app(_service(ref, opts, settings, metrics), settings, metrics)


def _service(ref: str, opts: ServeOptions, settings: ServeSettings, metrics: ServeMetrics):
    if opts.upstream:
        return UpstreamService(opts.upstream, settings, metrics, upstream_model=opts.upstream_model)
    if opts.engine == "vllm":
        model_dir = _vllm_model_dir(ref)
        url, process = launch_vllm(model_dir, settings.model_id, opts.vllm_args)
        return UpstreamService(url, settings, metrics, process=process)
    p = Path(ref)
    if not (p.is_dir() and ((p / "taoke.json").is_file() or (p / "recipe.yaml").is_file())):
        model, tokenizer = load_chat_model(ref, opts.device)     # any causal-LM reference (library, HF dir, GGUF)
        return LanguageService(model, tokenizer, settings, metrics, max_batch=opts.max_batch,
                               max_queue=opts.max_queue, max_model_len=opts.max_model_len,
                               prefix_cache_mb=opts.prefix_cache_mb)
    predictor = load(ref, device=opts.device, key=resolve_key(opts.key_file))
    if isinstance(predictor, LanguagePredictor):
        return LanguageService(predictor.model, predictor.tokenizer, settings, metrics, max_batch=opts.max_batch,
                               max_queue=opts.max_queue, max_model_len=opts.max_model_len,
                               prefix_cache_mb=opts.prefix_cache_mb)
    return ClassifierService(predictor, settings, metrics, max_batch=opts.max_batch)


def _vllm_model_dir(ref: str) -> Path:
    """The merged HF directory vLLM loads: vLLM reads weights from disk, so a sealed run cannot be served by it."""
    try:
        model_dir, run = locate(ref)
    except ModelError:
        return plain_model_dir(ref)
    if run is not None:
        run.check_model_files()
        if run.sealed:
            raise ModelError(f"{run.path}: the run is sealed and vLLM reads weights from disk; serve it with "
                             "taoke's engine (--engine taoke), which decrypts in memory only")
    return plain_model_dir(model_dir)


def serve(ref: str, opts: ServeOptions) -> None:
    configure_audit(opts.audit_log)
    app = build_app(ref, opts)
    run(app, opts.host, opts.port, opts.drain_s)

