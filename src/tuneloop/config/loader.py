"""YAML file + ``key=value`` overrides -> a validated, frozen :class:`RunConfig`.

Errors name the file and the key, and suggest the closest known key for a typo, because "unknown key
lora_rank" with no file is how hours get lost.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from tuneloop.config.schema import RunConfig


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and every bad key."""


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with the value read as YAML, so ``epochs=2`` is an int and ``labels=[a,b]`` a list."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key=value")
    return key.strip(), yaml.safe_load(raw)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read ``path``, apply ``overrides`` and validate. Data paths resolve against the file's folder."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a mapping of keys to values, got {type(raw).__name__}")
    raw = {**raw, **(overrides or {})}
    return validate_config(raw, source=str(path)).resolve_paths(path.parent.resolve())


def validate_config(raw: dict[str, Any], source: str = "<config>") -> RunConfig:
    """Validate a plain mapping; every problem is reported at once as ``source: key: message``."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None


def _describe(exc: ValidationError, source: str) -> str:
    known = sorted(RunConfig.model_fields)
    lines = [f"{source}: invalid config"]
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "(top level)"
        if error["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(error["loc"][0]), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            lines.append(f"  {key}: unknown key{hint}")
        elif error["type"] == "missing":
            lines.append(f"  {key}: required key is missing")
        else:
            message = error["msg"].removeprefix("Value error, ")
            lines.append(f"  {key}: {message} (got {error.get('input')!r})")
    return "\n".join(lines)


def dump_config(config: RunConfig) -> str:
    """The resolved config as YAML, every default spelled out: what ``config.yaml`` in a run holds."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
