"""Audit a dataset before it trains: every problem counted, with example rows, in one pass.

Most failed fine-tunes are data failures that no loss curve shows: duplicated rows that weigh some
examples double, test rows that leaked into training and inflate every metric, the same input labelled two
ways, answers cut by the sequence limit, personal data the model will memorise. Each is a check in
:data:`AUDIT_CHECKS`; a check reads an :class:`AuditContext` and returns :class:`Finding` objects.

Malformed rows and train/test leakage are *blocking* (they make training or its evaluation wrong); the
rest are warnings. :func:`blocking_problems` is the part ``train`` runs before it starts.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence

from tuneloop.data.audit_context import AuditContext, AuditOptions, TokenSettings
from tuneloop.data.checks import AUDIT_CHECKS, check_leakage
from tuneloop.data.errors import DataError
from tuneloop.data.findings import AuditReport, Distribution, FileStats, Finding
from tuneloop.data.near_duplicates import DEFAULT_THRESHOLD
from tuneloop.data.scan import ScanResult, labels_repeat
from tuneloop.data.types import Conversation

__all__ = [
    "AUDIT_CHECKS",
    "AuditOptions",
    "AuditReport",
    "Finding",
    "TokenSettings",
    "audit",
    "blocking_problems",
    "require_no_leakage",
]


def audit(
    train: ScanResult,
    others: dict[str, ScanResult] | None = None,
    *,
    options: AuditOptions | None = None,
    tokens: TokenSettings | None = None,
    classification: bool | None = None,
    checks: Sequence[str] | None = None,
) -> AuditReport:
    """Run the checks on scanned files; ``others`` maps a role (``test``, ``validation``) to its scan.

    ``classification`` (label checks) defaults to: the training file is labelled text, or its answers repeat
    like class labels do.
    """
    started = time.perf_counter()
    options = options or AuditOptions()
    files = [("train", train), *(others or {}).items()]
    if classification is None:
        classification = train.shape == "labelled_text" or labels_repeat(train.examples)
    ctx = AuditContext(files, options, classification, tokens)
    findings = [f for name in (checks or AUDIT_CHECKS) for f in AUDIT_CHECKS[name](ctx)]
    stats = [_file_stats(role, scan, classification) for role, scan in files]
    for stat in stats:
        if stat.path in ctx.token_analyses:
            stat.token_lengths = ctx.token_analyses[stat.path].token_lengths
            stat.answer_tokens = ctx.token_analyses[stat.path].answer_tokens
    settings = {
        "near_threshold": options.near_threshold,
        "classification": classification,
        "max_seq_len": tokens.max_seq_len if tokens else None,
    }
    return AuditReport(stats, findings, time.perf_counter() - started, settings)


def _file_stats(role: str, scan: ScanResult, classification: bool) -> FileStats:
    labels = Counter(e.label for e in scan.examples if e.label is not None)
    return FileStats(
        scan.path,
        role,
        scan.shape,
        scan.total_rows,
        len(scan.examples),
        list(scan.notes),
        dict(labels.most_common()) if classification else None,
        Distribution.of([len(e.answer) for e in scan.examples]),
    )


def blocking_problems(
    train: Sequence[Conversation],
    others: dict[str, Sequence[Conversation]],
    threshold: float = DEFAULT_THRESHOLD,
) -> list[Finding]:
    """Train/eval leakage (exact and near) between already-validated conversations: what ``train`` refuses.

    Malformed rows never reach here (strict loading stops at the first), so leakage is the one blocking
    check left. ``others`` maps a role (``validation``, ``test``) to its conversations.
    """

    def as_scan(path: str, conversations: Sequence[Conversation]) -> ScanResult:
        return ScanResult(path, shape="messages", examples=list(conversations))

    train_path = str(train[0].source.file) if train else "train"
    scans = {role: as_scan(str(c[0].source.file) if c else role, c) for role, c in others.items()}
    ctx = AuditContext(
        [("train", as_scan(train_path, train)), *scans.items()], AuditOptions(near_threshold=threshold), False
    )
    return check_leakage(ctx)


def require_no_leakage(
    train: Sequence[Conversation],
    others: dict[str, Sequence[Conversation]],
    threshold: float = DEFAULT_THRESHOLD,
) -> None:
    """Raise :class:`DataError` naming the leaked rows, if :func:`blocking_problems` finds any.

    The message says how to fix it and how to opt out, so ``train`` needs no wording of its own.
    """
    problems = blocking_problems(train, others, threshold)
    if not problems:
        return
    parts = []
    for finding in problems:
        example = finding.examples[0] if finding.examples else None
        shown = f" (e.g. {example.ref}: {example.detail})" if example else ""
        parts.append(f"{finding.message}{shown}")
    raise DataError(
        problems[0].file,
        "; ".join(parts) + ". Scores on leaked rows measure memory, not skill: remove them "
        "(`tuneloop data audit` lists them all, `tuneloop data split` makes leakage-free splits), "
        "or set allow_data_leakage: true to train anyway",
    )
