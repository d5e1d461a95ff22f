"""Typed run configuration: the schema (defaults live there only) and its YAML loader."""

from tuneloop.config.loader import ConfigError, dump_config, load_config, parse_override, validate_config
from tuneloop.config.schema import EMBEDDED_MODEL_ALIAS, RunConfig

__all__ = [
    "EMBEDDED_MODEL_ALIAS",
    "ConfigError",
    "RunConfig",
    "dump_config",
    "load_config",
    "parse_override",
    "validate_config",
]
