"""The in-process ``mock`` provider: deterministic answers, no network, injectable failures.

It answers like an OpenAI upstream (same chunk sequence, usage on request) so demos and
tests exercise the same gateway paths as a real provider. ``fail_rate`` draws from a
``random.Random(seed)``, so a seeded demo fails the same way every run.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence

from providers.base import Chunk, ChunkStream, Completion, UpstreamCall
from resillm.config import MockProviderConfig
from resillm.errors import UpstreamStatusError
from resillm.schema import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    Message,
    ResponseMessage,
    Usage,
    json_encoder,
)

WORDS = (
    "resilient gateways keep answers flowing when providers stumble retries back off "
    "circuits open and close fallbacks take over budgets hold caches remember streams "
    "arrive token by token"
).split()
CHARS_PER_TOKEN = 4
_PIECE_RE = re.compile(r"\s*\S+")


class MockProvider:
    def __init__(self, name: str, config: MockProviderConfig) -> None:
        self.name = name
        self.config = config
        self.prefill = config.prefill if config.prefill is not None else True
        self.random = random.Random(config.seed)

    def bind(self, model: str, *, api_key: str | None, base_url: str | None) -> MockUpstream:
        return MockUpstream(self, model)

    async def aclose(self) -> None:
        return None


def answer_pieces(request: ChatCompletionRequest, count: int) -> list[str]:
    """The same request always gets the same words, one piece per chunk ("w0", " w1", ...).

    A trailing assistant message is a prefill: the answer is the one the conversation
    before it gets, continued after the prefill (the mock accepts prefill, as Claude does).
    """
    messages = request.messages
    prefill = None
    if messages and isinstance(messages[-1], AssistantMessage):
        last = messages[-1].content
        prefill = last if isinstance(last, str) else None
        messages = messages[:-1]
    seed = hashlib.blake2b(prompt_text(messages).encode(), digest_size=4).digest()
    start = int.from_bytes(seed, "big")
    words = [WORDS[(start + i * 7) % len(WORDS)] for i in range(count)]
    text = " ".join(words)
    if prefill is not None and text.startswith(prefill):
        text = text[len(prefill) :]
    return _PIECE_RE.findall(text)


def prompt_text(messages: Sequence[Message]) -> str:
    parts: list[str] = []
    for message in messages:
        content = getattr(message, "content", None)
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(getattr(part, "text", "") for part in content)
    return "\n".join(parts)


class MockUpstream:
    def __init__(self, owner: MockProvider, model: str) -> None:
        self.provider = owner.name
        self.model = model
        self._owner = owner

    def _maybe_fail(self) -> None:
        config = self._owner.config
        if config.fail_rate and self._owner.random.random() < config.fail_rate:
            raise UpstreamStatusError(
                config.fail_status,
                f"mock provider {self.provider} failed on purpose (fail_rate {config.fail_rate})",
                error_type="upstream_error",
                provider=self.provider,
                model=self.model,
            )

    def _plan(self, request: ChatCompletionRequest) -> tuple[list[str], str, Usage]:
        count = self._owner.config.chunks
        limit = request.token_limit
        finish = "stop"
        if limit is not None and limit < count:
            count, finish = limit, "length"
        words = answer_pieces(request, count)
        prompt_tokens = max(1, len(prompt_text(request.messages)) // CHARS_PER_TOKEN)
        usage = Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=len(words),
            total_tokens=prompt_tokens + len(words),
        )
        return words, finish, usage

    async def complete(self, call: UpstreamCall) -> Completion:
        config = self._owner.config
        if config.latency:
            await asyncio.sleep(config.latency)
        self._maybe_fail()
        words, finish, usage = self._plan(call.request)
        answer = ChatCompletion(
            id=f"chatcmpl-mock-{call.request_id}",
            created=int(time.time()),
            object="chat.completion",
            model=self.model,
            choices=[
                Choice(
                    index=0,
                    message=ResponseMessage(role="assistant", content="".join(words)),
                    finish_reason=finish,
                    logprobs=None,
                )
            ],
            usage=usage,
        )
        return Completion(json_encoder.encode(answer), self.model, usage, finish)

    async def open_stream(self, call: UpstreamCall) -> ChunkStream:
        config = self._owner.config
        if config.latency:
            await asyncio.sleep(config.latency)
        self._maybe_fail()
        return MockChunkStream(self, call)


class MockChunkStream:
    def __init__(self, upstream: MockUpstream, call: UpstreamCall) -> None:
        self._upstream = upstream
        self._call = call
        self._iterator = self._generate()

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self._iterator

    async def _generate(self) -> AsyncGenerator[Chunk, None]:
        upstream, call = self._upstream, self._call
        delay = upstream._owner.config.chunk_delay
        words, finish, usage = upstream._plan(call.request)
        created = int(time.time())
        chunk_id = f"chatcmpl-mock-{call.request_id}"

        def chunk(delta: Delta, finish_reason: str | None = None) -> Chunk:
            body = ChatCompletionChunk(
                id=chunk_id,
                object="chat.completion.chunk",
                created=created,
                model=upstream.model,
                choices=[ChunkChoice(index=0, delta=delta, finish_reason=finish_reason)],
            )
            return Chunk(
                json_encoder.encode(body),
                model=upstream.model,
                finish_reason=finish_reason,
                text=delta.content or "",
            )

        yield chunk(Delta(role="assistant", content=""))
        for word in words:
            if delay:
                await asyncio.sleep(delay)
            yield chunk(Delta(content=word))
        yield chunk(Delta(), finish)
        usage_chunk = ChatCompletionChunk(
            id=chunk_id,
            object="chat.completion.chunk",
            created=created,
            model=upstream.model,
            choices=[],
            usage=usage,
        )
        yield Chunk(
            json_encoder.encode(usage_chunk),
            model=upstream.model,
            usage=usage,
            forward=call.include_usage,
        )

    async def aclose(self) -> None:
        await self._iterator.aclose()
