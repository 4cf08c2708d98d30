"""Trace export that a collector which is down or hangs can never hold up.

Requests never wait for a collector: a finished span only goes into the batch processor's
queue, and the SDK's worker thread exports from there. What is left to guard is the export
itself and the gateway's stop:

- :class:`GuardedExporter` wraps the configured exporter. A failed export (refused, timed
  out, a 5xx, or the exporter raising, as the Zipkin one does when nothing listens) is
  logged on ``resillm.tracing`` once when failures start, then at most every
  :data:`FAILURE_LOG_EVERY_S` while they last, and once when an export works again, with
  the number of spans dropped meanwhile — never once per request or per retry.
- :func:`shutdown_within` flushes and shuts the tracer provider down for at most a bound:
  the SDK would wait 10 s per batch (and up to 30 s in all) for a collector that hangs.
  Past the bound the exporter is abandoned (every export fails at once, the OTLP retry
  wait is cut short) and the spans still buffered are dropped, with a log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from urllib.parse import urlsplit

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

logger = logging.getLogger("resillm.tracing")
FAILURE_LOG_EVERY_S = 60.0  # while exports keep failing, one reminder this often
SHUTDOWN_TIMEOUT_S = 5.0  # longest the gateway's stop waits for the last spans to go out


def shown_endpoint(endpoint: str) -> str:
    """The endpoint for a log line: no user, password, query or fragment (credentials)."""
    parts = urlsplit(endpoint)
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}{parts.path}"


class GuardedExporter(SpanExporter):
    """Wraps ``inner``: failures become one log line per outage (see the module docstring),
    an exporter's exception becomes a failed export, and :meth:`abandon` stops exporting."""

    def __init__(self, inner: SpanExporter, endpoint: str | None) -> None:
        self.inner = inner
        self.endpoint = endpoint
        self.where = shown_endpoint(endpoint) if endpoint else type(inner).__name__
        self.dropped = 0  # spans not exported since the failures started
        self._failing = False
        self._logged_at = 0.0
        self._abandoned = False
        self._shut = False
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._abandoned:
            self.dropped += len(spans)
            return SpanExportResult.FAILURE
        reason = ""
        try:
            result = self.inner.export(spans)
        except Exception as exc:  # any exporter's error: reported below, never raised on
            result, reason = SpanExportResult.FAILURE, self._described(exc)
        if result is SpanExportResult.SUCCESS:
            self._succeeded()
        elif self._abandoned:  # the export the stop gave up on: already said so
            self.dropped += len(spans)
        else:
            self._failed(len(spans), reason)
        return result

    def _succeeded(self) -> None:
        if self._failing:
            self._failing = False
            logger.info(
                "trace export to %s works again (%d spans were dropped)", self.where, self.dropped
            )
            self.dropped = 0

    def _failed(self, count: int, reason: str) -> None:
        self.dropped += count
        now = time.monotonic()
        if self._failing and now - self._logged_at < FAILURE_LOG_EVERY_S:
            return
        because = f" ({reason})" if reason else ""
        if self._failing:
            logger.warning(
                "trace export to %s still failing%s: %d spans dropped so far",
                self.where, because, self.dropped,
            )  # fmt: skip
        else:
            logger.warning(
                "trace export to %s failed%s: spans are dropped until it answers; "
                "requests are not affected",
                self.where, because,
            )  # fmt: skip
        self._failing, self._logged_at = True, now

    def _described(self, exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {exc}"
        if self.endpoint:
            text = text.replace(self.endpoint, self.where)
        return text[:300]

    def abandon(self) -> None:
        """Fail every export from now on, at once, and stop the exporter's retries."""
        self._abandoned = True
        self.shutdown()

    def shutdown(self) -> None:
        with self._lock:  # the stop and the SDK may both call it
            if self._shut:
                return
            self._shut = True
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


async def shutdown_within(
    provider: TracerProvider, exporter: GuardedExporter, timeout_s: float | None = None
) -> None:
    """Export what is buffered and shut ``provider`` down, for at most ``timeout_s``
    (default :data:`SHUTDOWN_TIMEOUT_S`); then give up the rest (logged).

    The SDK's shutdown blocks, so it runs in a thread of its own — a daemon, unlike
    ``asyncio.to_thread``'s workers, which the interpreter waits for at exit: a collector
    that hangs would still hold the process up after the bound."""
    bound = SHUTDOWN_TIMEOUT_S if timeout_s is None else timeout_s
    loop = asyncio.get_running_loop()
    finished: asyncio.Future[None] = loop.create_future()

    def settle() -> None:
        if not finished.done():
            finished.set_result(None)

    def run() -> None:
        try:
            provider.shutdown()
        finally:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(settle)

    threading.Thread(target=run, name="resillm-tracing-shutdown", daemon=True).start()
    try:
        await asyncio.wait_for(asyncio.shield(finished), bound)
    except TimeoutError:
        exporter.abandon()
        logger.warning(
            "trace export to %s did not finish within %gs of the stop: the spans still "
            "buffered are dropped",
            exporter.where, bound,
        )  # fmt: skip
