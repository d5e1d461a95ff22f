"""The FastAPI application: auth, body limit, error shapes, request log, health and metrics around the routes.

* Auth: ``Authorization: Bearer <key>`` compared with ``hmac.compare_digest`` (constant time) on every
  route but ``/health``; ``/admin`` routes take a separate key and are off when none is configured.
* The body limit is enforced while the body is read (a lying or missing Content-Length does not help), so
  a large body is answered 413 before any JSON parsing.
* Every error, including FastAPI's own validation errors and unknown routes, has OpenAI's error shape;
  bad JSON and invalid fields are 400, as OpenAI and vLLM answer them.
* One JSON line per request (``observe.RequestLog``), written when the response is finished or abandoned.
"""

from __future__ import annotations

import hmac
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tuneloop.serve.adapters import AdapterPool
from tuneloop.serve.config import ServeConfig
from tuneloop.serve.observe import RequestLog, ServeMetrics
from tuneloop.serve.openai.routes import admin_router, openai_router
from tuneloop.serve.service import Service, ServiceError

KNOWN_ROUTES = {
    "/health",
    "/metrics",
    "/v1/models",
    "/v1/chat/completions",
    "/v1/completions",
    "/admin/adapters",
    "/admin/adapters/load",
    "/admin/adapters/unload",
}


def error_response(
    status: int,
    message: str,
    kind: str,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _bearer_matches(request: Request, secret: str) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    # compare_digest on bytes: constant time in the key's content, whatever the client sends
    return scheme.lower() == "bearer" and hmac.compare_digest(
        token.strip().encode("utf-8"), secret.encode("utf-8")
    )


def create_app(
    config: ServeConfig, service: Service, pool: AdapterPool, metrics: ServeMetrics, log: RequestLog
) -> FastAPI:
    app = FastAPI(title="tuneloop", docs_url=None, redoc_url=None, openapi_url=None)

    async def require_key(request: Request) -> None:
        if config.api_key is not None and not _bearer_matches(request, config.api_key.get_secret_value()):
            raise ServiceError(
                401,
                "missing or wrong API key (Authorization: Bearer ...)",
                kind="authentication_error",
                code="invalid_api_key",
            )

    async def require_admin(request: Request) -> None:
        if config.admin_key is None:
            raise ServiceError(
                403, "the admin API is off: start the server with --admin-key-env", kind="permission_error"
            )
        if not _bearer_matches(request, config.admin_key.get_secret_value()):
            raise ServiceError(
                401, "missing or wrong admin key", kind="authentication_error", code="invalid_api_key"
            )

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.kind, exc.code, exc.param, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return error_response(400, "the request body is not valid JSON", "invalid_request_error")
        if tuple(first.get("loc", ())) == ("body",):
            return error_response(400, "the request body must be a JSON object", "invalid_request_error")
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        return error_response(
            400,
            f"{where or 'body'}: {first.get('msg', 'invalid request')}",
            "invalid_request_error",
            param=where or None,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), "invalid_request_error")

    @app.get("/health")
    async def health() -> Response:
        ok = service.engine.alive()
        body = {
            "status": "ok" if ok else "engine stopped",
            "in_flight": service.in_flight,
            "adapters": sorted(pool.loaded),
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", dependencies=[])
    async def prometheus(request: Request) -> Response:
        await require_key(request)
        return Response(metrics.render(), media_type=metrics.content_type)

    app.include_router(openai_router(service, require_key))
    app.include_router(admin_router(pool, metrics, require_admin))
    app.add_middleware(RequestGuard, max_body=config.max_body_bytes, log=log, metrics=metrics)
    return app


class RequestGuard:
    """Pure ASGI middleware: bounded body, request id, latency/status metrics and the JSONL log line."""

    def __init__(self, app: ASGIApp, max_body: int, log: RequestLog, metrics: ServeMetrics) -> None:
        self.app, self.max_body, self.log, self.metrics = app, max_body, log, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = uuid.uuid4().hex[:16]
        state = scope.setdefault("state", {})
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())],
                }
            await send(message)

        try:
            body = await self._read_body(scope, receive)
            if body is None:
                status = 413
                await error_response(
                    413, f"request body larger than {self.max_body} bytes", "invalid_request_error"
                )(scope, receive, send_with_id)
                return
            delivered = False

            async def replay() -> Message:
                nonlocal delivered
                if not delivered:
                    delivered = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send_with_id)
        finally:
            path = scope.get("path", "")
            route = path if path in KNOWN_ROUTES else "other"
            seconds = time.perf_counter() - started
            self.metrics.requests.labels(route, str(status or 499)).inc()
            self.metrics.latency.labels(route).observe(seconds)
            entry: dict[str, Any] = {
                "request_id": request_id,
                "method": scope.get("method"),
                "route": route,
                "status": status or 499,
            }
            entry["latency_ms"] = round(seconds * 1000, 1)
            entry.update(state.get("log") or {})
            self.log.write(entry)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        """The whole body, or ``None`` once it exceeds the limit (declared or actual)."""
        headers = dict(scope.get("headers", []))
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            return None
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return None
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)
