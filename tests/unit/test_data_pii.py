"""PII detectors: real formats found (check digits verified), look-alikes left alone, typed placeholders."""

from __future__ import annotations

import pytest

from tuneloop.data.pii import find_pii, iban_ok, luhn_ok, scrub

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("text", "kind", "value"),
    [
        ("mail jane.doe+billing@example.co.uk now", "email", "jane.doe+billing@example.co.uk"),
        ("écrivez à zoë@exämple.fr", "email", "zoë@exämple.fr"),
        ("call +1 415 555 0132 today", "phone", "+1 415 555 0132"),
        ("call (415) 555-0132", "phone", "(415) 555-0132"),
        ("call 415-555-0132", "phone", "415-555-0132"),
        ("ring +49 (30) 1234 5678", "phone", "+49 (30) 1234 5678"),
        ("card 4111 1111 1111 1111 ok", "card", "4111 1111 1111 1111"),
        ("amex 3782-822463-10005", "card", "3782-822463-10005"),
        ("card 5500000000000004.", "card", "5500000000000004"),
        ("iban DE89 3704 0044 0532 0130 00 thanks", "iban", "DE89 3704 0044 0532 0130 00"),
        ("iban GB82WEST12345698765432", "iban", "GB82WEST12345698765432"),
        ("from 192.168.1.20, again", "ip", "192.168.1.20"),
        ("host fe80::1ff:fe23:4567:890a down", "ip", "fe80::1ff:fe23:4567:890a"),
        ("key sk-abcdefghijklmnopqrstuvwx123", "secret", "sk-abcdefghijklmnopqrstuvwx123"),
        ("aws AKIAIOSFODNN7EXAMPLE", "secret", "AKIAIOSFODNN7EXAMPLE"),
        ("gh ghp_0123456789abcdefghijklmnopqrstuvwxyz", "secret", "ghp_0123456789abcdefghijklmnopqrstuvwxyz"),
        ("slack xoxb-1234567890-abcdefghij", "secret", "xoxb-1234567890-abcdefghij"),
        ("Authorization: Bearer abc123def456ghi789jkl", "secret", "abc123def456ghi789jkl"),
        ("-----BEGIN RSA PRIVATE KEY-----", "secret", "-----BEGIN RSA PRIVATE KEY-----"),
    ],
)
def test_detects(text, kind, value):
    assert [(m.kind, m.text) for m in find_pii(text)] == [(kind, value)]


@pytest.mark.parametrize(
    "text",
    [
        "order 4111 1111 1111 1112 (fails Luhn)",
        "ticket 1234 5678 9012 3456",
        "IBAN GB00 WEST 1234 5698 7654 32 fails mod-97",
        "version 2.3.1, Chrome 125.0.6422.78, build 10.0.19045",
        "at 10:30:45 on 2024-03-05, total $1,299.00",
        "error 0x80070005 in std::vector and a::b",
        "task-abcdefghijklmnopqrstuvwxyz is a slug, not a key",
        "Authorization: Bearer YOUR_TOKEN_HERE",
        "the 555 plan costs 1234 per year; order 5531",
        "email me at the usual address",
    ],
)
def test_look_alikes_are_not_reported(text):
    assert find_pii(text) == []


def test_check_digit_functions():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("DE89 3704 0044 0532 0130 00") and not iban_ok("DE88 3704 0044 0532 0130 00")


def test_scrub_uses_typed_placeholders_and_reports_what_it_replaced():
    text = "Mail a@b.io or call +44 20 7946 0958, card 4111-1111-1111-1111, ip 10.0.0.1, key AKIAIOSFODNN7EXAMPLE"
    scrubbed, matches = scrub(text)
    assert scrubbed == "Mail <EMAIL> or call <PHONE>, card <CARD>, ip <IP>, key <SECRET>"
    assert [m.kind for m in matches] == ["email", "phone", "card", "ip", "secret"]


def test_bearer_keeps_the_scheme_and_masks_the_token():
    assert scrub("Authorization: Bearer abc123def456ghi789jkl")[0] == "Authorization: Bearer <SECRET>"


def test_masked_hint_does_not_repeat_the_value():
    (match,) = find_pii("AKIAIOSFODNN7EXAMPLE")
    assert "IOSFODNN" not in match.masked()
