"""Causal LMs over HTTP: /v1/chat/completions, /v1/completions and /v1/models, on taoke's batching engine.

Chat prompts are rendered with the model's own chat template, exactly as `taoke chat`/`predict` do.
Responses and stream chunks have OpenAI's shapes (ids, usage, finish_reason; `stream_options.include_usage`
adds a final usage chunk). A client that disconnects cancels its generation, which frees its batch row
before the next decoding step.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from itertools import accumulate

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from rich.console import Console

from taoke.ship.serve.app import ServeSettings, check_model, read_body
from taoke.ship.serve.engine import (SHUT_DOWN, Engine, Generation, QueueFull, Sampling, ShuttingDown,
                                     sliding_window)
from taoke.ship.serve.errors import ApiError
from taoke.ship.serve.schemas import ChatRequest, CompletionRequest, GenerationRequest

console = Console(stderr=True)
POLL_S = 0.5   # how often a non-streaming request checks that its client is still there


class ClientGone(Exception):
    pass


class LanguageService:
    def __init__(self, model, tokenizer, settings: ServeSettings, metrics, *, max_batch: int = 32,
                 max_queue: int = 64, max_model_len: int | None = None, prefix_cache_mb: int = 256):
        self.tokenizer = tokenizer
        self.settings = settings
        self.metrics = metrics
        limit = getattr(model.config, "max_position_embeddings", None) or 4096
        window = sliding_window(model.config)
        if window and not max_model_len and window < limit:   # vLLM's --disable-sliding-window caps it so too
            console.print(f"[yellow]note:[/] the model's attention slides over {window} tokens; contexts are capped "
                          f"there (--max-model-len {window}), where every token still sees all earlier ones")
            limit = window
        self.max_model_len = min(max_model_len or limit, limit)
        self.engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue,
                             max_model_len=self.max_model_len, prefix_cache_bytes=prefix_cache_mb << 20,
                             metrics=metrics)
        self.created = int(time.time())

    async def start(self) -> None:
        self.engine.start()

    async def stop(self) -> None:
        await asyncio.to_thread(self.engine.stop, 0.0)

    def ready(self) -> bool:
        return self.engine.thread.is_alive() and self.engine.accepting

    # ------------------------------------------------------------------------------------------ routes

    def register(self, app: FastAPI) -> None:
        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": self.settings.model_id, "object": "model",
                                                "created": self.created, "owned_by": "taoke"}]}

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await read_body(request, ChatRequest)
            self._check(body)
            if not self.tokenizer.chat_template:
                raise ApiError(400, "this model has no chat template; use /v1/completions")
            messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                        for m in body.messages]
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            return await self._respond(request, body, ids, chat=True, prompt=messages[-1]["content"])

        @app.post("/v1/completions")
        async def completions(request: Request):
            body = await read_body(request, CompletionRequest)
            self._check(body)
            ids = self.tokenizer(body.prompt_text)["input_ids"]
            return await self._respond(request, body, ids, chat=False, prompt=body.prompt_text)

    def _check(self, body: GenerationRequest) -> None:
        check_model(self.settings, body.model)
        body.check_supported()

    def _sampling(self, body: GenerationRequest, prompt_tokens: int) -> Sampling:
        cap = self.settings.max_tokens_cap
        room = self.max_model_len - prompt_tokens
        if room < 1:
            raise ApiError(400, f"the prompt is {prompt_tokens} tokens; this model's context is {self.max_model_len}",
                           param="messages", code="context_length_exceeded")
        wanted = body.requested_max_tokens
        if wanted is None:
            wanted = min(cap, room)
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        if wanted < 1:
            raise ApiError(400, f"{param} must be at least 1, got {wanted}", param=param)
        if wanted > cap:
            raise ApiError(400, f"{param} is {wanted}; this server allows at most {cap}", param=param)
        if wanted > room:
            raise ApiError(400, f"the prompt ({prompt_tokens} tokens) plus {param} ({wanted}) exceeds this model's "
                           f"context of {self.max_model_len} tokens", param=param, code="context_length_exceeded")
        return Sampling(max_tokens=wanted, temperature=float(body.temperature), top_p=float(body.top_p),
                        seed=body.seed, stop=body.stop_list, top_logprobs=body.top_logprobs_wanted)

    async def _respond(self, request: Request, body: GenerationRequest, ids: list[int], chat: bool, prompt: str):
        audit = request.state.audit
        audit.update(model=body.model, prompt_tokens=len(ids))
        if self.settings.audit_prompts:
            audit["prompt"] = prompt
        sampling = self._sampling(body, len(ids))
        try:
            gen = self.engine.submit(ids, sampling, self.settings.request_timeout_s, asyncio.get_running_loop())
        except QueueFull as e:
            raise ApiError(429, "the server's queue is full; retry later", code="queue_full",
                           headers={"Retry-After": str(e.retry_after)}) from None
        except ShuttingDown:
            raise ApiError(503, "the server is shutting down") from None
        self.metrics.prompt_tokens.inc(len(ids))
        reply = Reply(chat, body.model, self.tokenizer)
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._stream(gen, reply, audit, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            text, reason = await self._collect(gen, request)
        except ClientGone:
            audit.update(completion_tokens=gen.completion_tokens, finish_reason="cancelled")
            return ApiError(499, "client closed the request").response()
        audit.update(completion_tokens=gen.completion_tokens, finish_reason=reason)
        return reply.full(text, reason, gen)

    async def _collect(self, gen: Generation, request: Request) -> tuple[str, str]:
        pieces = []
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(gen.events.get(), POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        raise ClientGone() from None
                    continue
                if kind == "text":
                    pieces.append(value)
                elif kind == "done":
                    return "".join(pieces), value
                else:
                    raise self._failure(value)
        finally:
            gen.cancel()      # a no-op once finished; frees the row if the client left or the handler failed

    async def _stream(self, gen: Generation, reply: "Reply", audit: dict, usage: bool):
        try:
            yield reply.chunk({"role": "assistant", "content": ""} if reply.chat else "", None)
            sent = 0    # tokens whose log-probs went out with earlier chunks
            while True:
                kind, value = await gen.events.get()
                if kind == "text":
                    upto = gen.marks.popleft()
                    delta = {"content": value} if reply.chat else value
                    yield reply.chunk(delta, None, reply.logprobs(gen, sent, upto))
                    sent = upto
                elif kind == "done":   # with any tokens no text went out for (a stop string's)
                    rest = reply.logprobs(gen, sent) if len(gen.tokens) > sent else None
                    yield reply.chunk({} if reply.chat else "", value, rest)
                    if usage:
                        yield reply.usage_chunk(gen)
                    audit["finish_reason"] = value
                    break
                else:
                    audit["finish_reason"] = "error"
                    yield self._failure(value).sse()
                    break
            yield "data: [DONE]\n\n"
        finally:
            gen.cancel()     # the client disconnected (the stream was cancelled) or the stream ended
            audit["completion_tokens"] = gen.completion_tokens

    @staticmethod
    def _failure(message: str) -> ApiError:
        if message == "timeout":
            return ApiError(504, "the request ran past this server's request timeout", code="timeout")
        if message == SHUT_DOWN:
            return ApiError(503, message)
        return ApiError(500, message)


class Reply:
    """OpenAI response bodies for one request (chat.completion or text_completion, whole or as chunks)."""

    def __init__(self, chat: bool, model: str, tokenizer):
        self.chat, self.model, self.tokenizer = chat, model, tokenizer
        self.pieces: list[str] = []    # each generated token's own decoded text, decoded once
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())

    def _base(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": "taoke"}

    @staticmethod
    def usage(gen: Generation) -> dict:
        return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
                "total_tokens": gen.prompt_tokens + gen.completion_tokens}

    def full(self, text: str, reason: str, gen: Generation) -> dict:
        logprobs = self.logprobs(gen)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                      "logprobs": logprobs}
        else:
            choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": logprobs}
        return {**self._base("chat.completion" if self.chat else "text_completion"), "choices": [choice],
                "usage": self.usage(gen)}

    def logprobs(self, gen: Generation, start: int = 0, end: int | None = None) -> dict | None:
        """Log-probs of generated tokens start..end (None when the request did not ask): chat's `content` list, or
        the legacy completions object (tokens, token_logprobs, top_logprobs, text_offset). Tokens are their own
        decoded text, as OpenAI gives them; a token ending inside a UTF-8 character shows as U+FFFD. Every
        generated token is listed: where a stop string ended the answer, the tokens that spelled it too."""
        if gen.sampling.top_logprobs is None:
            return None
        end = len(gen.logprobs) if end is None else end
        entries = gen.logprobs[start:end]     # a copy: the engine thread may append meanwhile
        end = start + len(entries)
        self.pieces += [self.tokenizer.decode([t]) for t in gen.tokens[len(self.pieces):end]]
        tokens = self.pieces[start:end]

        tops = [[(self.tokenizer.decode([t]), v) for t, v in top] for _, top in entries]

        def entry(token: str, logprob: float) -> dict:
            return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

        if self.chat:
            return {"content": [{**entry(tok, lp), "top_logprobs": [entry(*alt) for alt in top]}
                                for tok, (lp, _), top in zip(tokens, entries, tops)], "refusal": None}
        offsets = list(accumulate((len(t) for t in self.pieces[:end]), initial=0))[start:end]
        return {"tokens": tokens, "token_logprobs": [lp for lp, _ in entries],
                "top_logprobs": [dict(top) for top in tops], "text_offset": offsets}

    def chunk(self, delta, reason: str | None, logprobs: dict | None = None) -> str:
        if self.chat:
            choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": logprobs}
        else:
            choice = {"index": 0, "text": delta, "finish_reason": reason, "logprobs": logprobs}
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return f"data: {json.dumps({**self._base(obj), 'choices': [choice]}, ensure_ascii=False)}\n\n"

    def usage_chunk(self, gen: Generation) -> str:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return f"data: {json.dumps({**self._base(obj), 'choices': [], 'usage': self.usage(gen)})}\n\n"
