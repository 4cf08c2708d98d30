"""Structured logging: one JSON (or text) line per record, to stderr.

Handlers are installed only by :func:`configure_logging`, which the CLI calls; a host
that mounts the gateway keeps its own logging setup and receives the same records (add
:class:`RequestIdFilter` to its handlers to get ``request_id`` on them).

The request layer sets :data:`REQUEST_ID` for the time it handles a request, so every record
logged meanwhile — the relay's recovery lines, a provider's warnings — carries the id.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import logging
import sys
import threading
import time
from contextvars import ContextVar
from typing import Any, TextIO

import msgspec

from resillm.config import LoggingConfig

ACCESS_LOGGER = "resillm.access"
# Libraries whose warnings `resillm serve` formats as its own lines: with no handler they
# would reach stderr as bare text (logging.lastResort), in the middle of the JSON lines.
LIBRARY_LOGGERS = ("opentelemetry",)
LIBRARY_REPEAT_S = 60.0  # one line per message template this often: no retry-by-retry spam
REQUEST_ID: ContextVar[str | None] = ContextVar("resillm_request_id", default=None)
_encoder = msgspec.json.Encoder()
_LEVEL_NAMES = {logging.INFO: "info", logging.WARNING: "warning", logging.ERROR: "error"}
BATCH_LINES = 64  # access lines encoded and written together (at most FLUSH_S late)
_PLAIN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:/-+")


def _level_name(level: int) -> str:
    return _LEVEL_NAMES.get(level) or logging.getLevelName(level).lower()


class RequestIdFilter(logging.Filter):
    """Puts the id of the request being handled on each record (``record.request_id``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = REQUEST_ID.get()
        return True


class _Timestamps:
    """``2026-01-01T12:00:00.123Z``, the date and time formatted once a second, not once a
    line."""

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def __call__(self, created: float, msecs: float) -> str:
        second = int(created)
        if second != self._second:
            self._text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return self._text + _MILLIS[int(msecs)]


_MILLIS = tuple(f".{ms:03d}Z" for ms in range(1000))  # a line's milliseconds, made once


class JSONFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg", ...fields}``; ``fields`` come from ``extra``."""

    def __init__(self) -> None:
        super().__init__()
        self.timestamp = _Timestamps()

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": self.timestamp(record.created, record.msecs),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            line["request_id"] = request_id
        fields = getattr(record, "fields", None)
        if fields:
            line.update(fields)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return _encoder.encode(line).decode()


class TextFormatter(logging.Formatter):
    """For humans: ``time LEVEL logger message key=value ...``; values with spaces or quotes
    (and bodies) are JSON-quoted so a line stays one line."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields: dict[str, Any] = getattr(record, "fields", None) or {}
        request_id = getattr(record, "request_id", None)
        if request_id is not None and "request_id" not in fields:
            text += f" request_id={request_id}"
        if fields:
            text += " " + " ".join(
                f"{k}={_text_value(v)}" for k, v in fields.items() if v is not None
            )
        return text


def _text_value(value: Any) -> str:
    if isinstance(value, str) and value and set(value) <= _PLAIN_CHARS:
        return value
    if isinstance(value, bool | int | float):
        return str(value).lower() if isinstance(value, bool) else str(value)
    return _encoder.encode(value).decode()


class BufferedStderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Lines go to a buffer that a background thread flushes every ``FLUSH_S``, so a
    request's access line costs no system call on the event loop. Warnings and errors
    are flushed at once, and so is everything at exit."""

    FLUSH_S = 0.2

    def __init__(self) -> None:
        stream: TextIO = sys.stderr
        # The bytes under the text stream, when it is our own: ``write_fields`` writes its
        # encoded lines there. The text layer passes every write straight down (write
        # through), so lines written either way keep their order.
        self._binary: io.BufferedWriter[io.FileIO] | None = None
        with contextlib.suppress(AttributeError, ValueError, io.UnsupportedOperation):
            raw = io.FileIO(sys.stderr.fileno(), "w", closefd=False)
            binary = io.BufferedWriter(raw, 1 << 16)
            stream = io.TextIOWrapper(binary, encoding="utf-8", errors="backslashreplace",
                                      newline="\n", write_through=True)  # fmt: skip
            self._binary = binary
        super().__init__(stream)
        self._heads: dict[tuple[int, str, str], bytes] = {}
        # ``write_fields`` lines not written yet: (time, constant part, fields).
        self._pending: list[tuple[float, bytes, dict[str, Any] | msgspec.Struct]] = []
        self._stop = threading.Event()
        self.closed = False
        thread = threading.Thread(target=self._flush_often, name="resillm-log", daemon=True)
        thread.start()
        atexit.register(self.close)

    def flush(self) -> None:  # called by emit: defer unless the record was important
        return None

    def write_fields(
        self, level: int, name: str, message: str, fields: dict[str, Any] | msgspec.Struct
    ) -> bool:
        """Write a line as ``JSONFormatter`` formats ``fields`` logged by ``name``, without
        the ``LogRecord`` and handler machinery: the access log's path, a line per request.
        False (nothing written) unless this handler is in place, open and formats JSON;
        the caller then logs the usual way.

        Lines below warning are kept (with their time) and written in batches of
        :data:`BATCH_LINES`, at each flush, and before any other line, so the order of
        lines holds; encoding many at once costs less than one at a time between requests.
        ``fields`` (a dict, or a struct with fields, none of them the line's own) must not change
        once given."""
        formatter = self.formatter
        if self.closed or not isinstance(formatter, JSONFormatter) or level < self.level:
            return False
        if isinstance(fields, dict) and (
            not fields
            or "ts" in fields
            or "level" in fields
            or "logger" in fields
            or "msg" in fields
        ):
            return self._write_merged(formatter, level, name, message, fields)
        head = self._heads.get((level, name, message))
        if head is None:
            head = self._heads[(level, name, message)] = self._head(level, name, message)
        with self.lock:  # type: ignore[union-attr]
            pending = self._pending
            pending.append((time.time(), head, fields))
            if len(pending) >= BATCH_LINES or level >= logging.WARNING:
                self._write_pending()
        if level >= logging.WARNING:
            self.flush_now()
        return True

    def _write_pending(self) -> None:
        """Write the kept lines; the caller holds the lock."""
        pending, self._pending = self._pending, []
        if not pending or not isinstance(self.formatter, JSONFormatter):
            return
        stamp = self.formatter.timestamp
        data = bytearray()
        for now, head, fields in pending:
            data += b'{"ts":"%s",%s' % (stamp(now, (now - int(now)) * 1000).encode(), head)
            end = len(data)
            _encoder.encode_into(fields, data, -1)  # appended: {"request_id":...}
            data[end] = 0x2C  # its "{" becomes the "," after the constant part
            data += b"\n"
        try:
            if self._binary is not None:
                self._binary.write(data)
            else:
                self.stream.write(data.decode())
        except (OSError, ValueError):  # stderr closed
            return

    @staticmethod
    def _head(level: int, name: str, message: str) -> bytes:
        """``"level":…,"logger":…,"msg":…`` as ``JSONFormatter`` writes them."""
        constant = {"level": _level_name(level), "logger": name, "msg": message}
        return _encoder.encode(constant)[1:-1]

    def _write_merged(
        self, formatter: JSONFormatter, level: int, name: str, message: str, fields: dict[str, Any]
    ) -> bool:
        """``write_fields`` for fields that are empty or would replace the line's own keys."""
        now = time.time()
        line = {
            "ts": formatter.timestamp(now, (now - int(now)) * 1000),
            "level": _level_name(level),
            "logger": name,
            "msg": message,
            **fields,
        }
        with self.lock:  # type: ignore[union-attr]
            self._write_pending()
            try:
                self.stream.write(_encoder.encode(line).decode() + "\n")
            except (OSError, ValueError):  # stderr closed
                return True
        if level >= logging.WARNING:
            self.flush_now()
        return True

    def emit(self, record: logging.LogRecord) -> None:
        # ``handle`` holds the lock: the kept lines go first, as they were logged first.
        self._write_pending()
        super().emit(record)
        if record.levelno >= logging.WARNING:
            self.flush_now()

    def flush_now(self) -> None:
        # stderr closed at exit: nothing left to do.
        with self.lock, contextlib.suppress(OSError, ValueError):  # type: ignore[union-attr]
            self._write_pending()
            self.stream.flush()

    def _flush_often(self) -> None:
        while not self._stop.wait(self.FLUSH_S):
            self.flush_now()

    def close(self) -> None:
        self.closed = True
        self._stop.set()
        self.flush_now()
        super().close()


class LibraryHandler(logging.Handler):
    """Passes a library's warnings and errors to resillm's handler, each message template
    at most once every ``every_s`` (the OpenTelemetry exporter logs every retry of every
    batch while its collector is down; resillm.tracing says so once)."""

    def __init__(self, target: logging.Handler, every_s: float = LIBRARY_REPEAT_S) -> None:
        super().__init__(logging.WARNING)
        self.target = target
        self.every_s = every_s
        self._last: dict[tuple[str, object], float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        key = (record.name, record.msg)
        last = self._last.get(key)
        if last is None or record.created - last >= self.every_s:
            self._last[key] = record.created
            self.target.handle(record)


def configure_logging(config: LoggingConfig) -> None:
    """Send resillm's records to stderr in the configured format, and the warnings of
    :data:`LIBRARY_LOGGERS` too, rate-limited (idempotent)."""
    root = logging.getLogger("resillm")
    for handler in list(root.handlers):
        if getattr(handler, "_resillm", False):
            root.removeHandler(handler)
            handler.close()
    # The process is ours (the CLI calls this): skip what no resillm line prints — the
    # caller's file and line (a stack walk per record), thread and process names.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = BufferedStderrHandler()
    handler.setFormatter(JSONFormatter() if config.format == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    handler._resillm = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(config.level.upper())
    root.propagate = False
    for name in LIBRARY_LOGGERS:
        library = logging.getLogger(name)
        for old in [h for h in library.handlers if getattr(h, "_resillm", False)]:
            library.removeHandler(old)
        forward = LibraryHandler(handler)
        forward._resillm = True  # type: ignore[attr-defined]
        library.addHandler(forward)


def direct_handler(logger: logging.Logger) -> BufferedStderrHandler | None:
    """The handler ``logger``'s records reach, when it is resillm's own alone (as
    :func:`configure_logging` sets it up, and no one added filters or handlers on the
    way): lines for it may be written with ``write_fields``. None otherwise."""
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters:
            return None
        if current.handlers:
            handlers = current.handlers
            if current.propagate or len(handlers) != 1:
                return None
            handler = handlers[0]
            plain = [type(f) for f in handler.filters] in ([], [RequestIdFilter])
            if isinstance(handler, BufferedStderrHandler) and plain:
                return handler
            return None
        current = current.parent if current.propagate else None
    return None
