"""Build the configured providers: the one place that maps a config ``type`` to an adapter.

Adapters with heavy dependencies (botocore) are imported only when configured, so a
gateway that does not use them does not pay their import time or memory.
"""

from __future__ import annotations

import aiohttp

from providers.base import Provider
from providers.mock import MockProvider
from providers.openai import OpenAIProvider
from resillm.config import (
    AnthropicProviderConfig,
    AzureProviderConfig,
    BedrockProviderConfig,
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
    if isinstance(config, AnthropicProviderConfig):
        from providers.anthropic import AnthropicProvider

        return AnthropicProvider(name, config, session)
    if isinstance(config, BedrockProviderConfig):
        from providers.bedrock import BedrockProvider

        return BedrockProvider(name, config, session)
    raise TypeError(f"no adapter for provider type {type(config).__name__}")
