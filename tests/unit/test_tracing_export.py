"""The guarded trace exporter and the rate-limited library log lines, without sockets."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator, Sequence

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

import middleware.tracing_export
from middleware.tracing_export import GuardedExporter, shown_endpoint
from resillm.config import LoggingConfig
from resillm.log import LIBRARY_LOGGERS, configure_logging

SPANS: Sequence[ReadableSpan] = [ReadableSpan(name="a"), ReadableSpan(name="b")]


class Flaky(SpanExporter):
    """Answers with ``results`` in turn; an exception instance is raised."""

    def __init__(self, *results: SpanExportResult | Exception) -> None:
        self.results = list(results)
        self.exports = 0
        self.shutdowns = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.exports += 1
        result = self.results.pop(0)
        if isinstance(result, Exception):
            raise result
        return result

    def shutdown(self) -> None:
        self.shutdowns += 1


FAIL, OK = SpanExportResult.FAILURE, SpanExportResult.SUCCESS
URL = "http://user:pw@collector:4318/v1/traces?token=t0p"


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "resillm.tracing"]


def test_the_endpoint_is_logged_without_its_credentials() -> None:
    assert shown_endpoint(URL) == "http://collector:4318/v1/traces"
    assert shown_endpoint("http://[::1]:9411/api/v2/spans") == "http://[::1]:9411/api/v2/spans"


def test_an_outage_is_one_line_then_reminders_then_one_line_at_its_end(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    exporter = GuardedExporter(Flaky(FAIL, FAIL, FAIL, FAIL, OK, OK), URL)
    with caplog.at_level(logging.INFO, logger="resillm.tracing"):
        assert [exporter.export(SPANS) for _ in range(3)] == [FAIL] * 3
        assert len(messages(caplog)) == 1  # three failed batches, one line
        monkeypatch.setattr(middleware.tracing_export, "FAILURE_LOG_EVERY_S", 0.0)
        exporter.export(SPANS)  # a reminder once the interval has passed
        assert exporter.export(SPANS) is OK
        assert exporter.export(SPANS) is OK
    first, reminder, back = messages(caplog)
    assert first.startswith("trace export to http://collector:4318/v1/traces failed:")
    assert "still failing: 8 spans dropped so far" in reminder
    assert (
        back == "trace export to http://collector:4318/v1/traces works again (8 spans were dropped)"
    )
    assert "pw" not in caplog.text and "t0p" not in caplog.text
    assert exporter.dropped == 0


def test_an_exporter_that_raises_fails_the_batch_and_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    inner = Flaky(ConnectionError(f"cannot reach {URL}"))
    exporter = GuardedExporter(inner, URL)
    with caplog.at_level(logging.INFO, logger="resillm.tracing"):
        assert exporter.export(SPANS) is FAIL
    (line,) = messages(caplog)
    assert "(ConnectionError: cannot reach http://collector:4318/v1/traces)" in line
    assert "t0p" not in line


def test_an_abandoned_exporter_fails_at_once_and_shuts_down_once() -> None:
    inner = Flaky(OK)
    exporter = GuardedExporter(inner, None)
    exporter.abandon()
    assert exporter.export(SPANS) is FAIL
    exporter.shutdown()  # the SDK's own shutdown after ours
    assert (inner.exports, inner.shutdowns, exporter.dropped) == (0, 1, 2)


@pytest.fixture
def restore_loggers() -> Iterator[None]:
    names = ("resillm", *LIBRARY_LOGGERS)
    saved = {n: (list(logging.getLogger(n).handlers), logging.getLogger(n).level) for n in names}
    propagate = logging.getLogger("resillm").propagate
    try:
        yield
    finally:
        for name, (handlers, level) in saved.items():
            logging.getLogger(name).handlers[:] = handlers
            logging.getLogger(name).setLevel(level)
        logging.getLogger("resillm").propagate = propagate


@pytest.mark.usefixtures("restore_loggers")
def test_library_warnings_become_json_lines_once_a_minute_per_kind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    configure_logging(LoggingConfig(level="info", format="json"))
    configure_logging(LoggingConfig(level="info", format="json"))  # idempotent
    otlp = logging.getLogger("opentelemetry.exporter.otlp.proto.http.trace_exporter")
    for delay in (1.0, 2.0, 4.0):
        otlp.warning("Transient error %s, retrying in %.2fs.", "refused", delay)
    otlp.error("Failed to export %s batch", "spans")
    otlp.info("not a warning: not shown")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(r["level"], r["msg"]) for r in lines] == [
        ("warning", "Transient error refused, retrying in 1.00s."),
        ("error", "Failed to export spans batch"),
    ]
    assert lines[0]["logger"] == otlp.name


def test_the_export_the_stop_gave_up_on_is_not_logged_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class AbandonedMidway(Flaky):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            guarded.abandon()  # the stop's bound ran out while this export hung
            return FAIL

    guarded = GuardedExporter(AbandonedMidway(), URL)
    with caplog.at_level(logging.INFO, logger="resillm.tracing"):
        assert guarded.export(SPANS) is FAIL
    assert messages(caplog) == []
    assert guarded.dropped == 2
