"""Generate ``docs/config.md`` from the schema, so the reference can never drift from the defaults.

Run ``python -m tuneloop.config.docs`` after changing :mod:`tuneloop.config.schema`; a unit test fails
while the committed file is stale.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic_core import PydanticUndefined

from tuneloop.config.schema import RunConfig

HEADER = """\
# Config reference

A run is one YAML file. Every key is optional except `train_file`; unknown keys and wrong types are errors
that name the file and the key. Data paths are relative to the config file, `output_dir` to the working
directory. Any key can be overridden on the command line: `tuneloop train run.yaml --set epochs=2`.

This page is generated from `src/tuneloop/config/schema.py` (`python -m tuneloop.config.docs`).

| key | default | description |
|---|---|---|
"""


def _default(field) -> str:
    if field.default is PydanticUndefined:
        return "**required**"
    value = field.default
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, tuple):
        value = list(value)
    return f"`{json.dumps(value)}`"


def render_config_reference() -> str:
    rows = []
    for name, field in RunConfig.model_fields.items():
        description = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{name}` | {_default(field)} | {description} |")
    return HEADER + "\n".join(rows) + "\n"


def main() -> None:
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/config.md")
    target.write_text(render_config_reference())
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
