"""YAML file + ``key=value`` overrides -> a validated, frozen :class:`RunConfig`.

Errors name the file and the key, and suggest the closest known key for a typo, because "unknown key
lora_rank" with no file is how hours get lost.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

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
    lines = [f"{source}: invalid config"]
    errors = exc.errors()
    for error in errors:
        if _superseded(error, errors):
            continue
        key, known = _locate(error["loc"])
        if error["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(error["loc"][-1]), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            lines.append(f"  {key}: unknown key{hint}")
        elif error["type"] == "missing":
            lines.append(f"  {key}: required key is missing")
        else:
            message = error["msg"].removeprefix("Value error, ")
            lines.append(f"  {key}: {message} (got {error.get('input')!r})")
    return "\n".join(lines)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation can hold: ``GateConfig | None`` -> GateConfig; ``tuple[X | Y, ...]`` -> X, Y."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in typing.get_args(annotation) for model in _models_in(arg)]


def _locate(loc: tuple[Any, ...]) -> tuple[str, list[str]]:
    """The key's path as a user writes it (``gate.min_metrc``, ``baselines[2].nmae``) and the keys known in the
    section holding it, so a typo inside ``gate:`` is matched against the gate's keys, not the top level's.

    Pydantic's path also names the union member it tried (``baselines.2.EndpointBaseline.nmae``); such a
    step narrows the section and is left out of the shown path.
    """
    models: list[type[BaseModel]] = [RunConfig]
    shown = ""
    for part in loc[:-1]:
        if isinstance(part, int):
            shown += f"[{part}]"
            continue
        member = [m for m in models if m.__name__ == part]
        if member:
            models = member
            continue
        fields = [m.model_fields[part] for m in models if part in m.model_fields]
        models = [model for field in fields for model in _models_in(field.annotation)]
        shown += f".{part}" if shown else str(part)
    last = str(loc[-1]) if loc else "(top level)"
    if loc and isinstance(loc[-1], int):
        key = f"{shown}[{last}]"
    elif shown and _is_union_tag(last, models):
        key = shown  # "baselines[1]: Input should be 'base' or 'few_shot'", not "baselines[1].literal[...]"
    else:
        key = f"{shown}.{last}" if shown else last
    known = sorted({name for model in models for name in model.model_fields})
    return key, known


def _is_union_tag(part: str, models: list[type[BaseModel]]) -> bool:
    """Pydantic's name for a union member in an error path: a model's class name or ``literal['a','b']``."""
    if any(part in model.model_fields for model in models):
        return False
    return any(model.__name__ == part for model in models) or "[" in part


def _superseded(error: Any, errors: list[Any]) -> bool:
    """A union member's mismatch (``baselines[2]`` is not the string ``base``) hidden when the same value also
    failed as the mapping member: the mapping's own error ("unknown key nmae") is the one that helps."""
    loc = error["loc"]
    if not loc or not isinstance(loc[-1], str) or "[" not in loc[-1] and "'" not in loc[-1]:
        return False
    prefix = loc[:-1]
    return any(other is not error and other["loc"][: len(prefix)] == prefix and len(other["loc"]) > len(loc) for other in errors)


def dump_config(config: RunConfig) -> str:
    """The resolved config as YAML, every default spelled out: what ``config.yaml`` in a run holds."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
