"""CLI commands for shipping: serve, seal, unseal. `register(app)` adds them."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from taoke.errors import ModelError
from taoke.formats.sealed import new_key, resolve_key

# the serving and sealing modules are imported in the commands' bodies: the other commands need not load them


def _key(key_file: Optional[Path], create: bool = False) -> bytes:
    if create:
        if key_file is None:
            raise ModelError("--new-key needs --key-file K: the file the new key is written to")
        key = new_key(key_file)
        Console(stderr=True).print(f"wrote a new key to {key_file} (keep it safe: without it the run cannot be opened)")
        return key
    key = resolve_key(key_file)
    if key is None:
        raise ModelError("give the key with --key-file K or the TAOKE_SEAL_KEY environment variable")
    return key


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve_cmd(
        model: str = typer.Argument(..., help="run directory, model/ folder, or any causal-LM reference"),
        host: str = typer.Option("127.0.0.1", "--host", help="address to bind; anything but loopback needs --api-keys"),
        port: int = typer.Option(8000, "--port"),
        api_keys: Optional[Path] = typer.Option(None, "--api-keys", help="file of API keys (see docs/serve.md)"),
        rate_limit: Optional[float] = typer.Option(None, "--rate-limit", help="requests per minute per key"),
        model_name: Optional[str] = typer.Option(None, "--model-name", help="model id clients use (default: the "
                                                 "run directory's name)"),
        engine: str = typer.Option("taoke", "--engine", help="taoke (continuous batching, CPU or GPU) | vllm (GPU)"),
        upstream: Optional[str] = typer.Option(None, "--upstream", help="put taoke's keys, limits and metrics in "
                                               "front of this running OpenAI-compatible server (URL)"),
        upstream_model: Optional[str] = typer.Option(None, "--upstream-model", help="the model id upstream"),
        vllm_arg: List[str] = typer.Option([], "--vllm-arg", help="extra argument for vLLM's server (repeatable)"),
        key_file: Optional[Path] = typer.Option(None, "--key-file", help="key of a sealed run (or TAOKE_SEAL_KEY)"),
        max_batch: int = typer.Option(32, "--max-batch", help="requests decoded together"),
        max_queue: int = typer.Option(64, "--max-queue", help="requests that may wait for a batch slot before 429"),
        max_model_len: Optional[int] = typer.Option(None, "--max-model-len", help="prompt + completion tokens"),
        prefix_cache_mb: int = typer.Option(256, "--prefix-cache-mb", min=0, help="memory for the keys/values of "
                                            "recent prompts, reused by prompts that start alike (0: off)"),
        max_tokens: int = typer.Option(1024, "--max-tokens", help="most tokens one request may generate"),
        max_body: int = typer.Option(1 << 20, "--max-body-bytes", help="largest request body"),
        timeout: float = typer.Option(300.0, "--timeout", help="seconds a request may take, queueing included"),
        drain: float = typer.Option(30.0, "--drain", help="on SIGTERM, seconds in-flight requests may finish"),
        cors_origin: List[str] = typer.Option([], "--cors-origin", help="allow browser calls from this origin "
                                              "(repeatable; CORS is off by default)"),
        audit_log: Optional[str] = typer.Option(None, "--audit-log", help="append audit lines here (default stderr)"),
        audit_prompts: bool = typer.Option(False, "--audit-prompts", help="also write the last prompt message"),
        device: Optional[str] = typer.Option(None, "--device", help="cpu | cuda (default: cuda when available)"),
    ) -> None:
        """Serve a model over an OpenAI-compatible HTTP API (chat/completions, classify, embeddings, metrics)."""
        from taoke.ship.serve import ServeOptions, serve

        opts = ServeOptions(host=host, port=port, api_keys=api_keys, rate_limit=rate_limit, model_name=model_name,
                            engine=engine, upstream=upstream, upstream_model=upstream_model, vllm_args=vllm_arg,
                            key_file=key_file, max_batch=max_batch, max_queue=max_queue, max_model_len=max_model_len,
                            prefix_cache_mb=prefix_cache_mb,
                            max_tokens=max_tokens, max_body_bytes=max_body, timeout_s=timeout, drain_s=drain,
                            cors_origins=list(cors_origin), audit_log=audit_log,
                            audit_prompts=audit_prompts, device=device)
        Console(stderr=True).print(f"serving {model} on http://{host}:{port} (SIGTERM or Ctrl-C to stop)")
        serve(model, opts)

    @app.command("seal")
    def seal_cmd(run: Path = typer.Argument(..., help="run directory"),
                 key_file: Optional[Path] = typer.Option(None, "--key-file", help="AES-256 key file (or "
                                                         "TAOKE_SEAL_KEY)"),
                 create: bool = typer.Option(False, "--new-key", help="write a new random key to --key-file first")):
        """Encrypt a run's weight files at rest (AES-256-GCM); serve/predict/eval/chat open it with the key."""
        from taoke.ship.seal import seal_run

        result = seal_run(run, _key(key_file, create))
        typer.echo(f"sealed {len(result['files'])} weight file(s) of {result['run']}: {', '.join(result['files'])}")

    @app.command("unseal")
    def unseal_cmd(run: Path = typer.Argument(..., help="sealed run directory"),
                   key_file: Optional[Path] = typer.Option(None, "--key-file", help="the key it was sealed with")):
        """Decrypt a sealed run's weight files back to plain files (their recorded sha256 verified)."""
        from taoke.ship.seal import unseal_run

        result = unseal_run(run, _key(key_file))
        typer.echo(f"unsealed {len(result['files'])} weight file(s) of {result['run']}; hashes match lineage.json")
