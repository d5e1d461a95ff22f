"""Export stage: a run's fine-tune as a PEFT adapter, a merged 16-bit model or a GGUF, each checked by a round trip.

Formats are looked up by name in :data:`EXPORT_FORMATS`; ``run(ExportOptions) -> ExportResult``.
"""

from tuneloop.export.context import ExportError
from tuneloop.export.formats import EXPORT_FORMATS, ExportFormat, get_format
from tuneloop.export.options import ExportOptions, ExportResult, FormatOutput
from tuneloop.export.run import run

__all__ = [
    "EXPORT_FORMATS",
    "ExportError",
    "ExportFormat",
    "ExportOptions",
    "ExportResult",
    "FormatOutput",
    "get_format",
    "run",
]
