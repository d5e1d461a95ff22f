"""The serve stage: ``run(config)`` builds engine, adapter pool, service and app, then serves with uvicorn.

``BackgroundServer`` runs the same server in a thread on a free loopback port, for tests, benchmarks and
notebooks; it is the real server (same app, same uvicorn), not a test double.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import uvicorn

from tuneloop.serve.adapters import AdapterPool
from tuneloop.serve.app import create_app
from tuneloop.serve.config import ServeConfig
from tuneloop.serve.engine import Engine
from tuneloop.serve.observe import RequestLog, ServeMetrics
from tuneloop.serve.service import Service


@dataclass
class Server:
    """Everything one server instance owns."""

    config: ServeConfig
    engine: Engine
    pool: AdapterPool
    service: Service
    metrics: ServeMetrics
    log: RequestLog
    app: Any

    def close(self) -> None:
        self.engine.close()
        self.log.close()


def build(config: ServeConfig) -> Server:
    """Load the base and the start-up adapters; a start-up adapter that fails to load stops the start."""
    metrics = ServeMetrics()
    engine = Engine(
        config.base,
        config.precision,
        config.max_batch_size,
        config.batch_window_ms,
        on_batch=metrics.on_batch,
    )
    pool = AdapterPool(engine, config.adapter_dir, dict(config.adapters))

    try:
        for name in config.adapters:
            pool.load_now(name)
    except BaseException:
        engine.close()
        raise
    metrics.adapters.set(len(pool.loaded))
    log = RequestLog(config.request_log)
    service = Service(config, engine, pool, metrics)
    return Server(
        config, engine, pool, service, metrics, log, create_app(config, service, pool, metrics, log)
    )


def _uvicorn(server: Server, port: int) -> uvicorn.Server:
    return uvicorn.Server(
        uvicorn.Config(
            server.app,
            host=server.config.host,
            port=port,
            log_level="warning",
            access_log=False,
            lifespan="off",
        )
    )


def run(config: ServeConfig) -> None:
    """Serve until interrupted."""
    server = build(config)
    try:
        _uvicorn(server, config.port).run()
    finally:
        server.close()


class BackgroundServer:
    """``with BackgroundServer(config) as s: s.url`` -- the server on 127.0.0.1 in a thread, stopped on exit."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config.model_copy(update={"port": config.port or 0})
        self.server: Server | None = None
        self._uvicorn: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def __enter__(self) -> BackgroundServer:
        self.server = build(self.config)
        self._uvicorn = _uvicorn(self.server, self.config.port)
        self._thread = threading.Thread(target=self._uvicorn.run, name="tuneloop-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._uvicorn.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        port = self._uvicorn.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{self.config.host}:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.server is not None:
            self.server.close()
