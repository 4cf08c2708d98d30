"""What the mock says: deterministic text, or a tool call, independent of the wire format.

The same request always gets the same answer, so a gateway test can restart a request on
another target and check that the restart reproduces the text already sent. A trailing
assistant message that is a prefix of the answer is continued from where it stops, as a
model that accepts prefill would do.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Literal

FinishReason = Literal["stop", "length", "tool_calls"]

_WORDS = (
    "resilient gateway stream token retry circuit breaker fallback budget cache latency "
    "upstream provider model answer chunk request response window jitter backoff target "
    "router signal quiet steady bright river mountain lantern harbor meadow orbit pebble "
    "summit thunder velvet willow amber cobalt ember falcon glacier horizon island jasmine "
    "kernel lattice marble nimbus onyx prism quartz raven saffron tundra umber vertex"
).split()

_TOOL_ARGUMENTS = '{"city": "Paris"}'
_TOOL_ARGUMENT_FRAGMENTS = ('{"city', '": "Pa', 'ris"}')
_TOOL_TRIGGER = "weather"


@dataclass(frozen=True)
class Prompt:
    """The parts of a request, in either API, that shape the answer."""

    model: str
    text_chars: int
    last_user_text: str
    last_is_user: bool
    prefill: str | None
    first_tool: str | None
    max_tokens: int | None
    stream: bool
    include_usage: bool

    @property
    def prompt_tokens(self) -> int:
        return max(1, self.text_chars // 4)


@dataclass(frozen=True)
class ToolCall:
    id_suffix: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Answer:
    """Content pieces in stream order (text or tool-call argument fragments)."""

    pieces: tuple[str, ...]
    finish_reason: FinishReason
    prompt_tokens: int
    tool_call: ToolCall | None = None

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def completion_tokens(self) -> int:
        return len(self.pieces)


def compose_answer(prompt: Prompt, chunks: int) -> Answer:
    """The answer to `prompt`: a tool call when asked about weather with tools, else text."""
    digest = hashlib.blake2b(prompt.last_user_text.encode(), digest_size=8).digest()
    wants_tool = prompt.last_is_user and _TOOL_TRIGGER in prompt.last_user_text.lower()
    if prompt.first_tool is not None and wants_tool:
        call = ToolCall(digest.hex(), prompt.first_tool, _TOOL_ARGUMENTS)
        return Answer(_TOOL_ARGUMENT_FRAGMENTS, "tool_calls", prompt.prompt_tokens, call)
    rng = random.Random(int.from_bytes(digest, "big"))
    words = [rng.choice(_WORDS) for _ in range(chunks)]
    pieces = [words[0].capitalize(), *(" " + word for word in words[1:])]
    if prompt.prefill:
        pieces = _continue_after(pieces, prompt.prefill)
    if prompt.max_tokens is not None and prompt.max_tokens < len(pieces):
        return Answer(tuple(pieces[: max(prompt.max_tokens, 0)]), "length", prompt.prompt_tokens)
    return Answer(tuple(pieces), "stop", prompt.prompt_tokens)


def _continue_after(pieces: list[str], prefill: str) -> list[str]:
    """The pieces that follow `prefill`, or all of them when it is not a prefix of the text."""
    if not "".join(pieces).startswith(prefill):
        return pieces
    rest: list[str] = []
    consumed = 0
    for piece in pieces:
        start = consumed
        consumed += len(piece)
        if consumed <= len(prefill):
            continue
        rest.append(piece[max(len(prefill) - start, 0) :])
    return rest
