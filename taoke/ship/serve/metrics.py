"""Prometheus metrics of a taoke server (prometheus-client), on a registry of its own.

Names follow Prometheus conventions (units in the name, _total for counters); the example alert rules in
deploy/prometheus/taoke-alerts.yml are written against these names, and a test checks that every metric a
rule uses is exported.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 128)


class ServeMetrics:
    def __init__(self, queue_capacity: int = 0, window_s: float = 10.0):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("taoke_requests_total", "HTTP requests by route and status code", ["route", "status"],
                                registry=r)
        self.latency = Histogram("taoke_request_duration_seconds", "Time from request to last byte, by route",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("taoke_time_to_first_token_seconds", "Time from request to the first generated token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.prompt_tokens = Counter("taoke_prompt_tokens_total", "Prompt tokens processed", registry=r)
        self.prefix_tokens = Counter("taoke_prefix_cache_tokens_total",
                                     "Prompt tokens whose keys/values were reused from a recent prompt", registry=r)
        self.generated_tokens = Counter("taoke_generated_tokens_total", "Tokens generated", registry=r)
        self.tokens_per_second = Gauge("taoke_generated_tokens_per_second",
                                       f"Tokens generated per second over the last {window_s:g} s", registry=r)
        self.queue_depth = Gauge("taoke_queue_depth", "Requests waiting for a batch slot", registry=r)
        self.queue_capacity = Gauge("taoke_queue_capacity", "Most requests that may wait before 429", registry=r)
        self.running = Gauge("taoke_running_requests", "Requests being generated (in the batch)", registry=r)
        self.batch_size = Histogram("taoke_batch_size", "Requests decoded together per forward pass",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.step_seconds = Histogram("taoke_decode_step_seconds", "Time of one batched decoding step",
                                      buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2), registry=r)
        self.queue_capacity.set(queue_capacity)
        self.window_s = window_s
        self.recent: deque[tuple[float, int]] = deque()
        self.lock = threading.Lock()
        self.tokens_per_second.set_function(self._rate)

    # engine hooks (called from the engine thread)

    def step(self, rows: int, seconds: float) -> None:
        self.batch_size.observe(rows)
        self.step_seconds.observe(seconds)

    def tokens(self, n: int) -> None:
        self.generated_tokens.inc(n)
        with self.lock:
            self.recent.append((time.monotonic(), n))

    def queue(self, waiting: int, running: int) -> None:
        self.queue_depth.set(waiting)
        self.running.set(running)

    def _rate(self) -> float:
        cutoff = time.monotonic() - self.window_s
        with self.lock:
            while self.recent and self.recent[0][0] < cutoff:
                self.recent.popleft()
            return sum(n for _, n in self.recent) / self.window_s

    # server hooks

    def request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
