"""Model prices and the cost of a request (SPEC section 6).

Prices are USD per million tokens, input (prompt) and output (completion). ``models.*.pricing``
prices the targets of its alias; otherwise the built-in table below, matched by the model
name the upstream reported, then by the target's configured model name. Matching is by
prefix on a normalised name, so dated snapshots (``gpt-4o-2024-08-06``), Bedrock ids with
their version suffix (``anthropic.claude-3-5-sonnet-20240620-v1:0``) and cross-region
inference profiles (``us.anthropic.claude-...``, or their ARN) find their family's price; the
longest match wins (``gpt-4o-mini`` before ``gpt-4o``). A model found nowhere costs 0 and is
logged once as a warning: give its alias a ``pricing`` to count it.

Cached prompt tokens are priced at the full input price (an upper bound: providers bill
them at a discount). Costs are whole nano-dollars (1e-9 USD), rounded to the nearest, so
budget arithmetic is exact integer arithmetic everywhere, Redis included.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Mapping
from typing import NamedTuple

from resillm.config import ModelConfig
from resillm.schema import Usage

logger = logging.getLogger("resillm.pricing")
NANO_USD_PER_USD = 1_000_000_000


class Price(NamedTuple):
    input_per_mtok: float
    output_per_mtok: float


# Published list prices (USD per 1M tokens, on-demand, standard tier) as of 2025. Bedrock
# Claude models cost what Anthropic charges, so Bedrock's ``anthropic.`` ids share entries.
BUILTIN_PRICES: Mapping[str, Price] = {
    # OpenAI
    "gpt-4o": Price(2.50, 10.00),
    "gpt-4o-2024-05-13": Price(5.00, 15.00),
    "gpt-4o-mini": Price(0.15, 0.60),
    "gpt-4.1": Price(2.00, 8.00),
    "gpt-4.1-mini": Price(0.40, 1.60),
    "gpt-4.1-nano": Price(0.10, 0.40),
    "gpt-4-turbo": Price(10.00, 30.00),
    "gpt-4": Price(30.00, 60.00),
    "gpt-3.5-turbo": Price(0.50, 1.50),
    "gpt-5": Price(1.25, 10.00),
    "gpt-5-mini": Price(0.25, 2.00),
    "gpt-5-nano": Price(0.05, 0.40),
    "o1": Price(15.00, 60.00),
    "o1-mini": Price(1.10, 4.40),
    "o1-pro": Price(150.00, 600.00),
    "o3": Price(2.00, 8.00),
    "o3-mini": Price(1.10, 4.40),
    "o4-mini": Price(1.10, 4.40),
    # Anthropic (and Bedrock's anthropic.* ids)
    "claude-opus-4-1": Price(15.00, 75.00),
    "claude-opus-4": Price(15.00, 75.00),
    "claude-sonnet-4-5": Price(3.00, 15.00),
    "claude-sonnet-4": Price(3.00, 15.00),
    "claude-haiku-4-5": Price(1.00, 5.00),
    "claude-3-7-sonnet": Price(3.00, 15.00),
    "claude-3-5-sonnet": Price(3.00, 15.00),
    "claude-3-5-haiku": Price(0.80, 4.00),
    "claude-3-opus": Price(15.00, 75.00),
    "claude-3-sonnet": Price(3.00, 15.00),
    "claude-3-haiku": Price(0.25, 1.25),
    # Bedrock: Meta Llama
    "meta.llama3-8b-instruct": Price(0.30, 0.60),
    "meta.llama3-70b-instruct": Price(2.65, 3.50),
    "meta.llama3-1-8b-instruct": Price(0.22, 0.22),
    "meta.llama3-1-70b-instruct": Price(0.72, 0.72),
    "meta.llama3-1-405b-instruct": Price(2.40, 2.40),
    "meta.llama3-2-1b-instruct": Price(0.10, 0.10),
    "meta.llama3-2-3b-instruct": Price(0.15, 0.15),
    "meta.llama3-2-11b-instruct": Price(0.16, 0.16),
    "meta.llama3-2-90b-instruct": Price(0.72, 0.72),
    "meta.llama3-3-70b-instruct": Price(0.72, 0.72),
    "meta.llama4-scout-17b-instruct": Price(0.17, 0.66),
    "meta.llama4-maverick-17b-instruct": Price(0.24, 0.97),
    # Bedrock: Amazon
    "amazon.nova-micro": Price(0.035, 0.14),
    "amazon.nova-lite": Price(0.06, 0.24),
    "amazon.nova-pro": Price(0.80, 3.20),
    "amazon.nova-premier": Price(2.50, 12.50),
    "amazon.titan-text-lite": Price(0.15, 0.20),
    "amazon.titan-text-express": Price(0.20, 0.60),
    "amazon.titan-text-premier": Price(0.50, 1.50),
    # Bedrock: Mistral
    "mistral.mistral-7b-instruct": Price(0.15, 0.20),
    "mistral.mixtral-8x7b-instruct": Price(0.45, 0.70),
    "mistral.mistral-small-2402": Price(1.00, 3.00),
    "mistral.mistral-large-2402": Price(4.00, 12.00),
    "mistral.mistral-large-2407": Price(2.00, 6.00),
}

# Bedrock cross-region inference profiles put a geography before the model id.
_REGION_PREFIX_RE = re.compile(r"^(?:us|eu|apac|global|us-gov|jp|au|ca)\.(?=[a-z0-9-]+\.)")
_DOTTED_VERSION_RE = re.compile(r"(?<=\d)\.(?=\d)")
# What may follow a table key inside a longer name: a date, a version or a tag, not more of
# a name ("gpt-4" must not price "gpt-4.5-preview").
_BOUNDARY = frozenset("-:@_/")


def normalise_model(name: str) -> str:
    """``us.anthropic.claude-3-5-sonnet-20241022-v2:0`` -> ``claude-3-5-sonnet-20241022-v2:0``.

    Lower case; an ARN or ``vendor/`` path reduced to its last segment; a Bedrock region
    prefix and Bedrock's ``anthropic.`` vendor prefix dropped; ``claude-3.5`` spelled
    ``claude-3-5`` as Anthropic does.
    """
    name = name.strip().lower().rsplit("/", 1)[-1]
    name = _REGION_PREFIX_RE.sub("", name)
    name = name.removeprefix("anthropic.")
    if "claude" in name:
        name = _DOTTED_VERSION_RE.sub("-", name)
    return name


@functools.lru_cache(maxsize=1024)
def builtin_price(model: str) -> Price | None:
    """The built-in price of ``model`` (longest matching family), or ``None``; looked up
    once per model name, not once per request."""
    name = normalise_model(model)
    best: str | None = None
    for key in BUILTIN_PRICES:
        matches = name.startswith(key) and (len(name) == len(key) or name[len(key)] in _BOUNDARY)
        if matches and (best is None or len(key) > len(best)):
            best = key
    return BUILTIN_PRICES[best] if best is not None else None


def cost_nano_usd(price: Price, prompt_tokens: int, completion_tokens: int) -> int:
    """Cost in whole nano-dollars (USD per million tokens = nano-USD per thousandth token)."""
    nano = prompt_tokens * price.input_per_mtok + completion_tokens * price.output_per_mtok
    return round(nano * 1000)


def usage_cost_nano_usd(price: Price, usage: Usage) -> int:
    return cost_nano_usd(price, usage.prompt_tokens, usage.completion_tokens)


def to_usd(nano_usd: int) -> float:
    # A correctly rounded division: the float nearest n / 10^9, which prints as that
    # decimal (no rounding needed).
    return nano_usd / NANO_USD_PER_USD


def to_nano_usd(usd: float) -> int:
    return round(usd * NANO_USD_PER_USD)


class PriceBook:
    """Prices for one config: the aliases' ``pricing`` overrides, then the built-in table.

    Built per config (a reload brings new overrides). An unknown model is warned about once
    per price book, i.e. once per config.
    """

    def __init__(self, models: Mapping[str, ModelConfig]) -> None:
        self._alias_price: dict[str, Price] = {}
        self._alias_targets: dict[str, list[tuple[str, str]]] = {}
        self._target_price: dict[tuple[str, str], Price] = {}
        for alias, model in models.items():
            targets = [(t.provider, t.model) for t in model.targets]
            self._alias_targets[alias] = targets
            if model.pricing is not None:
                price = Price(model.pricing.input_per_mtok, model.pricing.output_per_mtok)
                self._alias_price[alias] = price
                for target in targets:
                    self._target_price.setdefault(target, price)
        self._warned: set[str] = set()

    def knows(self, alias: str) -> bool:
        return alias in self._alias_targets

    def price(
        self, alias: str | None, provider: str | None, model: str | None, answered: str | None
    ) -> Price | None:
        """The price of a call to ``provider``/``model`` made for ``alias``, whose answer
        named ``answered`` as its model. ``None`` (and one warning) when unknown."""
        target = (provider or "", model or "")
        if alias in self._alias_price and target in self._alias_targets.get(alias, ()):
            return self._alias_price[alias]
        if target in self._target_price:
            return self._target_price[target]
        for name in (answered, model):
            if name:
                found = builtin_price(name)
                if found is not None:
                    return found
        if alias in self._alias_price:  # the answering target is not known: the alias's price
            return self._alias_price[alias]
        self._warn_unknown(answered or model or alias or "?")
        return None

    def reservation_price(self, alias: str) -> Price | None:
        """The price a reservation for ``alias`` is made at: the dearest of its targets whose
        price is known, so a balancer or a fallback within the alias cannot outspend it."""
        if alias in self._alias_price:
            return self._alias_price[alias]
        known = [
            p
            for provider, model in self._alias_targets.get(alias, ())
            if (p := self._target_price.get((provider, model)) or builtin_price(model))
        ]
        return max(known, key=lambda p: p.input_per_mtok + p.output_per_mtok, default=None)

    def _warn_unknown(self, model: str) -> None:
        if model in self._warned:
            return
        self._warned.add(model)
        logger.warning(
            "no price known for model %r: its requests count as costing 0 against budgets; "
            "set models.<alias>.pricing to count them",
            model,
        )
