"""A cached answer: what is stored, how it is assembled from a response, how it is replayed.

One canonical shape (:class:`CachedAnswer`) serves both kinds of client: it is assembled
from a JSON answer or from the SSE chunks of a stream as they pass by, and replayed as a
``chat.completion`` JSON body or as a synthesised ``chat.completion.chunk`` stream, whichever
the client asked for. Stored compactly with ``msgspec.msgpack`` (structs as arrays); a JSON
answer is stored as its body (:class:`CachedBody`), in memory as the object itself.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import msgspec

from resillm.schema import (
    ChatCompletion,
    ChatCompletionChunk,
    Choice,
    ChunkChoice,
    Delta,
    FunctionCall,
    ResponseMessage,
    ToolCall,
    ToolCallDelta,
    ToolCallDeltaFunction,
    Usage,
    json_encoder,
)

# A cached text is replayed in pieces of at most this many characters: a few SSE events,
# not one per token (nothing is gained by dribbling out an answer that is already whole).
REPLAY_CHUNK_CHARS = 1024
DONE_EVENT = b"data: [DONE]\n\n"


class CachedToolCall(msgspec.Struct, array_like=True):
    id: str
    name: str
    arguments: str


class CachedChoice(msgspec.Struct, array_like=True):
    index: int
    content: str | None
    tool_calls: list[CachedToolCall] | None
    refusal: str | None
    finish_reason: str


class CachedAnswer(msgspec.Struct, array_like=True, tag="a"):
    """A complete, successful answer: enough to rebuild the JSON or the stream."""

    model: str  # the upstream model that produced it
    provider: str
    choices: list[CachedChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CachedBody(msgspec.Struct, array_like=True, tag="b"):
    """A JSON answer stored as the upstream's body, read only when it is served: most
    answers are stored and never asked for again, so they are not decoded to be stored."""

    model: str  # the upstream model, where the body does not say
    provider: str
    body: bytes


Stored = CachedAnswer | CachedBody
answer_encoder = msgspec.msgpack.Encoder()
answer_decoder = msgspec.msgpack.Decoder(Stored)


def readable(stored: Stored) -> CachedAnswer | None:
    """The answer a stored entry holds; ``None`` when a stored body is not a complete answer
    (then it is as good as absent)."""
    if isinstance(stored, CachedAnswer):
        return stored
    recorder = AnswerRecorder(stream=False)
    recorder.feed(stored.body)
    return recorder.answer(provider=stored.provider, model=stored.model)


# -- assembly ------------------------------------------------------------------------------
# Lenient views of what passes through: unknown fields skipped, nothing re-encoded.


class _FunctionView(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _ToolCallView(msgspec.Struct):
    index: int = 0
    id: str | None = None
    function: _FunctionView | None = None


class _MessageView(msgspec.Struct):
    content: str | None = None
    tool_calls: list[_ToolCallView] | None = None
    refusal: str | None = None


class _ChoiceView(msgspec.Struct):
    index: int = 0
    message: _MessageView | None = None
    delta: _MessageView | None = None
    finish_reason: str | None = None


class _BodyView(msgspec.Struct):
    model: str = ""
    choices: list[_ChoiceView] = []
    usage: Usage | None = None
    system_fingerprint: str | None = None
    error: object = None


_view_decoder = msgspec.json.Decoder(_BodyView)


class _ToolParts:
    __slots__ = ("arguments", "id", "name")

    def __init__(self) -> None:
        self.id = ""
        self.name = ""
        self.arguments: list[str] = []


class _ChoiceParts:
    __slots__ = ("content", "finish_reason", "refusal", "tools")

    def __init__(self) -> None:
        self.content: list[str] | None = None
        self.refusal: list[str] | None = None
        self.tools: dict[int, _ToolParts] = {}
        self.finish_reason: str | None = None

    def add(self, message: _MessageView, *, stream: bool) -> None:
        # Appended in place: a copy per fragment would make a long answer quadratic.
        if message.content is not None:
            if self.content is None:
                self.content = [message.content]
            else:
                self.content.append(message.content)
        if message.refusal is not None:
            if self.refusal is None:
                self.refusal = [message.refusal]
            else:
                self.refusal.append(message.refusal)
        if not message.tool_calls:
            return
        for position, call in enumerate(message.tool_calls):
            # A whole message lists its calls in order; stream fragments carry their index.
            parts = self.tools.setdefault(call.index if stream else position, _ToolParts())
            # Concatenated as the openai SDK does: id and name come whole, in the first one.
            parts.id += call.id or ""
            if call.function is not None:
                parts.name += call.function.name or ""
                if call.function.arguments:
                    parts.arguments.append(call.function.arguments)

    def choice(self, index: int) -> CachedChoice | None:
        if self.finish_reason is None:
            return None  # never finished: not a complete answer
        tools = [
            CachedToolCall(t.id, t.name, "".join(t.arguments))
            for _, t in sorted(self.tools.items())
        ]
        return CachedChoice(
            index=index,
            content=None if self.content is None else "".join(self.content),
            tool_calls=tools or None,
            refusal=None if self.refusal is None else "".join(self.refusal),
            finish_reason=self.finish_reason,
        )


class AnswerRecorder:
    """Builds a :class:`CachedAnswer` from the body messages of a response as they pass.

    ``feed`` every body the client is sent; ``answer`` gives the answer once the response
    is over, or ``None`` when it is not a complete success (an error event, a stream cut
    before ``[DONE]``, a choice without a finish reason, a body it cannot read).
    """

    __slots__ = (
        "_body",
        "_choices",
        "_done",
        "_failed",
        "_fingerprint",
        "_model",
        "_usage",
        "stream",
        "succeeded",
    )

    def __init__(self, *, stream: bool) -> None:
        self.stream = stream
        self.succeeded = False  # the response started with status 200 (set by its feeder)
        self._body: list[bytes] = []
        self._choices: dict[int, _ChoiceParts] = {}
        self._model = ""
        self._usage: Usage | None = None
        self._fingerprint: str | None = None
        self._done = False
        self._failed = False

    def feed(self, body: bytes) -> None:
        if self._failed or not body:
            return
        if not self.stream:
            self._body.append(body)
            return
        for event in body.split(b"\n\n"):
            if event.startswith(b"data: ") and b"\n" not in event:
                self._data(event[6:])  # what the relay sends: one line, one event
            elif event.strip():
                self._event(event)

    def _event(self, event: bytes) -> None:
        self._data(
            b"\n".join(
                line[5:].removeprefix(b" ")
                for line in event.splitlines()
                if line.startswith(b"data:")
            )
        )

    def _data(self, data: bytes) -> None:
        if not data:
            return  # a comment or keep-alive
        if data == b"[DONE]":
            self._done = True
        elif self._done:
            self._failed = True  # nothing may follow [DONE]
        else:
            self._add(data, stream=True)

    def _add(self, data: bytes, *, stream: bool) -> None:
        try:
            view = _view_decoder.decode(data)
        except msgspec.DecodeError:
            self._failed = True
            return
        if view.error is not None:
            self._failed = True
            return
        self._model = view.model or self._model
        self._usage = view.usage or self._usage
        self._fingerprint = view.system_fingerprint or self._fingerprint
        for choice in view.choices:
            parts = self._choices.get(choice.index)
            if parts is None:  # not setdefault: that would build a spare one per chunk
                parts = self._choices[choice.index] = _ChoiceParts()
            message = choice.delta if stream else choice.message
            if message is not None:
                parts.add(message, stream=stream)
            parts.finish_reason = choice.finish_reason or parts.finish_reason

    def answer(
        self, *, provider: str, model: str | None = None, usage: Usage | None = None
    ) -> CachedAnswer | None:
        """The whole answer; ``model``/``usage`` fill in what the body did not say (a stream
        whose usage chunk the client did not ask for)."""
        if not self.stream and self._body and not self._failed:
            self._add(b"".join(self._body), stream=False)
            self._body = []
        if self._failed or (self.stream and not self._done) or not self._choices:
            return None
        choices = [parts.choice(index) for index, parts in sorted(self._choices.items())]
        complete = [c for c in choices if c is not None]
        if len(complete) != len(choices):
            return None
        return CachedAnswer(
            model=self._model or model or "",
            provider=provider,
            choices=complete,
            usage=self._usage or usage,
            system_fingerprint=self._fingerprint,
        )


# -- replay --------------------------------------------------------------------------------


def completion_json(answer: CachedAnswer) -> bytes:
    """The answer as a ``chat.completion`` body, with a fresh id and ``created``."""
    choices = [
        Choice(
            index=c.index,
            message=ResponseMessage(
                role="assistant",
                content=c.content,
                tool_calls=[
                    ToolCall(id=t.id, function=FunctionCall(name=t.name, arguments=t.arguments))
                    for t in c.tool_calls
                ]
                if c.tool_calls
                else None,
                refusal=c.refusal,
            ),
            finish_reason=c.finish_reason,
            logprobs=None,
        )
        for c in answer.choices
    ]
    completion = ChatCompletion(
        id=_new_id(),
        object="chat.completion",
        created=int(time.time()),
        model=answer.model,
        choices=choices,
        usage=answer.usage,
        system_fingerprint=answer.system_fingerprint,
    )
    return json_encoder.encode(completion)


def stream_events(answer: CachedAnswer, *, include_usage: bool) -> Iterator[bytes]:
    """The answer as SSE events, as OpenAI streams it: per choice a role chunk, the text in
    a few pieces, each tool call (id, type and name, then its arguments), a finish chunk;
    then the usage chunk when the client asked for it, and ``[DONE]``."""
    chunk_id, created = _new_id(), int(time.time())

    def event(choices: list[ChunkChoice], usage: Usage | None = None) -> bytes:
        chunk = ChatCompletionChunk(
            id=chunk_id,
            object="chat.completion.chunk",
            created=created,
            model=answer.model,
            choices=choices,
            usage=usage,
            system_fingerprint=answer.system_fingerprint,
        )
        return b"data: " + json_encoder.encode(chunk) + b"\n\n"

    def delta(index: int, delta: Delta, finish_reason: str | None = None) -> bytes:
        return event([ChunkChoice(index=index, delta=delta, finish_reason=finish_reason)])

    for c in answer.choices:
        # The role chunk carries content "" for a text answer, as OpenAI's does.
        role = Delta(role="assistant", content="" if c.content is not None else None)
        yield delta(c.index, role)
        text = c.content or ""
        for start in range(0, len(text), REPLAY_CHUNK_CHARS):
            yield delta(c.index, Delta(content=text[start : start + REPLAY_CHUNK_CHARS]))
        if c.refusal:
            yield delta(c.index, Delta(refusal=c.refusal))
        for position, call in enumerate(c.tool_calls or ()):
            head = ToolCallDelta(
                index=position,
                id=call.id,
                type="function",
                function=ToolCallDeltaFunction(name=call.name, arguments=""),
            )
            yield delta(c.index, Delta(tool_calls=[head]))
            if call.arguments:
                tail = ToolCallDelta(
                    index=position, function=ToolCallDeltaFunction(arguments=call.arguments)
                )
                yield delta(c.index, Delta(tool_calls=[tail]))
        yield delta(c.index, Delta(), c.finish_reason)
    if include_usage and answer.usage is not None:
        yield event([], usage=answer.usage)
    yield DONE_EVENT


def _new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"
