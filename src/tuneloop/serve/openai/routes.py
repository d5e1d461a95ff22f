"""FastAPI routes: parse, call the service, shape the OpenAI response. No serving logic lives here."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from tuneloop.serve.adapters import AdapterError, AdapterPool
from tuneloop.serve.observe import ServeMetrics
from tuneloop.serve.openai import protocol as p
from tuneloop.serve.service import Generation, Sampling, Service, ServiceError, Target

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _sampling(body: p._Request, max_tokens: int | None) -> Sampling:
    return Sampling(max_tokens, body.temperature or 0.0, body.top_p or 1.0, body.seed, tuple(body.stop or ()))


def _log(request: Request, service: Service, generation: Generation, stream: bool) -> None:
    request.state.log = {"stream": stream, **service.log_fields(generation)}


def _sse(payload: Any) -> str:
    data = (
        payload.model_dump_json(exclude_none=False)
        if hasattr(payload, "model_dump_json")
        else json.dumps(payload)
    )
    return f"data: {data}\n\n"


async def _first(stream: AsyncIterator[str]) -> str | None:
    """Start the generation (so its clean-up is guaranteed) and take its first delta, if any."""
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None


def openai_router(service: Service, auth: Callable[..., Awaitable[None]]) -> APIRouter:
    router = APIRouter(dependencies=[Depends(auth)])

    @router.get("/v1/models", response_model=p.ModelList)
    async def models() -> p.ModelList:
        return p.ModelList(
            data=[
                p.ModelCard(id=name, created=service.created, root=name, parent=parent)
                for name, parent in service.model_names()
            ]
        )

    async def begin(
        target: Target,
        prompt: list[int],
        body: p._Request,
        requested: int | None,
        default: int,
        request: Request,
    ) -> tuple[Generation, AsyncIterator[str]]:
        """Budget, admission and the generation's stream: the same for chat and plain completions."""
        budget = service.budget(len(prompt), requested, default)
        service.admit()
        generation = Generation(target, prompt, budget)
        _log(request, service, generation, body.stream)
        return generation, service.generate(generation, _sampling(body, budget), request.is_disconnected)

    async def collect(stream: AsyncIterator[str], generation: Generation, request: Request) -> str:
        text = "".join([delta async for delta in stream])
        _log(request, service, generation, False)
        return text

    async def framed(
        frames: AsyncIterator[str], generation: Generation, request: Request
    ) -> AsyncIterator[str]:
        """Server-sent events around a response's frames: an error after the start travels as an event, the
        request is logged however the stream ends, and ``[DONE]`` closes it."""
        try:
            async for frame in frames:
                yield frame
        except ServiceError as exc:  # the stream has started: the error travels as an event
            yield _sse({"error": {"message": exc.message, "type": exc.kind, "code": exc.code}})
        finally:
            await frames.aclose()  # a client that went away closes the frames as promptly as this stream
            _log(request, service, generation, True)
        yield "data: [DONE]\n\n"

    async def streamed(
        frames: AsyncIterator[str], generation: Generation, request: Request
    ) -> StreamingResponse:
        return StreamingResponse(
            framed(frames, generation, request), media_type="text/event-stream", headers=SSE_HEADERS
        )

    @router.post("/v1/chat/completions", response_model=None)
    async def chat(body: p.ChatCompletionRequest, request: Request) -> Any:
        target = service.resolve(body.model)
        prompt = service.chat_prompt(target, [(m.role, m.text()) for m in body.messages])
        requested = body.max_completion_tokens or body.max_tokens
        generation, stream = await begin(
            target, prompt, body, requested, service.config.default_max_tokens, request
        )
        if not body.stream:
            text = await collect(stream, generation, request)
            return p.ChatCompletion(
                id=p.new_id("chatcmpl"),
                created=p.now(),
                model=target.name,
                choices=[
                    p.ChatChoice(
                        message=p.AssistantMessage(content=text),
                        finish_reason=generation.finish_reason or "stop",
                    )
                ],
                usage=p.Usage(**generation.usage),
            )
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        first = await _first(stream)  # errors before the first token still get their HTTP status
        return await streamed(_chat_frames(first, stream, generation, include_usage), generation, request)

    async def _chat_frames(
        first: str | None, stream: AsyncIterator[str], generation: Generation, usage: bool
    ) -> AsyncIterator[str]:
        chunk_id, created, name = p.new_id("chatcmpl"), p.now(), generation.target.name

        def chunk(delta: p.Delta, finish: str | None = None) -> str:
            return _sse(
                p.ChatCompletionChunk(
                    id=chunk_id,
                    created=created,
                    model=name,
                    choices=[p.ChunkChoice(delta=delta, finish_reason=finish)],
                )
            )

        yield chunk(p.Delta(role="assistant", content=""))
        if first:
            yield chunk(p.Delta(content=first))
        async for delta in stream:
            yield chunk(p.Delta(content=delta))
        yield chunk(p.Delta(), generation.finish_reason or "stop")
        if usage:
            yield _sse(
                p.ChatCompletionChunk(
                    id=chunk_id, created=created, model=name, choices=[], usage=p.Usage(**generation.usage)
                )
            )

    @router.post("/v1/completions", response_model=None)
    async def completions(body: p.CompletionRequest, request: Request) -> Any:
        target = service.resolve(body.model)
        prompt = service.completion_prompt(body.text())
        generation, stream = await begin(target, prompt, body, body.max_tokens, 16, request)
        if not body.stream:
            text = await collect(stream, generation, request)
            return p.Completion(
                id=p.new_id("cmpl"),
                created=p.now(),
                model=target.name,
                choices=[p.CompletionChoice(text=text, finish_reason=generation.finish_reason or "stop")],
                usage=p.Usage(**generation.usage),
            )
        first = await _first(stream)
        return await streamed(_completion_frames(first, stream, generation), generation, request)

    async def _completion_frames(
        first: str | None, stream: AsyncIterator[str], generation: Generation
    ) -> AsyncIterator[str]:
        chunk_id, created, name = p.new_id("cmpl"), p.now(), generation.target.name

        def chunk(text: str, finish: str | None = None) -> str:
            return _sse(
                p.Completion(
                    id=chunk_id,
                    created=created,
                    model=name,
                    choices=[p.CompletionChoice(text=text, finish_reason=finish)],
                )
            )

        if first:
            yield chunk(first)
        async for delta in stream:
            yield chunk(delta)
        yield chunk("", generation.finish_reason or "stop")

    return router


