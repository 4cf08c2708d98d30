"""What every HTTP provider's stream shares: reading, timing, ending and releasing.

A subclass only translates: :meth:`consume` turns the bytes of one read into chunks with
:meth:`push` and says how the stream ends with :meth:`end` or :meth:`fail`. The base
class queues the chunks, applies ``stream_idle_s`` between reads once the first token has
arrived (the first one is the router's to time; one timer for all streams,
:mod:`providers.idle`), delivers what came before a failure and
then raises it, and gives the connection back for reuse only after a clean end.
"""

from __future__ import annotations

from collections.abc import Callable

import aiohttp

from providers.base import Chunk
from providers.http import upstream_errors
from providers.idle import IdleWatch, idle_watch
from resillm.errors import UpstreamError, UpstreamProtocolError, UpstreamTimeout


class UpstreamChunkStream:
    # In the provider's own words, for the error a client may read.
    ENDED_UNFINISHED = "stream ended without a finish reason"

    def __init__(
        self,
        response: aiohttp.ClientResponse,
        *,
        provider: str,
        model: str,
        idle_s: float | None,
        release: Callable[[], object],
    ) -> None:
        self.provider = provider
        self.model = model
        self._response = response
        self._idle_s = idle_s
        self._release = release
        # A list, not a deque: it holds the few chunks of one read, and an empty deque
        # costs 600 bytes, held by every open stream.
        self._pending: list[Chunk] = []
        self._started = False  # the first token went by: the idle limit applies
        self._idle_watch: IdleWatch | None = None
        self.finished = False  # a finish reason went by: the answer is whole
        self._ended = False
        self._closed = False
        self._failure: UpstreamError | None = None  # raised once by __anext__, then dropped
        self._failed = False
        self.malformed = 0  # events skipped as unreadable (counted in metrics)

    # -- for subclasses ----------------------------------------------------------------------

    def consume(self, data: bytes) -> None:
        """Translate one read (``b""`` at the end of the body)."""
        raise NotImplementedError

    def push(self, chunk: Chunk) -> None:
        self._started = self._started or chunk.substantial
        self.finished = self.finished or chunk.finish_reason is not None
        self._pending.append(chunk)

    def end(self, *, reuse: bool = True) -> None:
        """The upstream says it is done: complete if a finish reason went by. ``reuse``:
        the connection is at a clean boundary and may serve another request."""
        if not self.finished:
            self.fail(self.protocol_error(self.ENDED_UNFINISHED))
            return
        self._ended = True
        self._close_response(reuse=reuse)

    def fail(self, error: UpstreamError) -> None:
        """Deliver what came before the failure, then raise it."""
        if self._ended:
            return
        self._ended = True
        self._failed = True
        self._failure = error
        self._close_response(reuse=False)

    def protocol_error(self, message: str) -> UpstreamProtocolError:
        return UpstreamProtocolError(
            f"{self.provider}/{self.model}: {message}", provider=self.provider, model=self.model
        )

    @property
    def ended(self) -> bool:
        return self._ended

    @property
    def buffered(self) -> int:
        """Chunks already read and waiting: the next ones come without waiting."""
        return len(self._pending)

    # -- iteration -----------------------------------------------------------------------

    def __aiter__(self) -> UpstreamChunkStream:
        return self

    async def __anext__(self) -> Chunk:
        # One frame for the wait (the read is inline): a held stream waits here.
        while not self._pending:
            if self._ended:
                if self._failure is not None:
                    # Neither this frame nor `self` may hold the error once raised: its
                    # traceback holds them, and the cycle would wait for the collector.
                    failure, self._failure = self._failure, None
                    try:
                        raise failure
                    finally:
                        del failure
                raise StopAsyncIteration
            try:
                with upstream_errors(self.provider, self.model):
                    if self._started and self._idle_s is not None:
                        watch = self._idle_watch or self._watch_idle()
                        watch.waiting(self, self._idle_s)
                        try:
                            data = await self._response.content.readany()
                        finally:
                            watch.done(self)
                    else:  # the first token's wait is the router's to bound
                        data = await self._response.content.readany()
            except UpstreamError as exc:
                if isinstance(exc, UpstreamTimeout) and self.finished:
                    # Silence after the finish reason: only usage or [DONE] is missing, and
                    # the answer itself is whole. End it rather than fail it.
                    self._ended = True
                    self._close_response(reuse=False)
                else:
                    self.fail(exc)
                continue
            try:
                self.consume(data)
            except UpstreamError as exc:
                self.fail(exc)
                continue
            if not data and not self._ended:
                self.end()
        return self._pending.pop(0)

    def _watch_idle(self) -> IdleWatch:
        self._idle_watch = idle_watch()
        return self._idle_watch

    def idle_expired(self) -> None:
        """No data for ``stream_idle``: the read waiting fails with a timeout."""
        self._response.content.set_exception(TimeoutError())

    def _close_response(self, *, reuse: bool) -> None:
        if self._closed:
            return
        self._closed = True
        if reuse:
            self._response.release()
        else:
            self._response.close()
        self._release()

    async def aclose(self) -> None:
        # Before the end, the connection is mid-answer and cannot be reused: close it.
        self._close_response(reuse=self._ended and not self._failed)
