"""Anthropic Messages API provider: exact translation to and from OpenAI Chat Completions.

- :mod:`wire`: the Anthropic wire format as msgspec Structs.
- :mod:`request`: ``to_anthropic`` (what is translated, what is refused with a 400, why).
- :mod:`response`: ``from_anthropic``, finish reasons, usage, error mapping.
- :mod:`stream`: ``StreamTranslator``, one stream's events to OpenAI chunks.
- :mod:`provider`: ``AnthropicProvider`` and its HTTP upstream.
"""

from __future__ import annotations

from providers.anthropic.provider import AnthropicProvider, AnthropicUpstream
from providers.anthropic.request import to_anthropic
from providers.anthropic.response import from_anthropic
from providers.anthropic.stream import StreamTranslator

__all__ = [
    "AnthropicProvider",
    "AnthropicUpstream",
    "StreamTranslator",
    "from_anthropic",
    "to_anthropic",
]