def admin_router(
    pool: AdapterPool, metrics: ServeMetrics, admin_auth: Callable[..., Awaitable[None]]
) -> APIRouter:
    router = APIRouter(prefix="/admin", dependencies=[Depends(admin_auth)])

    @router.get("/adapters")
    async def adapters() -> dict[str, Any]:
        return {
            "loaded": {
                n: {"method": i.method, "weights_sha256": i.weights_sha256} for n, i in pool.loaded.items()
            },
            "registered": sorted(pool.preset),
            "adapter_dir": str(pool.root) if pool.root else None,
        }

    @router.post("/adapters/load")
    async def load(body: p.AdapterRequest, request: Request) -> Response:
        request.state.log = {"admin": "load", "adapter": body.name[:80]}
        try:
            info = await pool.load(body.name)
        except AdapterError as exc:
            raise ServiceError(exc.status, exc.message, param="name") from None
        except Exception as exc:  # noqa: BLE001 - a bad adapter fails alone; the server keeps serving
            raise ServiceError(
                422, f"adapter {body.name!r} failed to load: {type(exc).__name__}: {exc}", param="name"
            ) from None
        metrics.adapters.set(len(pool.loaded))
        return JSONResponse({"loaded": info.name, "weights_sha256": info.weights_sha256})

    @router.post("/adapters/unload")
    async def unload(body: p.AdapterRequest, request: Request) -> Response:
        request.state.log = {"admin": "unload", "adapter": body.name[:80]}
        try:
            await pool.unload(body.name)
        except AdapterError as exc:
            raise ServiceError(exc.status, exc.message, param="name") from None
        metrics.adapters.set(len(pool.loaded))
        return JSONResponse({"unloaded": body.name})

    return router
