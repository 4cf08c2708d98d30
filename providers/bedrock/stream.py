"""ConverseStream: AWS event-stream frames -> OpenAI chunks.

The body (``application/vnd.amazon.eventstream``) is a sequence of binary frames: prelude,
headers, payload, CRCs. botocore's ``EventStreamBuffer`` decodes them as bytes arrive and
checks both CRCs. Each frame's ``:event-type`` names one ConverseStream event:

    messageStart        -> nothing yet: the role rides on the first content chunk
    contentBlockStart   -> a tool call begins: its id and name (text blocks have no start)
    contentBlockDelta   -> text, or a fragment of a tool call's JSON arguments
    contentBlockStop    -> nothing to send
    messageStop         -> the finish chunk (stopReason -> finish_reason)
    metadata            -> usage, after the stop: the usage chunk; the stream is complete

Holding the role back until there is content keeps "the first chunk" meaning the first
token: a failure between messageStart and the first token can still be retried or fall
back before the client's response starts, and time-to-first-token measures a token.

A frame with ``:message-type`` ``exception`` (throttlingException, modelStreamErrorException,
...) fails the stream with the status that exception maps to.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable, Mapping
from typing import Any, cast

import aiohttp
import msgspec
from botocore.eventstream import EventStreamBuffer, EventStreamMessage, ParserError

from providers.base import Chunk, UpstreamCall
from providers.bedrock.response import (
    bedrock_error,
    completion_id,
    error_message,
    error_type_of,
    finish_reason,
    to_usage,
)
from providers.bedrock.wire import (
    ContentBlockDeltaEvent,
    ContentBlockStartEvent,
    MessageStopEvent,
    MetadataEvent,
)
from providers.stream import UpstreamChunkStream
from resillm.schema import (
    ChatCompletionChunk,
    ChunkChoice,
    Delta,
    ToolCallDelta,
    ToolCallDeltaFunction,
    Usage,
    json_encoder,
)

logger = logging.getLogger("resillm.providers")

_start_decoder = msgspec.json.Decoder(ContentBlockStartEvent)
_delta_decoder = msgspec.json.Decoder(ContentBlockDeltaEvent)
_stop_decoder = msgspec.json.Decoder(MessageStopEvent)
_metadata_decoder = msgspec.json.Decoder(MetadataEvent)


class StreamTranslator:
    """Turns decoded ConverseStream events into OpenAI chunks; holds one stream's state.

    Tool calls are numbered from 0 in the order they start (OpenAI's ``index``), apart
    from Bedrock's content block index, which counts text blocks too.
    """

    def __init__(
        self,
        model: str,
        *,
        request_id: str | None = None,
        include_usage: bool = False,
        strip_leading_whitespace: bool = False,
    ) -> None:
        self.model = model
        self.id = completion_id(request_id)
        self.created = int(time.time())
        self.include_usage = include_usage
        self._strip = strip_leading_whitespace
        self._role_sent = False
        self._tools: dict[int, int] = {}  # content block index -> tool call index
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.complete = False  # metadata (usage) arrived: nothing more will come

    def on_event(self, event_type: str, payload: bytes) -> Chunk | None:
        """The chunk for one event, or ``None``; raises ``msgspec.DecodeError``."""
        if event_type == "messageStart":
            return None
        if event_type == "contentBlockStart":
            return self._on_block_start(_start_decoder.decode(payload))
        if event_type == "contentBlockDelta":
            return self._on_block_delta(_delta_decoder.decode(payload))
        if event_type == "messageStop":
            stop = _stop_decoder.decode(payload)
            self.finish_reason = finish_reason(stop.stop_reason)
            delta = Delta() if self._role_sent else Delta(role="assistant", content="")
            self._role_sent = True
            return self._chunk(ChunkChoice(index=0, delta=delta, finish_reason=self.finish_reason))
        if event_type == "metadata":
            return self._on_metadata(_metadata_decoder.decode(payload))
        return None  # contentBlockStop, and events resillm does not translate

    def _on_block_start(self, event: ContentBlockStartEvent) -> Chunk | None:
        use = event.start.tool_use
        if use is None:
            return None
        self._strip = False
        index = self._tool_index(event.content_block_index)
        call = ToolCallDelta(
            index=index,
            id=use.tool_use_id,
            type="function",
            function=ToolCallDeltaFunction(name=use.name, arguments=""),
        )
        return self._delta(Delta(tool_calls=[call]), tool_call=True)

    def _on_block_delta(self, event: ContentBlockDeltaEvent) -> Chunk | None:
        delta = event.delta
        if delta.text is not None:
            text = delta.text
            if self._strip:
                text = text.lstrip()
                if not text:
                    return None
                self._strip = False
            return self._delta(Delta(content=text), text=text)
        if delta.tool_use is not None:
            index = self._tool_index(event.content_block_index)
            fragment = ToolCallDeltaFunction(arguments=delta.tool_use.input)
            call = ToolCallDelta(index=index, function=fragment)
            return self._delta(Delta(tool_calls=[call]), tool_call=True)
        return None  # reasoning, citations: not part of the OpenAI answer

    def _on_metadata(self, event: MetadataEvent) -> Chunk | None:
        self.complete = True
        self.usage = to_usage(event.usage)
        if self.usage is None:
            return None
        body = ChatCompletionChunk(
            id=self.id,
            object="chat.completion.chunk",
            created=self.created,
            model=self.model,
            choices=[],
            usage=self.usage,
        )
        return Chunk(
            json_encoder.encode(body),
            model=self.model,
            usage=self.usage,
            forward=self.include_usage,
        )

    def _tool_index(self, block: int) -> int:
        index = self._tools.get(block)
        if index is None:
            index = self._tools[block] = len(self._tools)
        return index

    def _delta(self, delta: Delta, *, text: str = "", tool_call: bool = False) -> Chunk:
        if not self._role_sent:
            self._role_sent = True
            delta.role = "assistant"
        choice = ChunkChoice(index=0, delta=delta, finish_reason=None)
        return self._chunk(choice, text=text, tool_call=tool_call)

    def _chunk(self, choice: ChunkChoice, *, text: str = "", tool_call: bool = False) -> Chunk:
        body = ChatCompletionChunk(
            id=self.id,
            object="chat.completion.chunk",
            created=self.created,
            model=self.model,
            choices=[choice],
        )
        return Chunk(
            json_encoder.encode(body),
            model=self.model,
            finish_reason=choice.finish_reason,
            text=text,
            tool_call=tool_call,
        )


class BedrockChunkStream(UpstreamChunkStream):
    """A ConverseStream answer: AWS event-stream frames decoded with botocore, one event a
    frame; it ends after the usage (or after the stop and the end of the body)."""

    ENDED_UNFINISHED = "stream ended without a stop reason"

    def __init__(
        self,
        *,
        provider: str,
        model: str,
        response: aiohttp.ClientResponse,
        call: UpstreamCall,
        translator: StreamTranslator,
        release: Callable[[], Any],
        secret: str | None = None,
    ) -> None:
        super().__init__(
            response, provider=provider, model=model, idle_s=call.stream_idle_s, release=release
        )
        self._translator = translator
        self._secret = secret
        self._buffer = EventStreamBuffer()

    def end(self, *, reuse: bool = True) -> None:
        # Reuse the connection only after the last frame (metadata) was read.
        super().end(reuse=reuse and self._translator.complete)

    def consume(self, data: bytes) -> None:
        if not data:
            return  # the base class ends the stream: whole if the stop went by
        self._buffer.add_data(data)
        try:
            for message in self._buffer:
                self._on_message(message)
                if self.ended:
                    return
        except (ParserError, ValueError, KeyError, struct.error) as exc:
            # botocore checks the CRCs, then parses headers unguarded: an unknown header
            # type (KeyError), a name not UTF-8 (ValueError), headers cut short (struct).
            self.fail(self.protocol_error(f"unreadable event-stream frame: {exc!r}"))

    def _on_message(self, message: EventStreamMessage) -> None:
        # botocore-stubs types these headers as an int; they are a dict of name to value.
        headers = cast(Mapping[str, Any], message.headers)
        kind = headers.get(":message-type", "event")
        if kind == "exception":
            self._fail_with(headers.get(":exception-type"), message.payload)
            return
        if kind == "error":
            code = headers.get(":error-code")
            self.fail(
                bedrock_error(
                    502,
                    str(code) if code else None,
                    str(headers.get(":error-message") or "stream error"),
                    provider=self.provider,
                    model=self.model,
                    secret=self._secret,
                )
            )
            return
        event_type = str(headers.get(":event-type", ""))
        try:
            chunk = self._translator.on_event(event_type, message.payload)
        except (msgspec.DecodeError, msgspec.ValidationError):
            # A malformed event mid-stream is skipped; the stream goes on (SPEC section 4).
            self.malformed += 1
            logger.warning(
                "skipped a malformed %s event from %s/%s: %r",
                event_type,
                self.provider,
                self.model,
                message.payload[:200],
            )
            return
        if chunk is not None:
            self.push(chunk)
        if self._translator.complete:
            self.end()

    def _fail_with(self, exception_type: Any, payload: bytes) -> None:
        text, body_type = error_message(payload)
        name = error_type_of({}, str(exception_type) if exception_type else body_type)
        self.fail(
            bedrock_error(
                502, name, text, provider=self.provider, model=self.model, secret=self._secret
            )
        )
