"""What every export format needs from a run: its artefact, record, held-out prompts and reference answers.

The reference is the training-time model (base + adapter through PEFT, or the full fine-tune) answering the
run's own held-out prompts greedily in fp32. Every exported artefact is compared against it, so "the export
is faithful" means "it answers like the model evaluation measured", not "its weights look plausible".
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from tuneloop.config import RunConfig, validate_config
from tuneloop.data import ChatFormat, ChatRenderer, Conversation
from tuneloop.models.load import DeviceSetup, load_tokenizer
from tuneloop.models.trained import META_FILE, TrainedModel, find_artifact, load_trained_model
from tuneloop.registry import read_record
from tuneloop.tasks import TaskSpec, get_task
from tuneloop.train.prepare import load_split


class ExportError(RuntimeError):
    """An export that cannot be made, or whose round-trip check failed; the message says which and why."""


@dataclass
class ExportContext:
    """A run opened for export. Heavy pieces (the reference model and its answers) load on first use."""

    run_dir: Path
    artifact_dir: Path
    meta: dict[str, Any]
    record: dict[str, Any]
    config: RunConfig
    device: torch.device
    check_prompts: int
    cache_dir: Path | None = None
    _reference_cache: dict[str, list[list[int]]] = field(default_factory=dict)

    @classmethod
    def open(
        cls, run_dir: Path, device: str = "cpu", check_prompts: int = 20, cache_dir: Path | None = None
    ) -> ExportContext:
        run_dir = Path(run_dir)
        artifact = find_artifact(run_dir)
        if artifact == run_dir:  # given the artefact folder itself: the run is its parent
            run_dir = artifact.parent
        record = read_record(run_dir)
        meta = json.loads((artifact / META_FILE).read_text(encoding="utf-8"))
        config = validate_config(record["config"], source=str(run_dir / "record.json"))
        return cls(run_dir, artifact, meta, record, config, torch.device(device), check_prompts, cache_dir)

    # --- what the run was trained with -------------------------------------------------------------------
    @property
    def is_adapter(self) -> bool:
        return (self.artifact_dir / "adapter_config.json").is_file()

    @property
    def adapter_method(self) -> str:
        return str(self.meta.get("adapter_method", "lora"))

    @property
    def chat_format(self) -> ChatFormat:
        return ChatFormat.from_dict(self.meta["chat_template"], self.meta["chat_format"])

    @property
    def spec(self) -> TaskSpec:
        return TaskSpec.from_dict(self.meta["task"])

    @property
    def run_name(self) -> str:
        return self.run_dir.resolve().name

    def stop_ids(self, tokenizer: Any) -> list[int]:
        return sorted({self.chat_format.eot_token_id, tokenizer.eos_token_id} - {None})

    # --- held-out data -----------------------------------------------------------------------------------
    @cached_property
    def held_out(self) -> list[Conversation]:
        """The run's test split (else its validation split), with the run's system prompt, in file order."""
        for path in (self.config.test_file, self.config.validation_file):
            if path is not None and Path(path).is_file():
                return load_split(self.config, Path(path), self.spec)
        raise ExportError(
            f"{self.run_dir}: the round-trip check needs held-out prompts, but neither test_file nor "
            "validation_file of the run's config exists any more"
        )

    @cached_property
    def reference(self) -> TrainedModel:
        """The training-time model, fp32, on the export device."""
        return load_trained_model(self.artifact_dir, DeviceSetup(self.device, torch.float32))

    @cached_property
    def tokenizer(self) -> Any:
        """The tokenizer saved with the artefact (loading it does not load the model)."""
        return load_tokenizer(str(self.artifact_dir))

    @cached_property
    def renderer(self) -> ChatRenderer:
        return ChatRenderer(self.tokenizer, self.chat_format)

    def prompt_ids(self, limit: int | None) -> list[list[int]]:
        conversations = self.held_out if limit is None else self.held_out[:limit]
        return [self.renderer.prompt_ids(c.prompt) for c in conversations]

    def references(self, limit: int | None) -> list[str]:
        conversations = self.held_out if limit is None else self.held_out[:limit]
        return [c.label if c.label is not None else c.answer for c in conversations]

    def reference_ids(self, limit: int | None, max_new_tokens: int) -> list[list[int]]:
        """The training-time model's greedy answers (token ids) to the first ``limit`` held-out prompts.

        Kept in memory and, with ``cache_dir``, on disk keyed by the artefact's weights, the prompts, the budget
        and the device: exporting three GGUF types of one run computes the reference once, and a changed
        adapter or test file can never reuse stale answers.
        """
        prompts = self.prompt_ids(limit)
        key = self._reference_key(prompts, max_new_tokens)
        if key in self._reference_cache:
            return self._reference_cache[key]
        cached = self.cache_dir / f".reference-{key[:24]}.json" if self.cache_dir is not None else None
        if cached is not None and cached.is_file():
            self._reference_cache[key] = json.loads(cached.read_text())
            return self._reference_cache[key]
        if limit is not None:  # answers to the full split include these: compute (or load) that once
            full = self._reference_key(self.prompt_ids(None), max_new_tokens)
            if full in self._reference_cache:
                return self._reference_cache[full][:limit]
        from tuneloop.evaluate.generate import generate_greedy

        tokenizer = self.tokenizer
        answers = generate_greedy(
            self.reference.model,
            prompts,
            pad_token_id=tokenizer.pad_token_id,
            stop_token_ids=self.stop_ids(tokenizer),
            max_new_tokens=max_new_tokens,
            batch_size=self.config.eval_batch_size,
        )
        self._reference_cache[key] = answers
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            cached.write_text(json.dumps(answers))
        return answers

    def _reference_key(self, prompts: list[list[int]], max_new_tokens: int) -> str:
        digest = hashlib.sha256()
        for name in ("adapter_model.safetensors", "model.safetensors", META_FILE):
            if (self.artifact_dir / name).is_file():
                digest.update(hashlib.sha256((self.artifact_dir / name).read_bytes()).digest())
        digest.update(json.dumps([prompts, max_new_tokens, str(self.device)]).encode())
        return digest.hexdigest()

    def parse(self, text: str) -> str:
        return get_task(self.spec.task).parse_answer(text, self.spec)

    def score(self, predictions: list[str], references: list[str]) -> dict[str, Any]:
        return get_task(self.spec.task).score(predictions, references, self.spec)
