"""The provider interface: what the router asks of an upstream, in canonical (OpenAI) shapes.

A ``Provider`` is built once per configured provider with the shared HTTP session; it binds
each configured target (model, optional key and base URL) to an :class:`Upstream`, which
the router calls per request. Providers never see ASGI.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from resillm.schema import ChatCompletionRequest, Usage


class UpstreamCall:
    """One request to one upstream target, as the router hands it over."""

    __slots__ = ("include_usage", "raw", "request", "request_id", "stream", "stream_idle_s")

    def __init__(
        self,
        request: ChatCompletionRequest,
        raw: dict[str, Any],
        *,
        request_id: str,
        stream: bool,
        stream_idle_s: float | None = None,
    ) -> None:
        self.request = request
        self.raw = raw
        self.request_id = request_id
        self.stream = stream
        self.stream_idle_s = stream_idle_s
        options = request.stream_options
        self.include_usage = bool(options and options.include_usage)


class Completion:
    """A whole (non-stream) answer: OpenAI ``chat.completion`` JSON ready to send."""

    __slots__ = ("body", "finish_reason", "model", "usage")

    def __init__(
        self, body: bytes, model: str, usage: Usage | None, finish_reason: str | None = None
    ) -> None:
        self.body = body
        self.model = model
        self.usage = usage
        self.finish_reason = finish_reason


class Chunk:
    """One OpenAI ``chat.completion.chunk`` as JSON bytes, plus what the gateway reads of it.

    ``forward`` is false for a chunk the client must not see (the usage-only chunk resillm
    asked for when the client did not). ``text`` is the content the chunk adds to choice 0
    and ``tool_call`` says it carries a tool-call fragment: stream recovery needs both.
    """

    __slots__ = ("data", "finish_reason", "forward", "model", "text", "tool_call", "usage")

    def __init__(
        self,
        data: bytes,
        *,
        model: str = "",
        finish_reason: str | None = None,
        usage: Usage | None = None,
        forward: bool = True,
        text: str = "",
        tool_call: bool = False,
    ) -> None:
        self.data = data
        self.model = model
        self.finish_reason = finish_reason
        self.usage = usage
        self.forward = forward
        self.text = text
        self.tool_call = tool_call

    @property
    def substantial(self) -> bool:
        """Carries content, a tool call or a finish reason — not just the role. The first
        such chunk is the stream's first token: the point of no return, and where the
        between-chunks idle limit starts."""
        return bool(self.text or self.tool_call or self.finish_reason)


class ChunkStream(Protocol):
    """An open upstream stream. Iterating yields chunks; it ends only after a finish reason,
    otherwise it raises an ``UpstreamError``. ``aclose`` releases the connection at once."""

    def __aiter__(self) -> AsyncIterator[Chunk]: ...

    async def aclose(self) -> None: ...


class Upstream(Protocol):
    """A provider bound to one target (provider + model + key): what the router calls."""

    provider: str
    model: str

    async def complete(self, call: UpstreamCall) -> Completion: ...

    async def open_stream(self, call: UpstreamCall) -> ChunkStream:
        """Start a stream; return once the upstream accepted it (raise ``UpstreamError``
        otherwise). Reading the first chunk is the caller's, under its first-token timeout."""
        ...


class Provider(Protocol):
    name: str
    prefill: bool

    def bind(self, model: str, *, api_key: str | None, base_url: str | None) -> Upstream: ...

    async def aclose(self) -> None: ...
