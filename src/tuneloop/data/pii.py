"""Personal data and secrets in training text: find them, and replace them with typed placeholders.

A fine-tune memorises rare strings; an e-mail address or an API key in the training set can come back out
of the model verbatim. Each detector is a regex for candidates plus, where the format has one, its check
digit (Luhn for cards, mod-97 for IBANs, :mod:`ipaddress` for IPs): a ticket number that merely looks like
a card is not reported, so a clean dataset stays free of false alarms.

Detectors form a registry, tried in order; a later detector never reports inside a span an earlier one
claimed (the digits of a card are not also a phone number).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class PiiMatch:
    kind: str
    start: int
    end: int
    text: str

    def masked(self) -> str:
        """A hint of the match that does not repeat it: reports end up in CI logs."""
        keep = 2 if len(self.text) > 6 else 1
        return self.text[:keep] + "…" + f"({len(self.text)} chars)"


@dataclass(frozen=True)
class Detector:
    kind: str
    placeholder: str
    pattern: re.Pattern[str]
    valid: Callable[[str], bool] = lambda text: True
    group: int = 0  # the regex group that is the sensitive part (``Bearer <token>`` keeps ``Bearer``)


def luhn_ok(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _card_ok(text: str) -> bool:
    digits = re.sub(r"[ -]", "", text)
    return 13 <= len(digits) <= 19 and digits[0] in "23456" and luhn_ok(digits)


def iban_ok(text: str) -> bool:
    """ISO 13616: move the first four characters to the end, letters to numbers, the result mod 97 is 1."""
    compact = re.sub(r"\s", "", text).upper()
    if not 15 <= len(compact) <= 34:
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(char, 36)) for char in rearranged)) % 97 == 1


def _ipv4_ok(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def _ipv6_ok(text: str) -> bool:
    # at least four hex digits and one decimal digit: keeps C++ `a::b` and `dead::beef` words out
    if sum(c in "0123456789abcdefABCDEF" for c in text) < 4 or not any(c.isdigit() for c in text):
        return False
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _phone_ok(text: str) -> bool:
    digits = re.sub(r"\D", "", text)
    return 9 <= len(digits) <= 15


_SECRET = "|".join(
    (
        r"sk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}",  # OpenAI / Anthropic style keys
        r"(?:AKIA|ASIA)[0-9A-Z]{16}",  # AWS access key ids
        r"gh[pousr]_[A-Za-z0-9]{36,}",  # GitHub tokens
        r"github_pat_[A-Za-z0-9_]{40,}",
        r"xox[abposr]-[A-Za-z0-9-]{10,}",  # Slack
        r"AIza[0-9A-Za-z_-]{35}",  # Google API keys
        r"glpat-[A-Za-z0-9_-]{20,}",  # GitLab
        r"eyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}",  # JWTs
        r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    )
)

DETECTORS: tuple[Detector, ...] = (
    Detector("secret", "<SECRET>", re.compile(rf"(?<![A-Za-z0-9_-])(?:{_SECRET})")),
    Detector("secret", "<SECRET>", re.compile(r"\b[Bb]earer\s+([A-Za-z0-9._~+/-]{16,}=*)"), group=1),
    Detector("email", "<EMAIL>", re.compile(r"(?<![\w.+-])[\w.+-]+@[\w-]+(?:\.[\w-]+)*\.[^\W\d_]{2,}\b")),
    Detector("iban", "<IBAN>", re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b"), iban_ok),
    Detector("card", "<CARD>", re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])"), _card_ok),
    Detector("ip", "<IP>", re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w]|\.\d)"), _ipv4_ok),
    Detector(
        "ip", "<IP>", re.compile(r"(?<![\w:])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:])"), _ipv6_ok
    ),
    Detector(
        "phone",
        "<PHONE>",
        # international (+CC ...) or grouped national numbers; a bare run of digits is an id, not a phone
        re.compile(
            r"(?<![\w+])(?:\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){1,4}|\(\d{2,4}\)[ .-]?\d{3,4}[ .-]\d{3,4}|\d{3}[.-]\d{3}[.-]\d{4})(?![\w])"
        ),
        _phone_ok,
    ),
)

PLACEHOLDERS = {d.kind: d.placeholder for d in DETECTORS}


def find_pii(text: str) -> list[PiiMatch]:
    """Every validated match, earliest first; spans never overlap (earlier detectors win)."""
    taken: list[tuple[int, int]] = []
    matches: list[PiiMatch] = []
    for detector in DETECTORS:
        for found in detector.pattern.finditer(text):
            start, end = found.span(detector.group)
            value = found.group(detector.group)
            if any(start < t_end and t_start < end for t_start, t_end in taken) or not detector.valid(value):
                continue
            taken.append((start, end))
            matches.append(PiiMatch(detector.kind, start, end, value))
    return sorted(matches, key=lambda m: m.start)


def scrub(text: str) -> tuple[str, list[PiiMatch]]:
    """``text`` with each match replaced by its placeholder (``<EMAIL>``...), and the matches replaced."""
    matches = find_pii(text)
    for match in reversed(matches):
        text = text[: match.start] + PLACEHOLDERS[match.kind] + text[match.end :]
    return text, matches
