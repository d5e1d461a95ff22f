"""The token batches every stack trains on: the same examples, in the same batches, for every stack.

* ``a``: fixed 2,048-token sequences, batch 2, every token trained. No padding anywhere, so it measures the
  raw step: kernels, attention, checkpointing, the loss over a 128k vocabulary.
* ``b``: a realistic mix of short chat examples, where padding waste matters. Each example is, with
  probability :data:`BANKING77_SHARE`, a BANKING77 classification example (its rendered length and trained
  answer length drawn together from ``bench/data/banking77_lengths.json``, made by
  ``bench/banking77_lengths.py``), otherwise a long-tail chat example whose length is log-normal (median
  :data:`CHAT_MEDIAN_TOKENS`, sigma :data:`CHAT_SIGMA`, clipped to ``[CHAT_MIN_TOKENS, max_len]``) and whose
  last :data:`CHAT_ANSWER_SHARE` is the trained answer. :data:`EXAMPLES_PER_BATCH` examples per batch make
  ~3,500 real tokens on average, near workload a's 4,096. Padded stacks pad each batch to its longest
  example (with an attention mask); tuneloop packs the same examples padding-free.

Token ids are uniform random (seeded): throughput does not depend on which ids they are, and the first
step's loss near ``ln(vocab)`` is a sanity check that the model and loss are wired up. Pure Python, so the
workloads are built and checked on any machine.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

IGNORE_INDEX = -100
PAD_ID = 0

LENGTHS_FILE = Path(__file__).resolve().parents[1] / "data" / "banking77_lengths.json"

SEQ_A = 2048
BATCH_A = 2
EXAMPLES_PER_BATCH = 16
BANKING77_SHARE = 0.5
CHAT_MEDIAN_TOKENS = 256
CHAT_SIGMA = 0.9
CHAT_MIN_TOKENS = 16
CHAT_ANSWER_SHARE = 0.2
MAX_LEN_B = 2048


@dataclass(frozen=True)
class Example:
    """One training example: token ids and labels (``-100`` where no loss is taken)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    @property
    def trained(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


Batch = list[Example]


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    warmup: list[Batch]
    timed: list[Batch]

    @property
    def examples_per_batch(self) -> int:
        return len(self.timed[0])

    def longest(self) -> int:
        return max(len(e.input_ids) for batch in self.warmup + self.timed for e in batch)

    def most_tokens_per_batch(self) -> int:
        return max(sum(len(e.input_ids) for e in batch) for batch in self.warmup + self.timed)


def _example(rng: random.Random, vocab: int, length: int, trained: int) -> Example:
    ids = tuple(rng.randrange(1, vocab) for _ in range(length))
    trained = max(1, min(trained, length - 1))  # the first token is never a target (causal shift)
    labels = (IGNORE_INDEX,) * (length - trained) + ids[length - trained :]
    return Example(ids, labels)


def workload_a(vocab: int, warmup: int, timed: int, seq: int = SEQ_A, batch: int = BATCH_A, seed: int = 1) -> Workload:
    rng = random.Random(seed)
    batches = [[_example(rng, vocab, seq, seq - 1) for _ in range(batch)] for _ in range(warmup + timed)]
    return Workload("a", f"{batch} x {seq} tokens, all trained", batches[:warmup], batches[warmup:])


def load_banking77_lengths(path: Path = LENGTHS_FILE) -> list[tuple[int, int, int]]:
    """``(rendered length, trained tokens, count)`` rows of the committed BANKING77 histogram."""
    rows = json.loads(path.read_text())["histogram"]
    return [(int(n), int(t), int(c)) for n, t, c in rows]


def _chat_length(rng: random.Random, max_len: int) -> int:
    length = round(rng.lognormvariate(math.log(CHAT_MEDIAN_TOKENS), CHAT_SIGMA))
    return max(CHAT_MIN_TOKENS, min(max_len, length))


def sample_lengths(
    rng: random.Random, count: int, histogram: Sequence[tuple[int, int, int]], max_len: int
) -> list[tuple[int, int]]:
    """``(length, trained)`` of ``count`` examples of the workload-b mix."""
    population = [(n, t) for n, t, _ in histogram]
    weights = [c for _, _, c in histogram]
    out = []
    for _ in range(count):
        if rng.random() < BANKING77_SHARE:
            length, trained = rng.choices(population, weights)[0]
            out.append((min(length, max_len), trained))
        else:
            length = _chat_length(rng, max_len)
            out.append((length, max(1, round(CHAT_ANSWER_SHARE * length))))
    return out


def workload_b(
    vocab: int,
    warmup: int,
    timed: int,
    examples_per_batch: int = EXAMPLES_PER_BATCH,
    max_len: int = MAX_LEN_B,
    seed: int = 2,
    histogram: Sequence[tuple[int, int, int]] | None = None,
) -> Workload:
    rng = random.Random(seed)
    histogram = histogram if histogram is not None else load_banking77_lengths()
    batches = []
    for _ in range(warmup + timed):
        lengths = sample_lengths(rng, examples_per_batch, histogram, max_len)
        batches.append([_example(rng, vocab, n, t) for n, t in lengths])
    description = (
        f"{examples_per_batch} examples per batch: {BANKING77_SHARE:.0%} BANKING77 lengths, the rest log-normal chat "
        f"(median {CHAT_MEDIAN_TOKENS}, sigma {CHAT_SIGMA}, clipped to [{CHAT_MIN_TOKENS}, {max_len}], "
        f"last {CHAT_ANSWER_SHARE:.0%} trained)"
    )
    return Workload("b", description, batches[:warmup], batches[warmup:])


def padded(batch: Batch, pad_id: int = PAD_ID) -> dict[str, list[list[int]]]:
    """Right-padded rows to the longest example, with an attention mask; pads carry no loss."""
    width = max(len(e.input_ids) for e in batch)
    input_ids, attention_mask, labels = [], [], []
    for e in batch:
        pad = width - len(e.input_ids)
        input_ids.append(list(e.input_ids) + [pad_id] * pad)
        attention_mask.append([1] * len(e.input_ids) + [0] * pad)
        labels.append(list(e.labels) + [IGNORE_INDEX] * pad)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@dataclass(frozen=True)
class BatchCounts:
    """What one batch holds: real tokens (the throughput count), padded tokens, trained tokens."""

    real: int
    padded: int
    trained: int
    lengths: tuple[int, ...]


def batch_counts(batch: Batch) -> BatchCounts:
    lengths = tuple(len(e.input_ids) for e in batch)
    # trained targets after the causal shift: a label at position 0 is never one
    trained = sum(sum(1 for label in e.labels[1:] if label != IGNORE_INDEX) for e in batch)
    return BatchCounts(sum(lengths), max(lengths) * len(lengths), trained, lengths)


def _build_a(vocab: int, warmup: int, timed: int, small: bool) -> Workload:
    return workload_a(vocab, warmup, timed, seq=128 if small else SEQ_A)


def _build_b(vocab: int, warmup: int, timed: int, small: bool) -> Workload:
    return workload_b(vocab, warmup, timed, examples_per_batch=4 if small else EXAMPLES_PER_BATCH,
                      max_len=128 if small else MAX_LEN_B)  # fmt: skip


WORKLOADS = {"a": _build_a, "b": _build_b}


def build(name: str, vocab: int, warmup: int, timed: int, small: bool = False) -> Workload:
    """Workload ``name``; ``small`` shrinks lengths for a CPU dry run (same mix, shorter)."""
    try:
        builder = WORKLOADS[name]
    except KeyError:
        raise KeyError(f"unknown workload {name!r}; known: a, b (c runs through bench/end_to_end.py)") from None
    return builder(vocab, warmup, timed, small)
