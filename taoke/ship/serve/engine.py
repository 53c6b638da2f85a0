"""taoke's serving engine for causal LMs: continuous (iteration-level) batching over a KV cache.

One thread owns the model. Each iteration it drops requests that were cancelled (client gone) or ran past
their deadline, admits waiting requests into free cache rows (up to `prefill_budget` prompt tokens per
iteration: short prompts packed into one forward pass, each attending only to itself; a long prompt in a
pass of its own, since a dense mask over a long packed row costs more attention than packing saves; a prompt
that starts like a recent one reuses that one's keys and values and prefills only the rest, prefix.py), then
runs one decoding step for every running request in a single forward pass. A request leaves as soon as it ends, and its row is free for the next one: requests
join and leave between steps, never waiting for a whole batch to finish (Orca's iteration-level
scheduling). Each request's tokens depend only on its own prompt and parameters: rows are masked from
each other, positions are per row, and sampling draws from a per-request generator.

Requests are handed in from the asyncio server with `submit`; tokens come back as events on the
request's asyncio queue.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from taoke.errors import ModelError
from taoke.ship.serve.kv import SlotCache
from taoke.ship.serve.prefix import MIN_REUSE_TOKENS, Prefix, PrefixStore
from taoke.ship.serve.text import TextStream


SHUT_DOWN = "the server shut down before the request finished"


class QueueFull(Exception):
    """The waiting queue is full; retry after `retry_after` seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"server busy; retry after {retry_after} s")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    pass


@dataclass
class Sampling:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    top_logprobs: int | None = None   # None: no log-probs; k: each chosen token's log-prob and the k likeliest

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Generation:
    """One request inside the engine. Events on `events`: ("text", str), ("done", reason), ("error", message)."""

    def __init__(self, prompt_ids: list[int], sampling: Sampling, stream: TextStream, deadline: float,
                 loop: asyncio.AbstractEventLoop):
        self.prompt_ids = prompt_ids
        self.sampling = sampling
        self.stream = stream
        self.deadline = deadline
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.tokens: list[int] = []
        self.logprobs: list[tuple[float, list[tuple[int, float]]]] = []   # per token: (its log-prob, top k)
        self.marks: deque[int] = deque()   # per ("text", piece) event, in order: how many tokens its text covers to
        self.length = 0                 # positions in the KV cache
        self.prefix: Prefix | None = None   # a stored prompt whose first `reused` tokens this one starts with
        self.reused = 0
        self.cancelled = False
        self.finish_reason: str | None = None
        self.submitted = time.monotonic()
        self.generator = None
        if not sampling.greedy:
            self.generator = torch.Generator()
            self.generator.manual_seed(sampling.seed if sampling.seed is not None else secrets.randbits(63))

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)

    def cancel(self) -> None:
        self.cancelled = True

    def _send_text(self, piece: str) -> None:
        self.marks.append(len(self.tokens))
        self._send("text", piece)

    def _send(self, kind: str, value) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:   # the server's event loop is closed: nobody is listening any more
            pass


