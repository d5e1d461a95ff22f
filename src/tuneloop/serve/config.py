"""The server's settings: one frozen object, validated once, with every limit the HTTP layer enforces."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from tuneloop.serve.adapters import validate_name


class ServeConfig(BaseModel):
    """What ``tuneloop serve`` runs with. Keys are read from environment variables by the CLI, never argv."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base: str = Field(..., description="Base model: embedded alias, HF folder, .gguf file or hub id.")
    base_name: str | None = Field(
        None, description="Name clients use for the base model (default: --base, or its folder name)."
    )
    adapters: dict[str, Path] = Field(
        default_factory=dict, description="Adapters loaded at start: name -> run dir."
    )
    adapter_dir: Path | None = Field(
        None, description="Folder the admin API may load adapters from, by name."
    )
    host: str = Field("127.0.0.1", description="Bind address; loopback unless asked otherwise.")
    port: int = Field(8000, ge=0, le=65535)
    api_key: SecretStr | None = Field(None, description="Bearer key for every route but /health.")
    admin_key: SecretStr | None = Field(
        None, description="Separate bearer key for /admin routes; none: admin off."
    )
    allow_unauthenticated_remote: bool = Field(
        False, description="Permit a non-loopback bind without an API key."
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    max_batch_size: int = Field(
        8, ge=1, description="Requests generated together in one batch (concurrency)."
    )
    max_queue: int = Field(64, ge=0, description="Requests waiting beyond the running batch; more get 429.")
    batch_window_ms: float = Field(10.0, ge=0.0, description="How long a new batch waits for companions.")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Largest request body; larger gets 413.")
    max_tokens_cap: int = Field(1024, ge=1, description="Largest max_tokens a request may ask for.")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a chat request gives none.")
    max_model_len: int | None = Field(None, ge=16, description="Context limit (default: the model's).")
    request_timeout_s: float = Field(300.0, gt=0.0, description="Longest a request may wait and run.")
    request_log: Path | None = Field(
        None, description="JSONL request log (time, model, tokens, latency, status)."
    )
    log_content: bool = Field(
        False, description="Also log prompts and answers (off: they may hold personal data)."
    )

    @field_validator("adapters")
    @classmethod
    def _names(cls, value: dict[str, Path]) -> dict[str, Path]:
        for name in value:
            validate_name(name)
        return value

    @model_validator(mode="after")
    def _remote_needs_key(self) -> ServeConfig:
        if not is_loopback(self.host) and self.api_key is None and not self.allow_unauthenticated_remote:
            raise ValueError(
                f"binding {self.host} exposes the server beyond this machine; set an API key (--api-key-env) "
                "or pass --allow-unauthenticated-remote"
            )
        return self

    @property
    def served_base_name(self) -> str:
        return self.base_name or Path(self.base).name or self.base


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
