"""Relay an upstream stream to the client, and finish it when the upstream dies mid-way.

Past ``http.response.start`` nothing can be retried in the usual sense, so a stream that
dies after content reached the client (cut, stall, error event, end without a finish
reason) is recovered when ``resilience.stream_recovery`` is on (SPEC section 4):

1. continuation: the original messages plus an assistant message holding exactly the text
   already delivered, sent to a target that accepts prefill (the same one first); only the
   new text is forwarded;
2. restart: where no target takes the prefill (or one refuses it with a 400, never shown),
   the original request again; its output is held until it has reproduced the delivered
   text, then only what follows is forwarded — if it diverges, the stream fails.

Either way the client sees one stream: same ``id`` and ``created``, one role chunk, one
``[DONE]``. Recovery gives up — one ``data: {"error": ...}`` event, never ``[DONE]`` —
when tool-call arguments were in flight, past the request deadline, or after
``MAX_RECOVERIES`` tries. Usage is the sum over every upstream call.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, NamedTuple

import msgspec

from providers.base import Chunk, ChunkStream, UpstreamCall
from providers.sse import DONE_EVENT, encode_data
from resillm.asgi import Headers, Send
from resillm.context import RequestContext
from resillm.errors import GatewayError, UpstreamError, UpstreamProtocolError
from resillm.schema import AssistantMessage, Usage, json_decoder, json_encoder
from resillm.targets import Target
from resillm.usage import add_usage, estimate_tokens, prompt_chars

logger = logging.getLogger("resillm.relay")
MAX_RECOVERIES = 3
YIELD_EVERY = 4  # sends between two pauses for the rest of the event loop


class OpenStream(NamedTuple):
    """An upstream stream whose first token has arrived: ``head`` holds the chunks up to
    and including it; the rest are read through ``chunks``."""

    stream: ChunkStream
    chunks: AsyncIterator[Chunk]
    head: tuple[Chunk, ...]


# (call, targets or None for the whole chain, attempts per target or None for the config)
Opener = Callable[
    [UpstreamCall, Sequence[Target] | None, int | None], Awaitable[tuple[Target, OpenStream]]
]


class Diverged(UpstreamProtocolError):
    """A restarted answer did not reproduce the text already delivered."""


class _Resume:
    """How chunks of a recovered call are turned into chunks of the client's stream."""

    def __init__(self, skip_text: str = "", align: str = "") -> None:
        self.skip_text = skip_text  # whitespace cut from the prefill, expected first
        self.align = align  # text a restart must reproduce before anything is forwarded

    def content(self, chunk: Chunk) -> str | None:
        """The content to send for ``chunk``; ``None`` to drop the chunk."""
        text = chunk.text
        if self.align:
            if chunk.tool_call or (not text and chunk.finish_reason):
                raise Diverged("the restarted answer diverged from the text already sent")
            if self.align.startswith(text):
                self.align = self.align[len(text) :]
                return None
            if not text.startswith(self.align):
                raise Diverged("the restarted answer diverged from the text already sent")
            text, self.align = text[len(self.align) :], ""
            return text or None
        if self.skip_text and text:
            if text.startswith(self.skip_text):
                text = text[len(self.skip_text) :]
            self.skip_text = ""
        if not text and not chunk.finish_reason and not chunk.tool_call and chunk.usage is None:
            return None  # a second role chunk
        return text


