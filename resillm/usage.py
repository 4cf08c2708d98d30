"""Token usage arithmetic and the estimate used where an upstream never reported usage."""

from __future__ import annotations

import math

from resillm.schema import ChatCompletionRequest, Usage

CHARS_PER_TOKEN = 4.0  # the usual rule of thumb for English text with BPE tokenizers


def estimate_tokens(chars: int) -> int:
    return math.ceil(chars / CHARS_PER_TOKEN) if chars > 0 else 0


def prompt_chars(request: ChatCompletionRequest) -> int:
    """Characters of text in the request's messages (parts other than text count 0)."""
    total = 0
    for message in request.messages:
        content = getattr(message, "content", None)
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(getattr(part, "text", "")) for part in content)
    return total


def add_usage(total: Usage | None, more: Usage) -> Usage:
    if total is None:
        return more
    return Usage(
        prompt_tokens=total.prompt_tokens + more.prompt_tokens,
        completion_tokens=total.completion_tokens + more.completion_tokens,
        total_tokens=total.total_tokens + more.total_tokens,
    )
