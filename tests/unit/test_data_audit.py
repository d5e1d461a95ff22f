"""The audit finds every planted defect with its exact count, and nothing at all in clean data."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from tuneloop.data import Conversation, DataError, Message, RowRef
from tuneloop.data.audit import AuditOptions, TokenSettings, audit, blocking_problems, require_no_leakage
from tuneloop.data.scan import scan_file

pytestmark = pytest.mark.unit

FIXTURES = Path(__file__).parents[1] / "fixtures" / "data"
PLANTED, CLEAN = FIXTURES / "planted", FIXTURES / "clean"
TRAIN, TEST = str(PLANTED / "train.jsonl"), str(PLANTED / "test.jsonl")

# (check, kind, file) -> count: every finding the planted data must produce, and no other (see README.md)
PLANTED_FINDINGS = {
    ("malformed", None, TRAIN): 8,
    ("malformed", None, TEST): 1,
    ("exact_duplicate", None, TRAIN): 3,
    ("near_duplicate", None, TRAIN): 2,
    ("conflicting_labels", None, TRAIN): 4,
    ("leakage", "exact", TEST): 2,
    ("leakage", "near", TEST): 2,
    ("label_imbalance", None, TRAIN): 4,
    ("rare_labels", None, TRAIN): 4,
    ("label_variants", None, TRAIN): 4,
    ("unseen_labels", None, TEST): 1,
    ("pii", "email", TRAIN): 2,
    ("pii", "phone", TRAIN): 2,
    ("pii", "card", TRAIN): 2,
    ("pii", "iban", TRAIN): 1,
    ("pii", "ip", TRAIN): 2,
    ("pii", "secret", TRAIN): 4,
}
TOKEN_FINDINGS = {
    ("too_long", "prompt", TRAIN): 1,
    ("too_long", "answer", TRAIN): 1,
    ("answer_over_generation_budget", None, TRAIN): 1,
    ("template", "empty_turn", TRAIN): 1,
}


def found(report) -> dict[tuple[str, str | None, str], int]:
    return {(f.check, f.kind, f.file): f.count for f in report.findings}


def planted_report(tokens=None):
    return audit(scan_file(TRAIN), {"test": scan_file(TEST)}, tokens=tokens)


def settings(tokenizer, max_seq_len=4096, max_new_tokens=16) -> TokenSettings:
    return TokenSettings(tokenizer, max_seq_len, max_new_tokens, "Route the ticket.")


def test_every_planted_defect_is_found_with_its_exact_count():
    assert found(planted_report()) == PLANTED_FINDINGS


def test_group_counts_of_duplicates_and_conflicts():
    groups = {
        f.check: f.groups for f in planted_report().findings if f.file == TRAIN and f.groups is not None
    }
    assert groups == {"exact_duplicate": 2, "near_duplicate": 2, "conflicting_labels": 2}


def test_token_and_template_defects_are_found_with_the_models_tokenizer(tiny_tokenizer):
    assert found(planted_report(settings(tiny_tokenizer))) == {**PLANTED_FINDINGS, **TOKEN_FINDINGS}


def test_findings_point_at_the_planted_rows():
    report = planted_report()
    exact = next(f for f in report.findings if f.check == "leakage" and f.kind == "exact")
    assert [e.ref for e in exact.examples] == [f"{TEST}:9", f"{TEST}:10"]
    assert exact.examples[0].detail == f"same input as {TRAIN}:11"
    malformed = next(f for f in report.findings if f.check == "malformed" and f.file == TRAIN)
    assert malformed.examples[0].ref == f"{TRAIN}:21" and "not valid JSON" in malformed.examples[0].detail
    secret = next(f for f in report.findings if f.kind == "secret")
    assert all("AKIA" not in e.detail[3:] for e in secret.examples), "reports must not repeat the secret"


def test_malformed_rows_and_leakage_block_the_rest_warn():
    report = planted_report()
    assert {(f.check, f.kind) for f in report.blocking} == {
        ("malformed", None),
        ("leakage", "exact"),
        ("leakage", "near"),
    }
    assert report.as_dict()["ok"] is False


@pytest.mark.parametrize("with_tokenizer", [False, True])
def test_clean_data_yields_no_findings(tiny_tokenizer, with_tokenizer):
    tokens = settings(tiny_tokenizer) if with_tokenizer else None
    report = audit(scan_file(CLEAN / "train.jsonl"), {"test": scan_file(CLEAN / "test.jsonl")}, tokens=tokens)
    assert report.findings == []
    assert [stat.usable for stat in report.files] == [40, 8]
    assert report.files[0].labels == {"billing": 10, "bug_report": 10, "onboarding": 10, "account_access": 10}


def test_token_statistics_come_from_the_rendered_rows(tiny_tokenizer):
    report = audit(scan_file(CLEAN / "test.jsonl"), tokens=settings(tiny_tokenizer))
    lengths = report.files[0].token_lengths
    assert lengths is not None and lengths.count == 8 and lengths.max == 3508


def test_a_template_that_drops_the_system_prompt_is_reported(tiny_tokenizer):
    dropping = copy.deepcopy(tiny_tokenizer)
    dropping.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'system' %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    report = audit(scan_file(CLEAN / "train.jsonl"), tokens=settings(dropping), checks=["tokens"])
    assert found(report) == {("template", "system_dropped", str(CLEAN / "train.jsonl")): 40}


def test_preference_pairs_are_audited():
    path = str(PLANTED / "preference.jsonl")
    scan = scan_file(path)
    assert scan.shape == "preference"
    assert found(audit(scan)) == {("malformed", None, path): 1, ("identical_pair", None, path): 1}


def test_csv_with_byte_order_mark_and_other_column_names():
    path = str(PLANTED / "tickets.csv")
    scan = scan_file(path, infer_columns=True)
    assert scan.options.label_column == "category" and "auto-detected" in scan.notes[0]
    assert found(audit(scan)) == {
        ("malformed", None, path): 4,
        ("exact_duplicate", None, path): 1,
        ("rare_labels", None, path): 3,
    }


def test_near_threshold_is_an_option():
    strict = audit(scan_file(TRAIN), {"test": scan_file(TEST)}, options=AuditOptions(near_threshold=0.99))
    counts = found(strict)
    assert counts[("leakage", "near", TEST)] == 1  # only the case/punctuation variant is left at 0.99
    assert counts[("near_duplicate", None, TRAIN)] == 1


def _convo(text: str, label: str, line: int, file: str = "train.jsonl") -> Conversation:
    return Conversation((Message("user", text), Message("assistant", label)), RowRef(file, line), label)


def test_blocking_problems_sees_exact_and_near_leakage_between_conversations():
    train = [
        _convo("refund my second charge please", "billing", 1),
        _convo("the page is blank after login", "bug", 2),
    ]
    validation = [
        _convo("Refund my second charge, please!", "billing", 1, "val.jsonl"),
        _convo("how do I invite my team", "onb", 2, "val.jsonl"),
    ]
    test = [_convo("the page is blank after login", "bug", 1, "test.jsonl")]
    problems = blocking_problems(train, {"validation": validation, "test": test})
    assert {(p.file, p.kind, p.count) for p in problems} == {
        ("val.jsonl", "near", 1),
        ("test.jsonl", "exact", 1),
    }
    assert all(p.blocking for p in problems)
    assert blocking_problems(train, {"validation": validation[1:]}) == []


def test_require_no_leakage_names_the_rows_and_the_opt_out():
    train = [_convo("refund my second charge please", "billing", 1)]
    leaked = [_convo("refund my second charge please", "billing", 4, "test.jsonl")]
    with pytest.raises(
        DataError,
        match=r"^test\.jsonl: 1 test rows are exact copies .*test\.jsonl:4: same input as "
        r"train\.jsonl:1.*allow_data_leakage: true",
    ):
        require_no_leakage(train, {"validation": [], "test": leaked})
    require_no_leakage(train, {"validation": [], "test": []})  # nothing leaked: no error
