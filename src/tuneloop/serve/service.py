"""The serving logic between HTTP and the engine; no FastAPI in here.

It resolves a request's ``model`` to the base or a loaded adapter, renders chat messages exactly as the
adapter was trained (its stored template, its system prompt when the request has none: what ``Predictor``
does), enforces every limit *before* compute (context, ``max_tokens`` cap, admission to the bounded
queue), and turns the engine's token callbacks into an async stream of text deltas with stop strings,
timeouts and client disconnects handled. Every early refusal is a :class:`ServiceError` with its status.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from jinja2 import TemplateError

from tuneloop.data import ChatRenderer, Message
from tuneloop.serve.adapters import AdapterPool
from tuneloop.serve.config import ServeConfig
from tuneloop.serve.engine import Engine, GenerationRequest
from tuneloop.serve.observe import ServeMetrics

DISCONNECT_POLL_S = 0.1  # how often a waiting request asks whether its client is still there


class ServiceError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param
        self.headers = headers or {}


@dataclass(frozen=True)
class Target:
    """What a request's ``model`` resolved to."""

    name: str
    adapter: str | None
    renderer: ChatRenderer | None
    system_prompt: str | None
    stop_ids: frozenset[int]


@dataclass(frozen=True)
class Sampling:
    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stop: Sequence[str] = ()


@dataclass
class Generation:
    """One admitted request, from queue to last token. Fields feed the response, the log and metrics."""

    target: Target
    prompt_ids: list[int]
    max_new_tokens: int
    ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    admitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None

    @property
    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": len(self.prompt_ids),
            "completion_tokens": len(self.ids),
            "total_tokens": len(self.prompt_ids) + len(self.ids),
        }

    def log_fields(self) -> dict[str, Any]:
        ttft = (
            None if self.first_token_at is None else round((self.first_token_at - self.admitted_at) * 1000, 1)
        )
        return {
            "model": self.target.name,
            "adapter": self.target.adapter,
            **self.usage,
            "finish_reason": self.finish_reason,
            "ttft_ms": ttft,
        }


