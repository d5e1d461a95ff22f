"""The audit checks, one function each, looked up by name in :data:`AUDIT_CHECKS`.

Each reads an :class:`~tuneloop.data.audit_context.AuditContext` and returns :class:`Finding` objects; none
prints or exits. What a check counts (rows, groups or labels) is said in its docstring and in ``Finding.unit``.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable

from tuneloop.data.audit_context import AuditContext, first_examples, short_label
from tuneloop.data.findings import Finding, RowExample
from tuneloop.data.near_duplicates import exact_key, normalise
from tuneloop.data.pii import find_pii
from tuneloop.data.preference import PreferencePair
from tuneloop.data.scan import Example, answer_key, input_text
from tuneloop.data.types import Conversation

# --- checks -----------------------------------------------------------------------------------------------


def check_malformed(ctx: AuditContext) -> list[Finding]:
    """Rows that cannot be used at all (bad JSON, missing or empty fields, wrong roles or order)."""
    findings = []
    for _, scan in ctx.files:
        if scan.problems:
            examples = [RowExample(str(p.where), str(p).removeprefix(f"{p.where}: ")) for p in scan.problems]
            findings.append(
                Finding(
                    "malformed",
                    "blocking",
                    scan.path,
                    len(scan.problems),
                    f"{len(scan.problems)} of {scan.total_rows} rows cannot be used",
                    first_examples(examples, ctx.options),
                )
            )
    return findings


def _clusters(ctx: AuditContext, span: range) -> list[list[int]]:
    """Groups of texts within ``span`` that are the same or near-same input (transitively)."""
    parent = {i: i for i in span}

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(a: int, b: int) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    inside = [[m for m in members if m in span] for members in ctx.graph.members]
    for members in inside:
        for other in members[1:]:
            union(members[0], other)
    for g, h, _ in ctx.graph.edges:
        if inside[g] and inside[h]:
            union(inside[g][0], inside[h][0])
    clusters: dict[int, list[int]] = defaultdict(list)
    for i in span:
        clusters[find(i)].append(i)
    return [c for c in clusters.values() if len(c) > 1]


def check_duplicates_and_conflicts(ctx: AuditContext) -> list[Finding]:
    """Exact and near duplicates, and conflicting answers, within each file.

    Rows whose inputs are the same or near-same form a cluster. Within a cluster, rows with the same
    (normalised) answer are copies: the first row of each exact (input, answer) pair is kept and the rest
    counted as exact duplicates; each further distinct variant counts as one near-duplicate. A cluster
    with more than one answer is a conflict: all its rows are counted, once per cluster in ``groups``.
    Preference pairs are never conflicts (several pairs per prompt are normal).
    """
    findings = []
    for (_, scan), span in zip(ctx.files, ctx.spans):
        exact: list[RowExample] = []
        near: list[RowExample] = []
        conflicts: list[RowExample] = []
        exact_groups = near_groups = conflict_groups = conflict_rows = 0
        for cluster in _clusters(ctx, span):
            examples = [ctx.example(i) for i in cluster]
            by_answer: dict[str, list[Example]] = defaultdict(list)
            for example in examples:
                by_answer[
                    normalise(answer_key(example))
                    if isinstance(example, Conversation)
                    else answer_key(example)
                ].append(example)
            if len(by_answer) > 1 and isinstance(examples[0], Conversation):
                conflict_groups += 1
                conflict_rows += len(examples)
                answers = ", ".join(repr(group[0].answer[:40]) for group in by_answer.values())
                conflicts.append(
                    RowExample(", ".join(str(e.source) for e in examples[:4]), f"answers {answers}")
                )
            for group in by_answer.values():
                variants: dict[tuple[str, str], list[Example]] = defaultdict(list)
                for example in group:
                    variants[(exact_key(input_text(example)), answer_key(example))].append(example)
                firsts = [copies[0] for copies in variants.values()]
                for copies in variants.values():
                    if len(copies) > 1:
                        exact_groups += 1
                        exact += [
                            RowExample(str(c.source), f"same as {copies[0].source}") for c in copies[1:]
                        ]
                if len(firsts) > 1:
                    near_groups += 1
                    near += [
                        RowExample(str(f.source), f"near-copy of {firsts[0].source}") for f in firsts[1:]
                    ]
        if exact:
            findings.append(
                Finding(
                    "exact_duplicate",
                    "warning",
                    scan.path,
                    len(exact),
                    f"{len(exact)} rows repeat an earlier row exactly ({exact_groups} groups)",
                    first_examples(exact, ctx.options),
                    groups=exact_groups,
                )
            )
        if near:
            findings.append(
                Finding(
                    "near_duplicate",
                    "warning",
                    scan.path,
                    len(near),
                    f"{len(near)} rows are near-copies of another row with the same answer "
                    f"({near_groups} groups)",
                    first_examples(near, ctx.options),
                    groups=near_groups,
                )
            )
        if conflict_groups:
            findings.append(
                Finding(
                    "conflicting_labels",
                    "warning",
                    scan.path,
                    conflict_rows,
                    f"{conflict_groups} groups of same or near-same inputs have different answers "
                    f"({conflict_rows} rows)",
                    first_examples(conflicts, ctx.options),
                    groups=conflict_groups,
                )
            )
    return findings


def check_leakage(ctx: AuditContext) -> list[Finding]:
    """Rows of each other file (test, validation) whose input is an exact or near copy of a training input."""
    if len(ctx.files) < 2:
        return []
    train_span = ctx.spans[0]
    adjacency = ctx.graph.neighbour_groups()
    findings = []
    for (role, scan), span in zip(ctx.files[1:], ctx.spans[1:]):
        exact: list[RowExample] = []
        near: list[RowExample] = []
        for index in span:
            example = ctx.example(index)
            group = ctx.graph.group_of[index]
            key = exact_key(input_text(example))
            same = [m for m in ctx.graph.members[group] if m in train_span]
            identical = [m for m in same if exact_key(input_text(ctx.example(m))) == key]
            if identical:
                exact.append(
                    RowExample(str(example.source), f"same input as {ctx.example(identical[0]).source}")
                )
                continue
            close = [(m, 1.0) for m in same] + [
                (m, score)
                for h, score in adjacency.get(group, ())
                for m in ctx.graph.members[h]
                if m in train_span
            ]
            if close:
                match, score = max(close, key=lambda pair: pair[1])
                near.append(
                    RowExample(
                        str(example.source),
                        f"near-copy of {ctx.example(match).source} (similarity {score:.2f})",
                    )
                )
        for kind, rows in (("exact", exact), ("near", near)):
            if rows:
                findings.append(
                    Finding(
                        "leakage",
                        "blocking",
                        scan.path,
                        len(rows),
                        f"{len(rows)} {role} rows are {kind} copies of training inputs",
                        first_examples(rows, ctx.options),
                        kind=kind,
                    )
                )
    return findings


def check_labels(ctx: AuditContext) -> list[Finding]:
    """Classification only: imbalance, labels too rare to learn, spelling variants, labels unseen in training."""
    if not ctx.classification:
        return []
    findings = []
    options = ctx.options
    train_labels: set[str] = set()
    for position, (role, scan) in enumerate(ctx.files):
        counts = Counter(e.label for e in scan.examples if e.label is not None)
        if not counts:
            continue
        if position == 0:
            train_labels = set(counts)
            top, top_n = counts.most_common(1)[0]
            minority = {label: n for label, n in counts.items() if n * options.imbalance_ratio <= top_n}
            if minority:
                listed = ", ".join(
                    f"{short_label(label)} ({n})"
                    for label, n in sorted(minority.items(), key=lambda kv: kv[1])
                )
                findings.append(
                    Finding(
                        "label_imbalance",
                        "warning",
                        scan.path,
                        len(minority),
                        f"{len(minority)} labels have {options.imbalance_ratio:g}x fewer rows than "
                        f"{short_label(top)!r} ({top_n}): {listed}",
                        unit="labels",
                    )
                )
            rare = {label: n for label, n in counts.items() if n < options.min_label_examples}
            if rare:
                listed = ", ".join(f"{short_label(label)} ({n})" for label, n in sorted(rare.items()))
                findings.append(
                    Finding(
                        "rare_labels",
                        "warning",
                        scan.path,
                        len(rare),
                        f"{len(rare)} labels have fewer than {options.min_label_examples} rows: {listed}",
                        unit="labels",
                    )
                )
        variants: dict[str, list[str]] = defaultdict(list)
        for label in counts:
            variants[normalise(label).replace(" ", "")].append(label)
        spelled = [sorted(group) for group in variants.values() if len(group) > 1]
        if spelled:
            listed = "; ".join(" / ".join(short_label(label) for label in group) for group in spelled)
            findings.append(
                Finding(
                    "label_variants",
                    "warning",
                    scan.path,
                    sum(len(g) for g in spelled),
                    f"labels that differ only in case or punctuation: {listed} "
                    "(map them with `tuneloop data clean --labels`)",
                    unit="labels",
                )
            )
        if position > 0 and train_labels:
            unseen = [e for e in scan.examples if e.label is not None and e.label not in train_labels]
            if unseen:
                names = ", ".join(short_label(label) for label in sorted({e.label for e in unseen}))
                findings.append(
                    Finding(
                        "unseen_labels",
                        "warning",
                        scan.path,
                        len(unseen),
                        f"{len(unseen)} {role} rows have labels never seen in training: {names}",
                        first_examples(
                            [RowExample(str(e.source), repr(short_label(e.label))) for e in unseen], options
                        ),
                    )
                )
    return findings


def check_pii(ctx: AuditContext) -> list[Finding]:
    """E-mail addresses, phone numbers, card numbers, IBANs, IP addresses and secrets, per kind."""
    findings = []
    for _, scan in ctx.files:
        rows: dict[str, list[RowExample]] = defaultdict(list)
        matches: Counter[str] = Counter()
        for example in scan.examples:
            found = [m for text in _texts(example) for m in find_pii(text)]
            for kind in dict.fromkeys(m.kind for m in found):
                first = next(m for m in found if m.kind == kind)
                rows[kind].append(RowExample(str(example.source), first.masked()))
            matches.update(m.kind for m in found)
        for kind, examples in rows.items():
            findings.append(
                Finding(
                    "pii",
                    "warning",
                    scan.path,
                    len(examples),
                    f"{len(examples)} rows contain {kind} ({matches[kind]} matches)",
                    first_examples(examples, ctx.options),
                    kind=kind,
                )
            )
    return findings


def _texts(example: Example) -> list[str]:
    texts = [m.content for m in example.messages]
    if isinstance(example, PreferencePair):
        texts.append(example.rejected)
    return texts


def check_preference_pairs(ctx: AuditContext) -> list[Finding]:
    """Preference pairs whose chosen and rejected answers are the same carry no preference at all."""
    findings = []
    for _, scan in ctx.files:
        same = [
            RowExample(str(e.source))
            for e in scan.examples
            if isinstance(e, PreferencePair) and exact_key(e.chosen) == exact_key(e.rejected)
        ]
        if same:
            findings.append(
                Finding(
                    "identical_pair",
                    "warning",
                    scan.path,
                    len(same),
                    f"{len(same)} pairs have identical chosen and rejected answers",
                    first_examples(same, ctx.options),
                )
            )
    return findings


def check_tokens(ctx: AuditContext) -> list[Finding]:
    """Token lengths and chat-template problems, with the model's tokenizer (only with a config)."""
    if ctx.tokens is None:
        return []
    from tuneloop.data.token_checks import analyse_tokens

    findings = []
    for _, scan in ctx.files:
        analysis = analyse_tokens(scan, ctx.tokens, ctx.options.max_examples)
        ctx.token_analyses[scan.path] = analysis
        findings += analysis.findings
    return findings


Check = Callable[[AuditContext], list[Finding]]
AUDIT_CHECKS: dict[str, Check] = {
    "malformed": check_malformed,
    "duplicates": check_duplicates_and_conflicts,
    "leakage": check_leakage,
    "labels": check_labels,
    "pii": check_pii,
    "preference": check_preference_pairs,
    "tokens": check_tokens,
}