class StreamRelay:
    """One client stream, possibly fed by several upstream calls in turn."""

    def __init__(
        self,
        ctx: RequestContext,
        call: UpstreamCall,
        chain: Sequence[Target],
        opener: Opener,
        *,
        recovery: bool,
        send: Send,
        opened: tuple[Target, OpenStream, Headers],
    ) -> None:
        self.ctx = ctx
        self.call = call
        self.chain = chain
        self.opener = opener
        self.recovery = recovery
        self.send = send
        self.opened: tuple[Target, OpenStream, Headers] | None = opened  # run() takes it
        # The content of choice 0 the client received, as UTF-8: one buffer rather than a
        # string per chunk (a held stream holds it whole).
        self.delivered = bytearray()
        ctx.streamed = self.delivered  # the access log reads it with logging.log_responses
        self.tool_call = False
        self.call_usage: Usage | None = None
        self.call_chars = 0
        self.call_prefill = ""
        self.origin: tuple[Any, Any] | None = None  # the client stream's id and created
        self.first_data = b""
        self.resume: _Resume | None = None
        # Events forwarded but not yet sent: the ones that arrived together go out as one
        # body (one write) instead of one each; nothing waits that could have been sent.
        self.outbox: list[bytes] = []
        self.sends = 0

    async def run(self) -> None:
        """Relay the opened stream (and what recovers it). The failover loop left each
        target's circuit unsettled: a stream is a success only once it ends well, so a
        target whose streams keep dying mid-way does open its circuit."""
        assert self.opened is not None
        (target, opened, headers), self.opened = self.opened, None
        self.first_data = opened.head[0].data
        settled = False
        try:
            await self.send({"type": "http.response.start", "status": 200, "headers": headers})
            del headers
            while True:
                try:
                    for chunk in opened.head:
                        self.forward(chunk)
                    # The head is sent: a held stream does not hold its chunks any longer.
                    opened = opened._replace(head=())
                    await self.flush_unless_more(opened.stream)
                    async for chunk in opened.chunks:
                        self.forward(chunk)
                        del chunk  # not held while the next one is awaited
                        await self.flush_unless_more(opened.stream)
                    break
                except UpstreamError as exc:
                    await self.flush()  # what came before the failure is the client's
                    self.ctx.malformed_events += getattr(opened.stream, "malformed", 0)
                    await opened.stream.aclose()
                    self.end_call(failed=True)
                    if self.ctx.tracer is not None:
                        self.ctx.tracer.stream_failed(exc)
                    diverged = isinstance(exc, Diverged)
                    # A diverged restart is not the target's fault.
                    target.settle("release" if diverged else "failure")
                    settled = True
                    resumed = None if diverged else await self.recover(target)
                    if resumed is None:
                        self.ctx.error = exc.message
                        await self.send_body(encode_data(exc.body()), more=False)
                        return
                    (target, opened), settled = resumed, False
            target.settle("success")
            settled = True
            self.end_call(failed=False)
            self.ctx.malformed_events += getattr(opened.stream, "malformed", 0)
            await self.send_body(self.take() + DONE_EVENT, more=False)
        finally:
            if not settled:  # cancelled: the client left, or the server is stopping
                target.settle("release")
                self.end_call(failed=True)  # bill what was received (SPEC section 4)
            await opened.stream.aclose()

    def forward(self, chunk: Chunk) -> None:
        """Queue the chunk for the client (rewritten for a recovered call)."""
        if chunk.usage is not None:
            self.call_usage = chunk.usage
        if not chunk.forward:
            return
        data = chunk.data
        text = chunk.text
        if self.resume is not None:
            content = self.resume.content(chunk)
            if content is None:
                return
            data, text = self.rewrite(chunk, content), content
        if text:
            self.delivered += text.encode()
        self.call_chars += len(text)
        self.tool_call = self.tool_call or chunk.tool_call
        self.outbox.append(encode_data(data))

    async def flush_unless_more(self, stream: object) -> None:
        """Send what is queued unless the upstream's next chunk is already here."""
        if self.outbox and not getattr(stream, "buffered", 0):
            await self.flush()

    async def flush(self) -> None:
        if not self.outbox:
            return
        await self.send_body(self.take(), more=True)
        self.sends += 1
        if not self.sends % YIELD_EVERY:
            # Once the client is gone hypercorn's send returns at once, and buffered upstream
            # bytes are read at once too: without this pause the disconnect watch would wait
            # for the buffer to drain, every chunk written to (and logged by) a dead socket.
            await asyncio.sleep(0)

    def take(self) -> bytes:
        body = b"".join(self.outbox)
        self.outbox.clear()
        return body

    async def send_body(self, body: bytes, *, more: bool) -> None:
        await self.send({"type": "http.response.body", "body": body, "more_body": more})

    def end_call(self, *, failed: bool) -> None:
        """Add the finished call's usage; a call cut before reporting it is estimated."""
        usage = self.call_usage
        if usage is None and failed:
            prompt = estimate_tokens(prompt_chars(self.call.request) + len(self.call_prefill))
            completion = estimate_tokens(self.call_chars)
            usage = Usage(
                prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
            )
        if usage is not None:
            # Summed in the context (where calls that failed before their first token left
            # their usage), so it is known before the last event: budgets settle then.
            self.ctx.usage = add_usage(self.ctx.usage, usage)
        self.call_usage, self.call_chars = None, 0

    async def recover(self, failed: Target) -> tuple[Target, OpenStream] | None:
        ctx = self.ctx
        if not self.recovery or self.tool_call or len(ctx.recoveries) >= MAX_RECOVERIES:
            return None
        delivered = self.delivered.decode()
        prefill = delivered.rstrip()
        candidates = [t for t in (failed, *self.chain) if t.prefill]
        candidates = list(dict.fromkeys(candidates))  # the failed target first, each once
        if prefill and candidates:
            try:
                target, opened = await self.opener(self.continuation(prefill), candidates, 1)
            except GatewayError as exc:
                logger.info(
                    "request %s: continuation refused (%s), restarting",
                    ctx.request_id,
                    exc.message,
                )
            else:
                self.resume = _Resume(skip_text=delivered[len(prefill) :])
                self.call_prefill = prefill
                ctx.recoveries += ("continued",)
                return target, opened
        try:
            target, opened = await self.opener(self.call, None, None)
        except GatewayError as exc:
            logger.warning("request %s: stream recovery failed: %s", ctx.request_id, exc.message)
            ctx.recoveries += ("failed",)
            return None
        self.resume = _Resume(align=delivered)
        self.call_prefill = ""
        ctx.recoveries += ("restarted",)
        return target, opened

    def continuation(self, prefill: str) -> UpstreamCall:
        """The request again, its answer so far as a trailing assistant message; a token
        limit is lowered by what was delivered (estimated, at least 1 left), so the client
        never gets much more than it asked for."""
        call = self.call
        request = call.request
        messages = [*request.messages, AssistantMessage(content=prefill)]
        assistant = {"role": "assistant", "content": prefill}
        raw = {**call.raw, "messages": [*call.raw["messages"], assistant]}
        limits: dict[str, int] = {}
        delivered = estimate_tokens(len(prefill))
        for name in ("max_tokens", "max_completion_tokens"):
            limit = getattr(request, name)
            if limit is not None:
                limits[name] = raw[name] = max(1, limit - delivered)
        return UpstreamCall(
            msgspec.structs.replace(request, messages=messages, **limits),
            raw,
            request_id=call.request_id,
            stream=True,
            stream_idle_s=call.stream_idle_s,
        )

    def rewrite(self, chunk: Chunk, content: str) -> bytes:
        """A recovered call's chunk in the original stream's id and created, with only new text
        (and, on the usage chunk, the usage of every call so far)."""
        if self.origin is None:
            first: dict[str, Any] = json_decoder.decode(self.first_data)
            self.origin = (first.get("id"), first.get("created"))
        body: dict[str, Any] = json_decoder.decode(chunk.data)
        body["id"], body["created"] = self.origin
        choices = body.get("choices") or []
        delta = choices[0].get("delta") if choices else None
        if isinstance(delta, dict) and delta.get("content") is not None:
            delta["content"] = content
        if chunk.usage is not None:
            body["usage"] = msgspec.to_builtins(add_usage(self.ctx.usage, chunk.usage))
        return json_encoder.encode(body)
