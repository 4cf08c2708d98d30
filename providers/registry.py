"""Build the configured providers: the one place that maps a config ``type`` to an adapter."""

from __future__ import annotations

import aiohttp

from providers.base import Provider
from providers.mock import MockProvider
from providers.openai import OpenAIProvider
from resillm.config import (
    AzureProviderConfig,
    MockProviderConfig,
    OpenAICompatibleProviderConfig,
    OpenAIProviderConfig,
    ProviderConfig,
)


def build_provider(name: str, config: ProviderConfig, session: aiohttp.ClientSession) -> Provider:
    if isinstance(config, MockProviderConfig):
        return MockProvider(name, config)
    if isinstance(
        config, (OpenAIProviderConfig, AzureProviderConfig, OpenAICompatibleProviderConfig)
    ):
        return OpenAIProvider(name, config, session)
    raise TypeError(f"no adapter for provider type {type(config).__name__}")
