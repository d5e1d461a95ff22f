"""The export stage: ``run(options) -> ExportResult``.

Opens the run, lets the chosen format write and check its artefact, then records what was written next to
it (``<out>/record.json``, one entry per format, with the run's record as parent) and rewrites
``vllm-command.txt`` from those entries. A failed round trip raises before anything is recorded, so a
record entry always describes an artefact that passed its checks.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

from tuneloop.export.context import ExportContext, ExportError
from tuneloop.export.formats import get_format
from tuneloop.export.options import ExportOptions, ExportResult, FormatOutput
from tuneloop.registry import RECORD_FILE, software_versions, update_record, write_json_atomic

VLLM_FILE = "vllm-command.txt"


def run(options: ExportOptions) -> ExportResult:
    started = time.perf_counter()
    fmt = get_format(options.format)
    if options.quant is not None and options.quant not in fmt.quants:
        raise ExportError(
            f"--quant {options.quant} does not apply to format {fmt.name} (choices: {', '.join(fmt.quants) or 'none'})"
        )
    ctx = ExportContext.open(options.run_dir, device=options.device, check_prompts=options.check_prompts)
    out = Path(options.out or ctx.run_dir / "export")
    ctx.cache_dir = out
    out.mkdir(parents=True, exist_ok=True)
    output = fmt.export(ctx, options, out)
    record_path = _record(ctx, out, output, options)
    return ExportResult(ctx.run_dir, out, output, record_path, time.perf_counter() - started)


def _record(ctx: ExportContext, out: Path, output: FormatOutput, options: ExportOptions) -> Path:
    path = out / RECORD_FILE
    record: dict[str, Any] = {}
    if path.is_file():
        import json

        record = json.loads(path.read_text(encoding="utf-8"))
    parent = ctx.run_dir / RECORD_FILE
    record.update(
        {
            "kind": "export",
            "parent": {
                "path": str(parent.resolve()),
                "sha256": hashlib.sha256(parent.read_bytes()).hexdigest(),
            },
            "base_model": ctx.meta.get("base_model"),
            "chat_format": ctx.meta.get("chat_format"),
            "versions": {**software_versions(), **_extra_versions()},
        }
    )
    entry = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "paths": [str(p.relative_to(out)) if p.is_relative_to(out) else str(p) for p in output.paths],
        "options": options.model_dump(mode="json"),
        "roundtrips": [r.as_dict() for r in output.roundtrips],
        "details": output.details,
        "evaluation": output.evaluation,
        "vllm_command": output.vllm_command,
        "warnings": output.warnings,
    }
    record.setdefault("exports", {})[output.key] = entry
    write_json_atomic(path, record)
    commands = [
        f"# {key}\n{e['vllm_command']}\n" for key, e in record["exports"].items() if e.get("vllm_command")
    ]
    if commands:
        (out / VLLM_FILE).write_text("\n".join(commands), encoding="utf-8")
    update_record(
        ctx.run_dir,
        exports={k: {"path": str(out), "paths": e["paths"]} for k, e in record["exports"].items()},
    )
    return path


def _extra_versions() -> dict[str, str]:
    import importlib.metadata

    versions = {}
    for package in ("gguf", "llama_cpp_python"):
        try:
            versions[package] = importlib.metadata.version(package.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions
