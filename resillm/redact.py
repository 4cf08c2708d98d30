"""PII and secret redaction for logged bodies (``logging.redact_pii``).

One pass of one compiled pattern over each string, earliest match first; each kind has its
own placeholder so a log still says what was there:

- ``[SECRET]``: API-key-like secrets: ``sk-...``, ``sk-ant-...``, ``sk-proj-...``, AWS
  ``AKIA``/``ASIA`` key ids, ``Bearer`` tokens, GitHub ``ghp_``-style tokens, Google ``AIza``
  keys, Slack ``xox?-`` tokens;
- ``[EMAIL]``: ``local@domain.tld``;
- ``[NATIONAL_ID]``: US SSN ``123-45-6789`` (the impossible areas 000, 666 and 9xx left
  alone) and UK NINO ``AB 12 34 56 C``;
- ``[CARD]``: 13-19 digits, spaces or dashes between, **Luhn-valid** only;
- ``[IP]``: dotted-quad IPv4 (each part 0-255), and IPv6 as :mod:`ipaddress` accepts it;
- ``[PHONE]``: ``+`` and 7-15 digits (separators allowed); North American
  ``(555) 123-4567``, ``555-123-4567``, ``555.123.4567``; trunk-prefixed ``020 7946 0958``.

Near misses stay: a digit run that fails the Luhn check, dates (``2024-01-15``), times
(``12:30:45``), version strings (``1.2.3``, ``v1.2.3.4``), a bare 10-digit number.
The configured keys themselves are removed from every logged body whatever this option
says (:func:`scrub_secrets`).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import Any

_SECRET = (
    r"\bsk-(?:ant-|proj-)?[A-Za-z0-9_\-]{12,}"
    r"|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"
    r"|\b[Bb]earer\s+[A-Za-z0-9._~+/=\-]{8,}"
    r"|\bgh[pousr]_[A-Za-z0-9]{20,}"
    r"|\bAIza[0-9A-Za-z_\-]{35}"
    r"|\bxox[abprs]-[A-Za-z0-9\-]{10,}"
)
_EMAIL = r"\b[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}\b"
_SSN = r"\b(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}\b"
_NINO = r"\b[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b"
_CARD = r"(?<![\d\-])\d(?:[ \-]?\d){12,18}(?![\d\-])"
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = rf"(?<!\w)(?<!\d\.){_OCTET}(?:\.{_OCTET}){{3}}(?!\w|\.\d)"
_IPV6 = (
    r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9A-Fa-f]{1,4})?(?![\w:])"
)
_PHONE = (
    r"(?<![\w+])\+\d[\d \-.()]{6,18}\d(?!\w)"
    r"|(?<![\w(])(?:\(\d{3}\)\s?|\d{3}[\-. ])\d{3}[\-. ]\d{4}(?!\w)"
    r"|(?<!\w)0\d{1,4}[ \-]\d{3,4}[ \-]\d{3,4}(?!\w)"
)
_PATTERN = re.compile(
    "|".join(
        f"(?P<{name}>{pattern})"
        for name, pattern in (
            ("secret", _SECRET),
            ("email", _EMAIL),
            ("ssn", _SSN),
            ("nino", _NINO),
            ("card", _CARD),
            ("ipv4", _IPV4),
            ("ipv6", _IPV6),
            ("phone", _PHONE),
        )
    )
)
_PLACEHOLDER = {
    "secret": "[SECRET]",
    "email": "[EMAIL]",
    "ssn": "[NATIONAL_ID]",
    "nino": "[NATIONAL_ID]",
    "card": "[CARD]",
    "ipv4": "[IP]",
    "ipv6": "[IP]",
    "phone": "[PHONE]",
}
_PHONE_DIGITS = (7, 15)
MAX_LOGGED_STRING_CHARS = 16 * 1024


def luhn_valid(digits: str) -> bool:
    """The card-number checksum (ISO/IEC 7812-1)."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if position % 2:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def _replace(match: re.Match[str]) -> str:
    kind = match.lastgroup
    text = match.group()
    if kind == "card":
        return _redact_card(text)
    if kind == "ipv6":
        try:
            ipaddress.IPv6Address(text)
        except ValueError:
            return text
    elif kind == "phone":
        count = sum(c.isdigit() for c in text)
        if not _PHONE_DIGITS[0] <= count <= _PHONE_DIGITS[1]:
            return text
    assert kind is not None
    return _PLACEHOLDER[kind]


def _redact_card(text: str) -> str:
    """A Luhn-valid run of 13-19 digits, or the longest such run of whole groups at its
    start (a card followed by another number: ``4111 1111 1111 1111 12``)."""
    groups = re.split(r"([ \-])", text)  # digits, separator, digits, ...
    for end in range(len(groups), 0, -2):
        digits = "".join(groups[:end:2])
        if len(digits) < 13:
            break
        if len(digits) <= 19 and luhn_valid(digits):
            return "[CARD]" + "".join(groups[end:])
    return text


def redact_text(text: str) -> str:
    """``text`` with every PII match replaced by its placeholder."""
    return _PATTERN.sub(_replace, text)


def scrub_secrets(text: str, secrets: Iterable[str]) -> str:
    """Remove known secrets (configured keys) verbatim."""
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, "***")
    return text


def redact_value(value: Any, *, pii: bool, secrets: frozenset[str] = frozenset()) -> Any:
    """A decoded JSON body made fit for a log line: every string value (not the keys, which
    are the API's field names) scrubbed of ``secrets``, redacted when ``pii``, and cut to
    ``MAX_LOGGED_STRING_CHARS`` (base64 images would drown the log)."""
    if isinstance(value, str):
        return redact_string(value, pii=pii, secrets=secrets)
    if isinstance(value, dict):
        return {k: redact_value(v, pii=pii, secrets=secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_value(v, pii=pii, secrets=secrets) for v in value]
    return value


def redact_string(text: str, *, pii: bool, secrets: frozenset[str] = frozenset()) -> str:
    if len(text) > MAX_LOGGED_STRING_CHARS:
        cut = len(text) - MAX_LOGGED_STRING_CHARS
        text = f"{text[:MAX_LOGGED_STRING_CHARS]}...[{cut} more chars]"
    if secrets:
        text = scrub_secrets(text, secrets)
    return redact_text(text) if pii else text
