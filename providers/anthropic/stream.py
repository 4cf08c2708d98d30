"""Anthropic stream events -> OpenAI ``chat.completion.chunk``s, one stream at a time.

``message_start`` gives the first chunk (``role: assistant``, ``content: ""``) and the id,
model and input usage of the whole stream; ``text_delta`` gives content; a ``tool_use``
block start gives a tool-call delta with its 0-based tool-call index (not the content block
index), id, name and empty arguments, and its ``input_json_delta``s the argument fragments
under the same index; ``message_delta`` gives the finish chunk and the usage chunk (its
counts are cumulative, input tokens come from ``message_start``); ``message_stop`` ends it;
``event: error`` raises. ``ping``, ``content_block_stop``, thinking and other blocks'
deltas (``thinking_delta``, ``signature_delta``, ``citations_delta``) and unknown events
add nothing: an OpenAI stream has no place for them.
"""

from __future__ import annotations

import logging
import time

import msgspec

from providers.anthropic.response import (
    LeadingTrim,
    finish_reason,
    merged_usage,
    openai_usage,
    stream_error,
)
from providers.anthropic.wire import BlockView, EventView, UsageView, event_decoder
from providers.base import Chunk
from providers.sse import SSEEvent
from resillm.errors import UpstreamProtocolError
from resillm.schema import (
    ChatCompletionChunk,
    ChunkChoice,
    Delta,
    ToolCallDelta,
    ToolCallDeltaFunction,
    json_encoder,
)

logger = logging.getLogger("resillm.providers")


class StreamTranslator:
    """Feed it the SSE events of one Anthropic stream; it returns the OpenAI chunks.

    ``stopped`` turns true at ``message_stop``; ``check_complete`` raises when the stream
    ends (there or at the end of the body) without a stop reason. The usage chunk is
    always made, with ``forward`` false unless the client asked for usage.
    """

    def __init__(
        self,
        *,
        provider: str,
        model: str,
        include_usage: bool,
        prefill_suffix: str = "",
        created: int | None = None,
    ) -> None:
        self.provider = provider
        self.model = model
        self.include_usage = include_usage
        self.created = int(time.time()) if created is None else created
        self.id = ""
        self.finish: str | None = None
        self.stopped = False
        self.malformed = 0
        self._trim = LeadingTrim(prefill_suffix)
        self._tool_index: dict[int, int] = {}  # content block index -> tool-call index
        self._start_usage: UsageView | None = None

    def feed(self, event: SSEEvent) -> list[Chunk]:
        if not event.data:
            return []
        try:
            view = event_decoder.decode(event.data)
        except msgspec.DecodeError:
            # A malformed event mid-stream is skipped; the stream goes on (SPEC section 4).
            self.malformed += 1
            logger.warning(
                "skipped a malformed stream event from %s/%s: %r",
                self.provider,
                self.model,
                event.data[:200],
            )
            return []
        kind = "error" if event.event == "error" else view.type
        if kind == "error":
            raise stream_error(view.error, provider=self.provider, model=self.model)
        if kind == "message_start":
            return self._message_start(view)
        if kind not in _CONTENT_EVENTS:
            return []  # ping, content_block_stop and event types newer than this code
        if not self.id:
            raise self._protocol_error(f"'{kind}' arrived before message_start")
        if kind == "content_block_start":
            return self._block_start(view)
        if kind == "content_block_delta":
            return self._block_delta(view)
        if kind == "message_delta":
            return self._message_delta(view)
        self.stopped = kind == "message_stop" or self.stopped
        return []

    def check_complete(self) -> None:
        """Raise ``UpstreamProtocolError`` unless a stop reason arrived."""
        if self.finish is None:
            raise self._protocol_error("stream ended without a stop reason")

    # -- events ----------------------------------------------------------------------------

    def _message_start(self, view: EventView) -> list[Chunk]:
        message = view.message
        if message is None or self.id:
            return []  # a second message_start changes nothing
        self.id = "chatcmpl-" + message.id
        self.model = message.model or self.model
        self._start_usage = message.usage
        return [self._chunk(Delta(role="assistant", content=""))]

    def _block_start(self, view: EventView) -> list[Chunk]:
        block = view.content_block or BlockView(type="")
        if block.type == "text":
            return self._text(block.text or "")
        if block.type != "tool_use" or view.index is None:
            return []  # thinking, redacted thinking, server tools: not in OpenAI's format
        tool_index = len(self._tool_index)
        self._tool_index[view.index] = tool_index
        call = ToolCallDelta(
            index=tool_index,
            id=block.id,
            type="function",
            function=ToolCallDeltaFunction(name=block.name, arguments=""),
        )
        return [self._chunk(Delta(tool_calls=[call]), tool_call=True)]

    def _block_delta(self, view: EventView) -> list[Chunk]:
        delta = view.delta
        if delta is None:
            return []
        if delta.type == "text_delta":
            return self._text(delta.text or "")
        tool_index = self._tool_index.get(view.index if view.index is not None else -1)
        if delta.type != "input_json_delta" or tool_index is None or not delta.partial_json:
            return []
        function = ToolCallDeltaFunction(arguments=delta.partial_json)
        call = ToolCallDelta(index=tool_index, function=function)
        return [self._chunk(Delta(tool_calls=[call]), tool_call=True)]

    def _message_delta(self, view: EventView) -> list[Chunk]:
        stop_reason = view.delta.stop_reason if view.delta is not None else None
        if self.finish is not None or stop_reason is None:
            return []
        self.finish = finish_reason(stop_reason)
        usage = openai_usage(merged_usage(self._start_usage, view.usage))
        usage_chunk = ChatCompletionChunk(
            id=self.id,
            object="chat.completion.chunk",
            created=self.created,
            model=self.model,
            choices=[],
            usage=usage,
        )
        return [
            self._chunk(Delta(), self.finish),
            Chunk(
                json_encoder.encode(usage_chunk),
                model=self.model,
                usage=usage,
                forward=self.include_usage,
            ),
        ]

    # -- chunks ----------------------------------------------------------------------------

    def _text(self, text: str) -> list[Chunk]:
        text = self._trim(text)
        return [self._chunk(Delta(content=text), text=text)] if text else []

    def _chunk(
        self, delta: Delta, finish: str | None = None, *, text: str = "", tool_call: bool = False
    ) -> Chunk:
        body = ChatCompletionChunk(
            id=self.id,
            object="chat.completion.chunk",
            created=self.created,
            model=self.model,
            choices=[ChunkChoice(index=0, delta=delta, finish_reason=finish)],
        )
        return Chunk(
            json_encoder.encode(body),
            model=self.model,
            finish_reason=finish,
            text=text,
            tool_call=tool_call,
        )

    def _protocol_error(self, what: str) -> UpstreamProtocolError:
        return UpstreamProtocolError(
            f"{self.provider}/{self.model}: {what}", provider=self.provider, model=self.model
        )


_CONTENT_EVENTS = frozenset(
    {"content_block_start", "content_block_delta", "message_delta", "message_stop"}
)
