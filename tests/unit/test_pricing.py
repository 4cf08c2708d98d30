"""Prices: the built-in table's matching, per-alias overrides, exact nano-dollar costs."""

from __future__ import annotations

import logging

import pytest

from resillm.config_loader import config_from_dict
from resillm.pricing import (
    Price,
    PriceBook,
    builtin_price,
    cost_nano_usd,
    normalise_model,
    to_nano_usd,
    to_usd,
)


@pytest.mark.parametrize(
    ("model", "family_price"),
    [
        ("gpt-4o", Price(2.5, 10.0)),
        ("gpt-4o-2024-08-06", Price(2.5, 10.0)),
        ("gpt-4o-2024-05-13", Price(5.0, 15.0)),  # a snapshot with its own price
        ("gpt-4o-mini-2024-07-18", Price(0.15, 0.6)),  # the longest family wins
        ("gpt-4.1-nano-2025-04-14", Price(0.1, 0.4)),
        ("o3-mini-2025-01-31", Price(1.1, 4.4)),
        ("o4-mini", Price(1.1, 4.4)),
        ("gpt-3.5-turbo-0125", Price(0.5, 1.5)),
        ("claude-3-5-sonnet-20241022", Price(3.0, 15.0)),
        ("claude-3-5-haiku-latest", Price(0.8, 4.0)),
        ("claude-3.5-sonnet", Price(3.0, 15.0)),
        ("claude-sonnet-4-5-20250929", Price(3.0, 15.0)),
        ("claude-opus-4-1-20250805", Price(15.0, 75.0)),
        ("claude-haiku-4-5", Price(1.0, 5.0)),
        ("anthropic.claude-3-5-sonnet-20240620-v1:0", Price(3.0, 15.0)),
        ("us.anthropic.claude-3-7-sonnet-20250219-v1:0", Price(3.0, 15.0)),
        ("eu.anthropic.claude-sonnet-4-20250514-v1:0", Price(3.0, 15.0)),
        (
            "arn:aws:bedrock:us-east-1:123456789012:inference-profile/"
            "us.anthropic.claude-3-5-haiku-20241022-v1:0",
            Price(0.8, 4.0),
        ),
        ("meta.llama3-1-70b-instruct-v1:0", Price(0.72, 0.72)),
        ("us.meta.llama3-2-11b-instruct-v1:0", Price(0.16, 0.16)),
        ("amazon.nova-lite-v1:0", Price(0.06, 0.24)),
        ("amazon.titan-text-express-v1", Price(0.2, 0.6)),
        ("mistral.mistral-large-2407-v1:0", Price(2.0, 6.0)),
        ("GPT-4o", Price(2.5, 10.0)),
    ],
)
def test_builtin_table_matches_snapshots_and_bedrock_ids(model: str, family_price: Price) -> None:
    assert builtin_price(model) == family_price


@pytest.mark.parametrize("model", ["gpt-4.5-preview", "gpt-4omega", "llama-3-local", "m", ""])
def test_a_name_that_only_starts_like_a_known_family_is_unknown(model: str) -> None:
    assert builtin_price(model) is None


def test_normalise_drops_region_and_vendor_prefixes() -> None:
    assert normalise_model("us.anthropic.claude-3-haiku-20240307-v1:0") == (
        "claude-3-haiku-20240307-v1:0"
    )
    assert normalise_model("apac.amazon.nova-pro-v1:0") == "amazon.nova-pro-v1:0"
    assert normalise_model("openai/gpt-4o") == "gpt-4o"


def test_cost_is_exact_nano_dollars() -> None:
    # 1000 prompt tokens at $2.50/M + 500 completion tokens at $10/M = $0.0075.
    assert cost_nano_usd(Price(2.5, 10.0), 1000, 500) == 7_500_000
    # Cheap models stay exact where dollars as floats would not: 0.15 * 10 + 0.6 * 10.
    assert cost_nano_usd(Price(0.15, 0.6), 10, 10) == 7_500
    assert cost_nano_usd(Price(0.035, 0.14), 1, 0) == 35
    assert to_usd(7_500_000) == 0.0075
    assert to_nano_usd(0.05) == 50_000_000


def book(**models: dict[str, object]) -> PriceBook:
    config = config_from_dict({"providers": {"p": {"type": "mock"}}, "models": models})
    return PriceBook(config.models)


def test_alias_pricing_overrides_the_table_for_its_targets() -> None:
    prices = book(
        fast={
            "targets": [{"provider": "p", "model": "gpt-4o"}],
            "pricing": {"input_per_mtok": 1.0, "output_per_mtok": 2.0},
        },
        other={"targets": [{"provider": "p", "model": "gpt-4o-mini"}], "fallbacks": ["fast"]},
    )
    assert prices.price("fast", "p", "gpt-4o", "gpt-4o-2024-08-06") == Price(1.0, 2.0)
    # The same target answering as another alias's fallback keeps its alias's price.
    assert prices.price("other", "p", "gpt-4o", "gpt-4o-2024-08-06") == Price(1.0, 2.0)
    # Other targets: the table, by the model that answered.
    assert prices.price("other", "p", "gpt-4o-mini", "gpt-4o-mini-2024-07-18") == Price(0.15, 0.6)


def test_the_answering_model_is_tried_before_the_configured_name() -> None:
    # An Azure deployment name means nothing; the model Azure reports does.
    prices = book(chat={"targets": [{"provider": "p", "model": "my-deployment"}]})
    assert prices.price("chat", "p", "my-deployment", "gpt-4o-2024-08-06") == Price(2.5, 10.0)


def test_unknown_model_costs_nothing_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    prices = book(chat={"targets": [{"provider": "p", "model": "house-model"}]})
    with caplog.at_level(logging.WARNING, logger="resillm.pricing"):
        assert prices.price("chat", "p", "house-model", "house-model") is None
        assert prices.price("chat", "p", "house-model", "house-model") is None
    warnings = [r for r in caplog.records if "house-model" in r.getMessage()]
    assert len(warnings) == 1
    assert "models.<alias>.pricing" in warnings[0].getMessage()


def test_reservations_use_the_dearest_target_of_the_alias() -> None:
    prices = book(
        chat={
            "targets": [
                {"provider": "p", "model": "gpt-4o-mini"},
                {"provider": "p", "model": "gpt-4o"},
                {"provider": "p", "model": "house-model"},
            ]
        }
    )
    assert prices.reservation_price("chat") == Price(2.5, 10.0)
    assert prices.knows("chat") and not prices.knows("nope")
