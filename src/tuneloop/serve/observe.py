"""What the server tells its operators: Prometheus metrics and one JSON line per request.

Both belong to one server instance (its own ``CollectorRegistry``, its own log file): no process-wide
state, so tests and embedded servers never see each other's numbers. The request log is the input of drift
monitoring later: which model answered, how many tokens in and out, how long it took, how it ended.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import IO, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ServeMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "tuneloop_requests", "HTTP requests by route and status.", ["route", "status"], registry=r
        )
        self.generations = Counter(
            "tuneloop_generations",
            "Finished generations by model and reason.",
            ["model", "finish"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "tuneloop_prompt_tokens", "Prompt tokens processed.", ["model"], registry=r
        )
        self.completion_tokens = Counter(
            "tuneloop_completion_tokens", "Tokens generated.", ["model"], registry=r
        )
        self.latency = Histogram(
            "tuneloop_request_seconds", "Request latency.", ["route"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "tuneloop_queue_seconds",
            "Time from admission to first compute.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "tuneloop_batch_size",
            "Requests per generation batch.",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.mixed_batches = Counter(
            "tuneloop_mixed_batches", "Batches that mixed several adapters/base in one forward.", registry=r
        )
        self.rejected = Counter(
            "tuneloop_rejected", "Requests refused before compute, by reason.", ["reason"], registry=r
        )
        self.in_flight = Gauge("tuneloop_in_flight", "Admitted requests (queued or running).", registry=r)
        self.adapters = Gauge("tuneloop_adapters_loaded", "Adapters loaded.", registry=r)
        self.batch_seconds = 0.5  # moving average of one batch's duration: the Retry-After estimate

    def on_batch(self, size: int, models: set[str], seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds = 0.8 * self.batch_seconds + 0.2 * seconds
        if len(models) > 1:
            self.mixed_batches.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestLog:
    """Append-only JSONL; ``None`` path keeps lines in memory only (``recent``), for tests and embedding."""

    def __init__(self, path: Path | None, keep: int = 1000) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._handle: IO[str] | None = None
        self.recent: list[dict[str, Any]] = []
        self._keep = keep
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._handle = Path(path).open("a", encoding="utf-8", buffering=1)  # noqa: SIM115 - open for the server's life

    def write(self, entry: dict[str, Any]) -> None:
        line = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
            + f".{int(time.time() * 1000) % 1000:03d}Z",
            **entry,
        }
        with self._lock:
            self.recent.append(line)
            del self.recent[: -self._keep]
            if self._handle is not None:
                self._handle.write(json.dumps(line, ensure_ascii=False) + "\n")

    def close(self) -> None:
        with self._lock:
            if self._handle is not None:
                self._handle.close()
                self._handle = None
