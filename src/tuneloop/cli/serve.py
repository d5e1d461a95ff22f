"""``tuneloop serve``: parse arguments into a ``ServeConfig`` and run the OpenAI-compatible server."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from tuneloop.cli import commands

console = Console()


def serve_command(
    base: Annotated[
        str, typer.Option("--base", help="Base model: embedded alias, HF folder, .gguf or hub id.")
    ],
    adapter: Annotated[
        list[str] | None, typer.Option("--adapter", help="NAME=RUN_DIR, loaded at start (repeatable).")
    ] = None,
    adapter_dir: Annotated[
        Path | None, typer.Option("--adapter-dir", help="Folder the admin API loads adapters from, by name.")
    ] = None,
    host: Annotated[str, typer.Option("--host", help="Bind address (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port")] = 8000,
    base_name: Annotated[
        str | None, typer.Option("--base-name", help="Model name of the base for clients.")
    ] = None,
    api_key_env: Annotated[
        str | None, typer.Option("--api-key-env", help="Environment variable holding the API key.")
    ] = None,
    admin_key_env: Annotated[
        str | None, typer.Option("--admin-key-env", help="Environment variable holding the admin key.")
    ] = None,
    max_batch_size: Annotated[int, typer.Option("--max-batch-size", help="Requests generated together.")] = 8,
    max_queue: Annotated[
        int, typer.Option("--max-queue", help="Requests waiting beyond the batch; more get 429.")
    ] = 64,
    max_tokens_cap: Annotated[int, typer.Option("--max-tokens-cap")] = 1024,
    max_model_len: Annotated[
        int | None, typer.Option("--max-model-len", help="Context limit (default: the model's).")
    ] = None,
    max_body_bytes: Annotated[int, typer.Option("--max-body-bytes")] = 1 << 20,
    timeout: Annotated[float, typer.Option("--timeout", help="Request timeout, seconds.")] = 300.0,
    request_log: Annotated[Path | None, typer.Option("--request-log", help="JSONL request log file.")] = None,
    log_content: Annotated[bool, typer.Option("--log-content", help="Log prompts and answers too.")] = False,
    precision: Annotated[str, typer.Option("--precision", help="auto | bf16 | fp16 | fp32")] = "auto",
    allow_unauthenticated_remote: Annotated[bool, typer.Option("--allow-unauthenticated-remote")] = False,
) -> None:
    """Serve a base model and its adapters with an OpenAI-compatible API (chat, completions, models)."""
    commands.guarded(
        console,
        lambda: _serve(
            base,
            adapter or [],
            adapter_dir,
            host,
            port,
            base_name,
            api_key_env,
            admin_key_env,
            max_batch_size,
            max_queue,
            max_tokens_cap,
            max_model_len,
            max_body_bytes,
            timeout,
            request_log,
            log_content,
            precision,
            allow_unauthenticated_remote,
        ),
    )


def _secret(variable: str | None) -> str | None:
    if variable is None:
        return None
    value = os.environ.get(variable)
    if not value:
        raise ValueError(f"environment variable {variable} is not set or empty")
    return value


def _serve(
    base: str,
    adapters: list[str],
    adapter_dir: Path | None,
    host: str,
    port: int,
    base_name: str | None,
    api_key_env: str | None,
    admin_key_env: str | None,
    max_batch_size: int,
    max_queue: int,
    max_tokens_cap: int,
    max_model_len: int | None,
    max_body_bytes: int,
    timeout: float,
    request_log: Path | None,
    log_content: bool,
    precision: str,
    allow_unauthenticated_remote: bool,
) -> None:
    from pydantic import ValidationError

    from tuneloop.serve.adapters import AdapterError
    from tuneloop.serve.config import ServeConfig
    from tuneloop.serve.server import run

    named: dict[str, Path] = {}
    for item in adapters:
        name, sep, path = item.partition("=")
        if not sep or not path:
            raise ValueError(f"--adapter {item!r}: expected NAME=RUN_DIR")
        named[name] = Path(path)
    try:
        config = ServeConfig(
            base=base,
            base_name=base_name,
            adapters=named,
            adapter_dir=adapter_dir,
            host=host,
            port=port,
            api_key=_secret(api_key_env),
            admin_key=_secret(admin_key_env),
            max_batch_size=max_batch_size,
            max_queue=max_queue,
            max_tokens_cap=max_tokens_cap,
            max_model_len=max_model_len,
            max_body_bytes=max_body_bytes,
            request_timeout_s=timeout,
            request_log=request_log,
            log_content=log_content,
            precision=precision,
            allow_unauthenticated_remote=allow_unauthenticated_remote,
        )
    except ValidationError as exc:
        raise ValueError(
            "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg'].removeprefix('Value error, ')}"
                for e in exc.errors()
            )
        ) from None
    console.print(
        f"serving [bold]{config.served_base_name}[/] + {len(named)} adapter(s) on http://{host}:{port}",
        highlight=False,
    )
    try:
        run(config)
    except AdapterError as exc:
        raise ValueError(exc.message) from None
