"""Round-trip checks: load an exported artefact back and make it answer like the training-time model.

Each loader (PEFT, transformers, transformers' GGUF reader, llama.cpp) is wrapped as a ``Generator``: token
ids in, greedy token ids out. Prompts are the run's first held-out examples rendered with the run's own
template, so only the exported weights (and, for GGUF, the file's tokenizer metadata, checked separately)
can make answers differ. An export whose answers agree less often than its format's threshold raises.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tuneloop.export.context import ExportContext, ExportError

Generator = Callable[[Sequence[Sequence[int]], int], list[list[int]]]


@dataclass(frozen=True)
class RoundTrip:
    """How often an exported artefact gave exactly the training-time model's greedy answer."""

    artefact: str
    loader: str
    n: int
    identical: int
    min_agreement: float
    mismatches: list[dict[str, Any]] = field(default_factory=list)

    @property
    def agreement(self) -> float:
        return self.identical / self.n if self.n else 1.0

    @property
    def passed(self) -> bool:
        return self.identical >= math.ceil(self.min_agreement * self.n - 1e-9)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "agreement": round(self.agreement, 4), "passed": self.passed}


def hf_generator(model: Any, pad_token_id: int, stop_ids: Sequence[int], batch_size: int) -> Generator:
    from tuneloop.evaluate.generate import generate_greedy

    def generate(prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        return generate_greedy(
            model,
            prompts,
            pad_token_id=pad_token_id,
            stop_token_ids=stop_ids,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
        )

    return generate


class LlamaCppRunner:
    """Greedy decoding by llama.cpp itself (in a child process), as a ``Generator``.

    The first call also tokenizes ``texts`` with llama.cpp's tokenizer (kept in ``tokenized``), so checking
    the file's tokenizer and its answers costs one model load; answers are cached per prompt list.
    """

    def __init__(self, path: Path, context: int, stop_ids: Sequence[int], texts: Sequence[str] = ()) -> None:
        self.path, self.context, self.stop_ids, self.texts = path, context, list(stop_ids), list(texts)
        self.tokenized: list[list[int]] | None = None
        self._answers: dict[str, list[list[int]]] = {}

    def __call__(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        from tuneloop.export import llama_cpp

        key = json.dumps([[list(p) for p in prompts], max_new_tokens])
        if key not in self._answers:
            texts = self.texts if self.tokenized is None else []
            reply = llama_cpp.run_isolated(
                self.path, self.context, prompts, texts, self.stop_ids, max_new_tokens
            )
            if self.tokenized is None:
                self.tokenized = reply["tokenized"]
            self._answers[key] = reply["generated"]
        return self._answers[key]


def check_greedy(
    ctx: ExportContext,
    artefact: str,
    loader: str,
    generate: Generator,
    min_agreement: float,
    *,
    strict: bool = True,
) -> RoundTrip:
    """Compare ``generate`` with the training-time model on the first ``ctx.check_prompts`` held-out prompts."""
    limit = ctx.check_prompts
    max_new = ctx.config.max_new_tokens
    expected = ctx.reference_ids(limit, max_new)
    got = generate(ctx.prompt_ids(limit), max_new)
    tokenizer = ctx.tokenizer
    mismatches = [
        {
            "index": i,
            "input": ctx.held_out[i].prompt[-1].content[:200],
            "expected": tokenizer.decode(e, skip_special_tokens=True),
            "got": tokenizer.decode(g, skip_special_tokens=True),
        }
        for i, (e, g) in enumerate(zip(expected, got))
        if list(e) != list(g)
    ]
    result = RoundTrip(
        artefact, loader, len(expected), len(expected) - len(mismatches), min_agreement, mismatches[:5]
    )
    if strict and not result.passed:
        shown = "; ".join(
            f"#{m['index']}: expected {m['expected']!r}, got {m['got']!r}" for m in mismatches[:3]
        )
        raise ExportError(
            f"round-trip check failed for {artefact} ({loader}): {result.identical}/{result.n} greedy answers identical "
            f"to the training-time model, below the required {min_agreement:.0%} ({shown})"
        )
    return result


def evaluate_exported(ctx: ExportContext, artefact: str, generate: Generator) -> dict[str, Any]:
    """The task's metrics on the whole held-out split for the exported artefact next to the training-time model."""
    max_new = ctx.config.max_new_tokens
    tokenizer = ctx.tokenizer
    references = ctx.references(None)
    reference_ids = ctx.reference_ids(None, max_new)
    exported_ids = generate(ctx.prompt_ids(None), max_new)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True).strip()
    reference_pred = [ctx.parse(decode(ids)) for ids in reference_ids]
    exported_pred = [ctx.parse(decode(ids)) for ids in exported_ids]
    reference_metrics = ctx.score(reference_pred, references)
    exported_metrics = ctx.score(exported_pred, references)
    headline = {k: v for k, v in exported_metrics.items() if isinstance(v, (int, float))}
    baseline = {k: v for k, v in reference_metrics.items() if isinstance(v, (int, float))}
    return {
        "artefact": artefact,
        "n": len(references),
        "exported": headline,
        "training_time": baseline,
        "delta": {k: round(headline[k] - baseline[k], 4) for k in headline if k in baseline and k != "n"},
        "same_answer": sum(a == b for a, b in zip(reference_pred, exported_pred)),
        "identical_tokens": sum(list(a) == list(b) for a, b in zip(reference_ids, exported_ids)),
    }


def check_gguf_tokenizer(ctx: ExportContext, path: Path, pre: str) -> dict[str, Any]:
    """The tokenizer transformers rebuilds from the GGUF metadata must be the training tokenizer.

    Vocabulary, chat template and special tokens must match exactly. Encodings of the rendered check
    prompts must match too where transformers implements the file's pre-tokenizer (``gpt-2``,
    ``llama-bpe``); for others it is reported, and llama.cpp's own tokenizer is checked when installed.
    """
    from transformers import AutoTokenizer

    trained = ctx.tokenizer
    rebuilt = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    problems = []
    if rebuilt.get_vocab() != trained.get_vocab():
        problems.append("vocabulary differs")
    if (rebuilt.chat_template or "") != ctx.chat_format.template:
        problems.append("chat template differs")
    if rebuilt.eos_token_id != trained.eos_token_id:
        problems.append(f"eos id {rebuilt.eos_token_id} != {trained.eos_token_id}")
    texts = check_texts(ctx)
    same = sum(
        rebuilt.encode(t, add_special_tokens=False) == trained.encode(t, add_special_tokens=False)
        for t in texts
    )
    faithful = pre in ("gpt-2", "llama-bpe")
    if faithful and same != len(texts):
        problems.append(f"only {same}/{len(texts)} prompts tokenize identically")
    if problems:
        raise ExportError(
            f"{path}: the GGUF tokenizer does not reproduce the training tokenizer: {'; '.join(problems)}"
        )
    return {"pre_tokenizer": pre, "identical_encodings": same, "n": len(texts), "encodings_checked": faithful}


def check_texts(ctx: ExportContext) -> list[str]:
    """The check prompts as text (special tokens written out), for tokenizer comparisons."""
    return [ctx.tokenizer.decode(ids) for ids in ctx.prompt_ids(ctx.check_prompts)]


def check_llama_cpp_tokenizer(ctx: ExportContext, tokenized: Sequence[Sequence[int]]) -> dict[str, Any]:
    """llama.cpp's own tokenizer (pre-tokenizer, merges, specials from the file) must match training's."""
    texts = check_texts(ctx)
    same = sum(
        list(ids) == ctx.tokenizer.encode(t, add_special_tokens=False) for ids, t in zip(tokenized, texts)
    )
    if same != len(texts):
        raise ExportError(
            f"llama.cpp tokenizes only {same}/{len(texts)} check prompts like the training tokenizer"
        )
    return {"identical_encodings": same, "n": len(texts)}
