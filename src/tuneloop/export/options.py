"""Typed inputs and outputs of the export stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tuneloop.export.roundtrip import RoundTrip


class ExportOptions(BaseModel):
    """One export of one run; frozen once validated, like a run config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_dir: Path = Field(..., description="The run directory (or its adapter/ / model/ folder).")
    format: str = Field(
        ..., description="Export format, looked up in the format registry: adapter, merged, gguf."
    )
    quant: str | None = Field(None, description="GGUF tensor type: f16, q8_0, q4_k_m (default f16).")
    out: Path | None = Field(None, description="Where the export goes (default <run>/export).")
    dtype: Literal["fp16", "bf16"] = Field("fp16", description="Merged export dtype.")
    check_prompts: int = Field(20, ge=1, description="Held-out prompts compared in the round-trip check.")
    min_agreement: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Override of the format's required share of identical greedy answers.",
    )
    evaluate: bool = Field(False, description="Also score the exported artefact on the whole held-out split.")
    device: str = Field("cpu", description="Device for the reference model and the round trip.")
    llama_cpp: bool = Field(
        True, description="Also check GGUFs with llama.cpp itself when llama-cpp-python is installed."
    )


@dataclass
class FormatOutput:
    """What one format wrote and how its checks went."""

    key: str
    paths: list[Path]
    roundtrips: list[RoundTrip]
    details: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] | None = None
    vllm_command: str | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ExportResult:
    run_dir: Path
    out_dir: Path
    output: FormatOutput
    record_path: Path
    seconds: float
