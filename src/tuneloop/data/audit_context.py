"""The shared state of one audit: options, tokenizer settings, the scanned files and their similarity graph.

Separate from the checks (:mod:`tuneloop.data.checks`) so every check reads one typed object and the graph
over all inputs is built once, not once per check.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tuneloop.data.findings import RowExample
from tuneloop.data.near_duplicates import DEFAULT_THRESHOLD, SimilarityGraph, similarity_graph
from tuneloop.data.scan import Example, ScanResult, input_text


@dataclass(frozen=True)
class AuditOptions:
    """Thresholds of the checks; the defaults are what ``tuneloop data audit`` uses."""

    near_threshold: float = DEFAULT_THRESHOLD
    imbalance_ratio: float = 10.0  # a label this many times rarer than the most common one is flagged
    min_label_examples: int = 5  # fewer examples than this cannot teach a label
    max_examples: int = 5  # example rows kept per finding


@dataclass(frozen=True)
class TokenSettings:
    """What the tokenizer-based checks need from a run config (see :mod:`tuneloop.data.token_checks`)."""

    tokenizer: Any
    max_seq_len: int
    max_new_tokens: int
    system_prompt: str | None = None


@dataclass
class AuditContext:
    """The scanned files (training data first) and a similarity graph over the inputs of all of them."""

    files: list[tuple[str, ScanResult]]
    options: AuditOptions
    classification: bool
    tokens: TokenSettings | None = None
    token_analyses: dict[str, Any] = field(default_factory=dict)  # path -> TokenAnalysis, for the stats
    graph: SimilarityGraph = field(init=False)
    spans: list[range] = field(init=False)

    def __post_init__(self) -> None:
        texts: list[str] = []
        self.spans = []
        for _, scan in self.files:
            start = len(texts)
            texts += [input_text(example) for example in scan.examples]
            self.spans.append(range(start, len(texts)))
        self.graph = similarity_graph(texts, self.options.near_threshold)

    def example(self, index: int) -> Example:
        for (_, scan), span in zip(self.files, self.spans):
            if index in span:
                return scan.examples[index - span.start]
        raise IndexError(index)


def short_label(label: str, width: int = 30) -> str:
    """A label as reports show it: a free-form answer used as a label would otherwise fill the screen."""
    return label if len(label) <= width else label[: width - 1] + "…"


def first_examples(rows: Sequence[RowExample], options: AuditOptions) -> tuple[RowExample, ...]:
    return tuple(rows[: options.max_examples])
