"""The export-format registry: each format names what it writes and the function that writes and checks it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tuneloop.export.context import ExportContext
    from tuneloop.export.options import ExportOptions, FormatOutput


@dataclass(frozen=True)
class ExportFormat:
    name: str
    description: str
    export: Callable[[ExportContext, ExportOptions, Path], FormatOutput]
    quants: tuple[str, ...] = ()


def _adapter(ctx: ExportContext, options: ExportOptions, out: Path) -> FormatOutput:
    from tuneloop.export.adapter import export_adapter

    return export_adapter(ctx, options, out)


def _merged(ctx: ExportContext, options: ExportOptions, out: Path) -> FormatOutput:
    from tuneloop.export.merged import export_merged

    return export_merged(ctx, options, out)


def _gguf(ctx: ExportContext, options: ExportOptions, out: Path) -> FormatOutput:
    from tuneloop.export.gguf_format import export_gguf

    return export_gguf(ctx, options, out)


EXPORT_FORMATS: dict[str, ExportFormat] = {
    f.name: f
    for f in (
        ExportFormat("adapter", "PEFT safetensors + model card (PEFT, vLLM --lora-modules).", _adapter),
        ExportFormat(
            "merged", "Adapter merged into a fresh 16-bit base, safetensors (transformers, vLLM).", _merged
        ),
        ExportFormat(
            "gguf",
            "Merged model as GGUF with tokenizer and chat template (llama.cpp, Ollama).",
            _gguf,
            ("f16", "q8_0", "q4_k_m"),
        ),
    )
}


def get_format(name: str) -> ExportFormat:
    try:
        return EXPORT_FORMATS[name]
    except KeyError:
        raise KeyError(f"unknown export format {name!r}; known: {', '.join(EXPORT_FORMATS)}") from None