def token_logprobs(logits: torch.Tensor, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """(log-prob of `token`, the k likeliest (token, log-prob)) under the model's own distribution, before
    temperature and top-p, as OpenAI's API reports them."""
    lp = torch.log_softmax(logits.float(), -1)
    if not k:
        return float(lp[token]), []
    top = lp.topk(k)
    return float(lp[token]), list(zip(top.indices.tolist(), top.values.tolist()))


def sliding_window(config) -> int | None:
    """The window of a model's sliding-window attention layers (a token sees the `window` latest positions), or
    None when every layer attends to all earlier positions."""
    window = getattr(config, "sliding_window", None)
    kinds = set(getattr(config, "layer_types", None) or [])
    if "sliding_attention" in kinds or (window and getattr(config, "use_sliding_window", True)):
        return window or 0
    return None


def supports_slot_cache(config, max_model_len: int | None = None) -> str | None:
    """None if the engine can batch this architecture, else why not and what to do (hybrid/linear layers, an
    encoder-decoder, sliding windows shorter than the context). Sliding-window layers are full attention while a
    sequence fits in the window, so a model whose contexts are capped at its window is served."""
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if not kinds <= {"full_attention", "sliding_attention"}:
        return f"layer types {sorted(kinds)}; serve it with --engine vllm"
    if getattr(config, "is_encoder_decoder", False):
        return "an encoder-decoder; serve it with --engine vllm"
    window = sliding_window(config)
    if window == 0:
        return "sliding-window layers and no window size in its config; serve it with --engine vllm"
    if window is not None and (max_model_len is None or max_model_len > window):
        return (f"sliding-window attention over {window} tokens and a context of {max_model_len or 'unbounded'}; "
                f"serve it with --max-model-len {window} or less (every layer then sees all earlier tokens) or "
                "with --engine vllm")
    return None


class Engine:
    def __init__(self, model, tokenizer, *, max_batch: int = 32, max_queue: int = 64, max_model_len: int = 4096,
                 prefill_budget: int = 2048, pack_tokens: int = 512, prefix_cache_bytes: int = 256 << 20,
                 metrics=None):
        why = supports_slot_cache(model.config, max_model_len)
        if why:
            raise ModelError(f"taoke's engine batches full-attention decoders; this model has {why}.")
        attention = getattr(model.config, "_attn_implementation", None) or "sdpa"
        if attention not in ("sdpa", "eager"):
            raise ModelError(f"taoke's engine hands the model a ready attention mask each step, which {attention} "
                             "attention does not take. Load the model with SDPA or eager attention, or serve it with "
                             "--engine vllm.")
        self.additive_mask = attention == "eager"
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_model_len = max_model_len
        self.prefill_budget = prefill_budget   # prompt tokens prefilled per iteration (at least one prompt)
        self.pack_tokens = pack_tokens         # prompts packed into one pass up to this many tokens
        self.prefixes = PrefixStore(prefix_cache_bytes)
        self.metrics = metrics
        self.eos = self._eos_ids(model, tokenizer)
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        dtype = next(model.parameters()).dtype
        self.dtype = dtype
        self.kv = SlotCache(cfg.num_hidden_layers, max_batch, kv_heads, head_dim, dtype, self.device)
        # transformers 5 renamed the forward argument past_key_values -> cache; take whichever this model has
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.waiting: deque[Generation] = deque()
        self.running: list[Generation] = []
        self.cond = threading.Condition()
        self.accepting = True
        self.stopped = False
        self.mean_seconds = 2.0          # moving average of request time, for Retry-After
        self.thread = threading.Thread(target=self._loop, name="taoke-engine", daemon=True)

    @staticmethod
    def _eos_ids(model, tokenizer) -> set[int]:
        ids = set()
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        for value in (eos, tokenizer.eos_token_id):
            if isinstance(value, int):
                ids.add(value)
            elif value:
                ids.update(int(v) for v in value)
        return ids

    # ------------------------------------------------------------------------------------------ interface

    def start(self) -> "Engine":
        self.thread.start()
        return self

    def submit(self, prompt_ids: list[int], sampling: Sampling, timeout: float,
               loop: asyncio.AbstractEventLoop) -> Generation:
        """Queue a request; raises QueueFull when the waiting queue is full, ShuttingDown after stop()."""
        gen = Generation(prompt_ids, sampling, TextStream(self.tokenizer, sampling.stop), time.monotonic() + timeout,
                         loop)
        with self.cond:
            if not self.accepting:
                raise ShuttingDown("server is shutting down")
            if len(self.waiting) >= self.max_queue:
                waves = math.ceil((len(self.waiting) + 1) / self.max_batch)
                raise QueueFull(max(1, math.ceil(waves * self.mean_seconds)))
            self.waiting.append(gen)
            self._report_queue()
            self.cond.notify()
        return gen

    def stop(self, timeout: float = 0.0) -> None:
        """Stop taking requests; let running ones finish for up to `timeout` s, then end the rest."""
        with self.cond:
            self.accepting = False
            self.cond.notify()
        end = time.monotonic() + timeout
        while time.monotonic() < end and (self.running or self.waiting):
            time.sleep(0.05)
        with self.cond:
            self.stopped = True
            self.cond.notify()
        if self.thread.is_alive():
            self.thread.join(timeout=30)

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    # ------------------------------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self.cond:
                    while not self.stopped and not self.waiting and not self.running:
                        self.cond.wait()
                    if self.stopped:
                        break
                try:
                    self._retire_dead()
                    self._admit()
                    if self.running:
                        self._step()
                except Exception as e:  # noqa: BLE001 - a failed step fails its requests, not the server
                    for gen in self.running:
                        self._end(gen, error=f"generation failed: {e.__class__.__name__}: {e}")
                    self.running.clear()
        for gen in list(self.running) + list(self.waiting):
            gen._send("error", SHUT_DOWN)
        self.running.clear()
        self.waiting.clear()

    def _retire_dead(self) -> None:
        now = time.monotonic()
        with self.cond:
            for gen in list(self.waiting):
                if gen.cancelled or now > gen.deadline:
                    self.waiting.remove(gen)
                    self._end(gen, error=None if gen.cancelled else "timeout")
        for gen in list(self.running):
            if gen.cancelled or now > gen.deadline:
                self._leave(gen, error=None if gen.cancelled else "timeout")

    def _admit(self) -> None:
        """Prefill waiting requests into free rows: up to `prefill_budget` prompt tokens per iteration (at least
        one prompt), so running requests keep decoding in between; consecutive prompts share a forward pass up
        to `pack_tokens` tokens."""
        batch, tokens = [], 0
        with self.cond:
            while self.waiting and len(self.running) + len(batch) < self.max_batch:
                gen = self.waiting[0]
                prefix, reused = self.prefixes.match(gen.prompt_ids)
                if prefix is None and any(self.prefixes.shares_prefix(gen.prompt_ids, g.prompt_ids) for g in batch):
                    break   # a prompt it starts like is prefilled in this iteration: it reuses that one's next time
                n = gen.prompt_tokens - reused
                if batch and tokens + n > self.prefill_budget:
                    break
                gen.prefix, gen.reused = prefix, reused
                batch.append(self.waiting.popleft())
                tokens += n
            self._report_queue()
        packs: list[list[Generation]] = []
        for gen in batch:   # prompts that start from the same stored prefix (or from none) share a pass
            pack = next((p for p in packs if self._fits(p, gen)), None)
            if pack is None:
                packs.append([gen])
            else:
                pack.append(gen)
        for pack in packs:
            shared = min(g.reused for g in pack)   # the stored prefix's first tokens, which every prompt starts with
            for gen in pack:
                gen.reused = shared
            try:
                self._prefill(pack)
            except Exception as e:  # noqa: BLE001 - a failed pack fails its own requests (none may hang), not others
                error = f"prompt processing failed: {e.__class__.__name__}: {e}"
                for gen in pack:
                    if gen in self.running:
                        self._leave(gen, error=error)
                    elif gen.finish_reason is None:
                        self._end(gen, error=error)

    def _fits(self, pack: list[Generation], gen: Generation) -> bool:
        """Whether `gen` can join a pack: the same stored prefix (or none), at most `pack_tokens` to prefill after
        the prefix they all share, and no member giving up more than one block of a longer match to share it."""
        members = pack + [gen]
        reused = [g.reused for g in members]
        return (pack[0].prefix is gen.prefix and max(reused) - min(reused) <= MIN_REUSE_TOKENS
                and sum(g.prompt_tokens for g in members) - len(members) * min(reused) <= self.pack_tokens)

    def _prefill(self, batch: list[Generation]) -> None:
        """Run the prompts as one packed row after the stored prefix they share, if any (each attends to that
        prefix and to itself, positions run on from the prefix per prompt; a lone prompt runs exactly as
        model.generate runs it, or only its tokens after the prefix), copy each prompt's cache into a free row, and
        take each request's first token."""
        cache = DynamicCache(config=self.model.config)
        reused = batch[0].reused if batch[0].prefix is not None else 0
        if reused:   # the stored keys/values first (DynamicCache copies them on the next update: the store is kept)
            for i, (k, v) in enumerate(zip(batch[0].prefix.keys, batch[0].prefix.values)):
                cache.update(k[None, :, :reused], v[None, :, :reused], i)
        ids = torch.tensor([[t for g in batch for t in g.prompt_ids[reused:]]], device=self.device)
        args = dict(input_ids=ids, use_cache=True, **{self.cache_arg: cache})
        if len(batch) == 1:
            args.update(attention_mask=torch.ones(1, reused + ids.shape[1], dtype=torch.long, device=self.device),
                        logits_to_keep=1)
            if reused:
                args.update(position_ids=torch.arange(reused, reused + ids.shape[1], device=self.device)[None])
        else:
            lengths = torch.tensor([g.prompt_tokens - reused for g in batch], device=self.device)
            starts = lengths.cumsum(0) - lengths
            which = torch.repeat_interleave(torch.arange(len(batch), device=self.device), lengths)
            at = torch.arange(ids.shape[1], device=self.device)
            same_prompt_causal = (which[:, None] == which[None, :]) & (at[:, None] >= at[None, :])
            mask = torch.cat([torch.ones(len(at), reused, dtype=torch.bool, device=self.device), same_prompt_causal],
                             dim=1)
            args.update(attention_mask=self._model_mask(mask[None, None]),
                        position_ids=(reused + at - starts[which])[None], logits_to_keep=starts + lengths - 1)
        logits = self.model(**args).logits[0]   # a failure here fails this pack's requests (_admit)
        if reused and self.metrics is not None:
            self.metrics.prefix_tokens.inc(reused * len(batch))
        start = 0
        for gen in batch:
            row = len(self.running)
            self.kv.load_row(row, cache, gen.prompt_tokens, offset=start, shared=reused)
            self.prefixes.add(gen.prompt_ids, cache, offset=start, shared=reused)
            gen.prefix = None   # the row holds it now; the store may drop it
            start += gen.prompt_tokens - reused
            gen.length = gen.prompt_tokens
            self.running.append(gen)
        for i, gen in enumerate(list(batch)):    # after every row is placed: a request that ends at once moves others
            self._accept(gen, self._choose(gen, logits[i]), logits[i])

    def _step(self) -> None:
        started = time.perf_counter()
        rows = list(self.running)
        positions = torch.tensor([g.length for g in rows], device=self.device)
        last = torch.tensor([[g.tokens[-1]] for g in rows], device=self.device)
        mask = self._model_mask(self.kv.begin_step(positions))
        out = self.model(input_ids=last, attention_mask=mask, position_ids=positions[:, None], use_cache=True,
                         logits_to_keep=1, **{self.cache_arg: self.kv})
        logits = out.logits[:, -1]
        greedy = logits.argmax(-1).tolist()
        for gen in rows:          # every row's new position is cached before any row leaves (and moves another)
            gen.length += 1
        for i, gen in enumerate(rows):
            token = greedy[i] if gen.sampling.greedy else self._choose(gen, logits[i])
            self._accept(gen, token, logits[i])
        if self.metrics is not None:
            self.metrics.step(len(rows), time.perf_counter() - started)

    def _model_mask(self, attend: torch.Tensor) -> torch.Tensor:
        """The engine's boolean 4D mask (True: attend) as the model's attention reads a ready 4D mask, which
        transformers passes through untouched: SDPA takes booleans; eager attention adds the mask to its scores, so
        it gets 0 where a position is seen and the dtype's minimum where not (what transformers' own eager masks
        hold)."""
        if not self.additive_mask:
            return attend
        return torch.zeros(attend.shape, dtype=self.dtype, device=attend.device).masked_fill(
            ~attend, torch.finfo(self.dtype).min)

    def _choose(self, gen: Generation, logits: torch.Tensor) -> int:
        if gen.sampling.greedy:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / gen.sampling.temperature, -1)
        if gen.sampling.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < gen.sampling.top_p   # always keeps the most likely token
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs.cpu(), 1, generator=gen.generator))

    def _accept(self, gen: Generation, token: int, logits: torch.Tensor) -> None:
        """Record a generated token (and its log-probs when asked), stream its text, end the request if done."""
        if self.metrics is not None and not gen.tokens:
            self.metrics.ttft.observe(time.monotonic() - gen.submitted)
        if token in self.eos:
            self._leave(gen, reason="stop")
            return
        gen.tokens.append(token)
        if gen.sampling.top_logprobs is not None:
            gen.logprobs.append(token_logprobs(logits, token, gen.sampling.top_logprobs))
        if self.metrics is not None:
            self.metrics.tokens(1)
        piece = gen.stream.add(token)
        if piece:
            gen._send_text(piece)
        if gen.stream.stopped:
            self._leave(gen, reason="stop")
        elif len(gen.tokens) >= gen.sampling.max_tokens or gen.length + 1 >= self.max_model_len:
            self._leave(gen, reason="length")

    def _leave(self, gen: Generation, reason: str | None = None, error: str | None = None) -> None:
        """Free the request's row: the last running request moves into it."""
        row = self.running.index(gen)
        last = len(self.running) - 1
        if row != last:
            moved = self.running[last]
            self.kv.move_row(last, row, moved.length)
            self.running[row] = moved
        self.running.pop()
        self._report_queue()
        self._end(gen, reason, error)

    def _end(self, gen: Generation, reason: str | None = None, error: str | None = None) -> None:
        if error is None and not gen.cancelled:
            tail = gen.stream.finish()
            if tail:
                gen._send_text(tail)
            gen.finish_reason = reason
            gen._send("done", reason)
            self.mean_seconds = 0.8 * self.mean_seconds + 0.2 * (time.monotonic() - gen.submitted)
        elif error is not None:
            gen.finish_reason = "error"
            gen._send("error", error)

    def _report_queue(self) -> None:
        if self.metrics is not None:
            self.metrics.queue(len(self.waiting), len(self.running))
