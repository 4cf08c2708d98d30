"""PII redaction of logged bodies: each class is caught, and its near misses are left alone."""

from __future__ import annotations

import pytest

from resillm.redact import (
    MAX_LOGGED_STRING_CHARS,
    luhn_valid,
    redact_string,
    redact_text,
    redact_value,
    scrub_secrets,
)


@pytest.mark.parametrize(
    "text",
    [
        "jane.doe@example.com",
        "first.last+tag@mail.example.co.uk",
        "x_y-z%1@sub-domain.example.io",
    ],
)
def test_email_is_redacted(text: str) -> None:
    assert redact_text(f"write to {text} today") == "write to [EMAIL] today"


@pytest.mark.parametrize(
    "text",
    [
        "+1 (555) 123-4567",
        "+44 20 7946 0958",
        "+4915112345678",
        "(555) 123-4567",
        "555-123-4567",
        "555.123.4567",
        "555 123 4567",
        "020 7946 0958",
    ],
)
def test_phone_number_is_redacted(text: str) -> None:
    assert redact_text(f"call {text} now") == "call [PHONE] now"


@pytest.mark.parametrize(
    "text",
    [
        "4111 1111 1111 1111",  # Visa test number, spaced
        "4111-1111-1111-1111",
        "4111111111111111",
        "5500 0000 0000 0004",  # Mastercard
        "378282246310005",  # Amex, 15 digits
        "6011000990139424",  # Discover
        "4222222222222",  # 13 digits
    ],
)
def test_luhn_valid_card_number_is_redacted(text: str) -> None:
    assert redact_text(f"card {text}.") == "card [CARD]."


def test_card_followed_by_another_number_is_redacted_alone() -> None:
    assert redact_text("card 4111 1111 1111 1111 12") == "card [CARD] 12"


@pytest.mark.parametrize(
    "text",
    [
        "4111111111111112",  # fails the Luhn check
        "4111 1111 1111 1112",
        "1234567812345678",
        "123456789012",  # too short for a card
        "12345678901234567890123",  # too long
    ],
)
def test_digit_run_failing_luhn_is_not_redacted(text: str) -> None:
    assert redact_text(f"order {text}") == f"order {text}"


def test_luhn_check() -> None:
    assert luhn_valid("79927398713")
    assert not luhn_valid("79927398710")


@pytest.mark.parametrize("text", ["123-45-6789", "078-05-1120", "AB 12 34 56 C", "JG103759A"])
def test_national_id_is_redacted(text: str) -> None:
    assert redact_text(f"id {text}") == "id [NATIONAL_ID]"


@pytest.mark.parametrize("text", ["000-12-3456", "666-12-3456", "900-12-3456", "123-00-6789"])
def test_impossible_ssn_is_not_redacted(text: str) -> None:
    assert redact_text(f"ref {text}") == f"ref {text}"


@pytest.mark.parametrize("text", ["192.168.1.10", "10.0.0.1", "8.8.8.8", "255.255.255.255"])
def test_ipv4_is_redacted(text: str) -> None:
    assert redact_text(f"from {text}.") == "from [IP]."


@pytest.mark.parametrize(
    "text",
    ["2001:db8::1", "::1", "fe80::1ff:fe23:4567:890a", "2001:0db8:85a3:0000:0000:8a2e:0370:7334"],
)
def test_ipv6_is_redacted(text: str) -> None:
    assert redact_text(f"from {text} ok") == "from [IP] ok"


@pytest.mark.parametrize(
    "text",
    [
        "999.1.1.1",  # not an address
        "1.2.3",  # a version
        "v1.2.3.4",
        "1.2.3.4.5",
        "12:30:45",  # a time
        "std::vector",
        "2024-01-15",  # a date
        "3.14159",
        "1234567890",  # a bare 10-digit number
        "$1,234.56",
    ],
)
def test_near_misses_are_left_alone(text: str) -> None:
    assert redact_text(f"see {text} here") == f"see {text} here"


@pytest.mark.parametrize(
    "text",
    [
        "sk-abcdefghijklmnop1234",
        "sk-proj-AbC123xyz_abcdefghijkl",
        "sk-ant-api03-abcdefghijklmnopqrstuv",
        "AKIAIOSFODNN7EXAMPLE",
        "Bearer eyJhbGciOiJIUzI1NiJ9.payload.sig",
        "ghp_abcdefghijklmnopqrstuvwxyz0123",
        "AIzaSyA-abcdefghijklmnopqrstuvwxyz01234",
        "xoxb-123456789012-abcdefghij",
    ],
)
def test_api_key_like_secret_is_redacted(text: str) -> None:
    assert redact_text(f"key {text} end") == "key [SECRET] end"


def test_short_sk_word_is_not_a_secret() -> None:
    assert redact_text("use sk-learn for it") == "use sk-learn for it"


def test_several_kinds_in_one_text() -> None:
    text = "Mail a@b.io or call +1 555 123 4567 from 10.1.2.3 with 4111 1111 1111 1111"
    assert redact_text(text) == "Mail [EMAIL] or call [PHONE] from [IP] with [CARD]"


def test_json_body_strings_are_redacted_and_keys_kept() -> None:
    body = {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "I am bob@example.com, SSN 123-45-6789"}],
        "max_tokens": 4111111111111111,  # numbers are not text: left as they are
        "user": "sk-abcdefghijklmnop1234",
    }
    assert redact_value(body, pii=True) == {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "I am [EMAIL], SSN [NATIONAL_ID]"}],
        "max_tokens": 4111111111111111,
        "user": "[SECRET]",
    }


def test_without_pii_redaction_only_known_secrets_go() -> None:
    body = {"content": "bob@example.com uses key client-key-123456 here"}
    secrets = frozenset({"client-key-123456"})
    assert redact_value(body, pii=False, secrets=secrets) == {
        "content": "bob@example.com uses key *** here"
    }


def test_scrub_secrets_removes_every_occurrence() -> None:
    assert scrub_secrets("a SECRET b SECRET", ["SECRET"]) == "a *** b ***"


def test_huge_strings_are_cut() -> None:
    text = "x" * (MAX_LOGGED_STRING_CHARS + 10)
    out = redact_string(text, pii=True)
    assert out.startswith("x" * MAX_LOGGED_STRING_CHARS)
    assert out.endswith("...[10 more chars]")