class Service:
    def __init__(self, config: ServeConfig, engine: Engine, pool: AdapterPool, metrics: ServeMetrics) -> None:
        self.config = config
        self.engine = engine
        self.pool = pool
        self.metrics = metrics
        self.tokenizer = engine.tokenizer
        self.context_length = min(config.max_model_len or engine.context_length, engine.context_length)
        self.in_flight = 0
        self.created = int(time.time())
        self._base_renderer: ChatRenderer | None = None
        self._base_stop = frozenset({self.tokenizer.eos_token_id} - {None})

    # --- models ---------------------------------------------------------------------------------------
    def model_names(self) -> list[tuple[str, str | None]]:
        return [
            (self.config.served_base_name, None),
            *((name, self.config.served_base_name) for name in self.pool.loaded),
        ]

    def resolve(self, model: str) -> Target:
        if model == self.config.served_base_name:
            if self._base_renderer is None and self.tokenizer.chat_template:
                self._base_renderer = ChatRenderer(self.tokenizer)
            stops = self._base_stop | (
                {self._base_renderer.format.eot_token_id} if self._base_renderer else set()
            )
            return Target(model, None, self._base_renderer, None, frozenset(stops))
        info = self.pool.loaded.get(model)
        if info is None:
            raise ServiceError(
                404, f"the model {model[:100]!r} does not exist", code="model_not_found", param="model"
            )
        stops = frozenset({info.chat_format.eot_token_id} | self._base_stop)
        return Target(
            model, model, ChatRenderer(self.tokenizer, info.chat_format), info.spec.system_prompt, stops
        )

    def log_fields(self, generation: Generation) -> dict[str, Any]:
        fields = generation.log_fields()
        if self.config.log_content:
            fields["prompt"] = self.tokenizer.decode(generation.prompt_ids)
            fields["answer"] = generation.text
        return fields

    # --- prompts and limits (all before any compute) -------------------------------------------------------
    def chat_prompt(self, target: Target, messages: Sequence[tuple[str, str]]) -> list[int]:
        if target.renderer is None:
            raise ServiceError(400, f"model {target.name!r} has no chat template; use /v1/completions")
        turns = [Message("system" if role == "developer" else role, text) for role, text in messages]
        if target.system_prompt and turns[0].role != "system":
            turns = [Message("system", target.system_prompt), *turns]
        try:
            return target.renderer.prompt_ids(turns)
        except (ValueError, TypeError, TemplateError) as exc:  # the sandboxed template refusing these messages
            raise ServiceError(
                400, f"the chat template cannot render these messages: {exc}", param="messages"
            ) from None

    def completion_prompt(self, text: str) -> list[int]:
        ids = self.tokenizer(text)["input_ids"]
        if not ids:
            raise ServiceError(400, "the prompt is empty", param="prompt")
        return list(ids)

    def budget(self, prompt_len: int, requested: int | None, default: int) -> int:
        if requested is not None and requested > self.config.max_tokens_cap:
            raise ServiceError(
                400,
                f"max_tokens {requested} exceeds this server's cap of {self.config.max_tokens_cap}",
                param="max_tokens",
            )
        room = self.context_length - prompt_len
        if requested is None:
            requested = min(default, self.config.max_tokens_cap, room)
        if room <= 0 or prompt_len + requested > self.context_length:
            raise ServiceError(
                400,
                f"this model's context is {self.context_length} tokens; the prompt has {prompt_len} and max_tokens "
                f"asks for {requested}: shorten the prompt or lower max_tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return requested

    def admit(self) -> None:
        limit = self.config.max_batch_size + self.config.max_queue
        if self.in_flight >= limit:
            self.metrics.rejected.labels("overloaded").inc()
            waves = math.ceil((self.in_flight - self.config.max_batch_size + 1) / self.config.max_batch_size)
            retry = max(1, math.ceil(self.metrics.batch_seconds * max(1, waves)))
            raise ServiceError(
                429,
                f"the server is at its limit of {limit} requests in flight; retry later",
                kind="rate_limit_error",
                code="overloaded",
                headers={"Retry-After": str(retry)},
            )
        self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)

    def release(self) -> None:
        self.in_flight -= 1
        self.metrics.in_flight.set(self.in_flight)

    # --- generation ------------------------------------------------------------------------------------
    async def generate(
        self,
        generation: Generation,
        sampling: Sampling,
        disconnected: Callable[[], Awaitable[bool]] | None = None,
    ) -> AsyncIterator[str]:
        """Text deltas of an *admitted* generation; releases its slot however it ends (done, error, cancel)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        request = GenerationRequest(
            prompt_ids=generation.prompt_ids,
            adapter=generation.target.adapter,
            max_new_tokens=generation.max_new_tokens,
            stop_ids=generation.target.stop_ids,
            on_token=lambda token: loop.call_soon_threadsafe(events.put_nowait, ("token", token)),
            on_finish=lambda reason, error: loop.call_soon_threadsafe(
                events.put_nowait, ("finish", reason, error)
            ),
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed,
        )
        deadline = loop.time() + self.config.request_timeout_s
        next_check = loop.time() + DISCONNECT_POLL_S
        self.engine.submit(request)
        try:
            while True:
                now = loop.time()
                if now >= deadline:
                    generation.finish_reason = "timeout"
                    raise ServiceError(
                        504,
                        f"the request took longer than {self.config.request_timeout_s:g} s",
                        kind="timeout_error",
                    )
                if disconnected is not None and now >= next_check:  # polled on a clock, busy or idle
                    next_check = now + DISCONNECT_POLL_S
                    if await disconnected():
                        generation.finish_reason = "disconnected"
                        return
                try:
                    event = await asyncio.wait_for(events.get(), timeout=min(deadline, next_check) - now)
                except TimeoutError:
                    continue
                if generation.first_token_at is None:
                    generation.first_token_at = time.perf_counter()
                if event[0] == "token":
                    generation.ids.append(event[1])
                    delta, stopped = self._advance(generation, sampling.stop, final=False)
                    if delta:
                        yield delta
                    if stopped:
                        generation.finish_reason = "stop"
                        return
                    continue
                reason, error = event[1], event[2]
                if reason == "unloaded":
                    raise ServiceError(404, str(error), code="model_not_found", param="model")
                if reason == "error":
                    raise ServiceError(500, str(error), kind="server_error")
                delta, stopped = self._advance(generation, sampling.stop, final=True)
                if delta:
                    yield delta
                generation.finish_reason = "stop" if stopped else reason
                return
        except (GeneratorExit, asyncio.CancelledError):  # the client went away mid-stream
            generation.finish_reason = generation.finish_reason or "disconnected"
            raise
        finally:
            request.cancelled.set()
            self.release()
            model = generation.target.name
            self.metrics.generations.labels(model, generation.finish_reason or "cancelled").inc()
            self.metrics.prompt_tokens.labels(model).inc(len(generation.prompt_ids))
            self.metrics.completion_tokens.labels(model).inc(len(generation.ids))
            if generation.first_token_at is not None:
                self.metrics.queue_wait.observe(generation.first_token_at - generation.admitted_at)

    def _advance(self, generation: Generation, stops: Sequence[str], *, final: bool) -> tuple[str, bool]:
        """The new text since the last delta, cut at a stop string; held back while a character is incomplete."""
        text = self.tokenizer.decode(generation.ids, skip_special_tokens=True)
        if not final and (text.endswith("\ufffd") or not text.startswith(generation.text)):
            return "", False
        stopped = False
        for stop in stops:
            at = text.find(stop, max(0, len(generation.text) - len(stop)))
            if at >= 0:
                text, stopped = text[:at], True
        delta = text[len(generation.text) :] if text.startswith(generation.text) else ""
        generation.text = text if text.startswith(generation.text) else generation.text
        return delta, stopped
