"""OpenAI-compatible chat endpoints: a small client, and endpoint baselines answering the test prompts.

The client is the standard library's ``urllib``: one POST to ``{base_url}/chat/completions`` per request,
retried with backoff on timeouts, 429 and 5xx. It works against OpenAI, vLLM, llama.cpp, Ollama and
tuneloop's own server alike. API keys are read from the environment variable the config names, so a key
never sits in a config file or a run record.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from tuneloop.data import Message

ATTEMPTS = 3
_RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class EndpointError(RuntimeError):
    """An endpoint that cannot be reached or answers with an error; the message names it."""


def api_key_from_env(variable: str | None, who: str) -> str | None:
    if variable is None:
        return None
    key = os.environ.get(variable)
    if not key:
        raise EndpointError(f"{who}: environment variable {variable} (api_key_env) is not set")
    return key


@dataclass(frozen=True)
class ChatClient:
    """One OpenAI-compatible chat model: ``complete(messages) -> text``, greedy (temperature 0)."""

    name: str
    base_url: str
    model: str
    api_key: str | None = None
    timeout_s: float = 60.0

    def complete(self, messages: Sequence[Message], max_tokens: int) -> str:
        body = json.dumps(
            {
                "model": self.model,
                "messages": [{"role": m.role, "content": m.content} for m in messages],
                "max_tokens": max_tokens,
                "temperature": 0.0,
            }
        ).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        url = self.base_url.rstrip("/") + "/chat/completions"
        last_error = ""
        for attempt in range(ATTEMPTS):
            request = urllib.request.Request(url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    payload = json.loads(response.read().decode("utf-8"))
                return _message_text(payload, self.name)
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode("utf-8", "replace")[:300]
                last_error = f"HTTP {exc.code}: {detail}"
                if exc.code not in _RETRY_STATUS:
                    break
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                last_error = str(getattr(exc, "reason", exc))
            except json.JSONDecodeError:
                last_error = "the response is not JSON"
                break
            if attempt + 1 < ATTEMPTS:
                time.sleep(0.5 * 2**attempt)
        raise EndpointError(f"{self.name} ({url}, model {self.model}): {last_error}")


def _message_text(payload: Any, who: str) -> str:
    try:
        content = payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise EndpointError(f"{who}: the response has no choices[0].message.content") from None
    return content if isinstance(content, str) else ""


def complete_all(
    client: ChatClient,
    conversations: Sequence[Sequence[Message]],
    max_tokens: int,
    concurrency: int,
    on_done: Callable[[int], None] | None = None,
) -> list[str]:
    """Every conversation's reply, in input order, with ``concurrency`` requests in flight."""
    results: list[str] = [""] * len(conversations)

    def one(index: int) -> int:
        results[index] = client.complete(conversations[index], max_tokens)
        return index

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for _ in pool.map(one, range(len(conversations))):
            if on_done is not None:
                on_done(1)
    return results
