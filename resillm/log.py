"""Structured logging: one JSON (or text) line per record, to stderr.

Handlers are installed only by :func:`configure_logging`, which the CLI calls; a host
that mounts the gateway keeps its own logging setup and receives the same records (add
:class:`RequestIdFilter` to its handlers to get ``request_id`` on them).

The request layer sets :data:`REQUEST_ID` for the time it handles a request, so every record
logged meanwhile — the relay's recovery lines, a provider's warnings — carries the id.
"""

from __future__ import annotations

import logging
import sys
import time
from contextvars import ContextVar
from typing import Any

import msgspec

from resillm.config import LoggingConfig

ACCESS_LOGGER = "resillm.access"
REQUEST_ID: ContextVar[str | None] = ContextVar("resillm_request_id", default=None)
_encoder = msgspec.json.Encoder()
_PLAIN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:/-+")


class RequestIdFilter(logging.Filter):
    """Puts the id of the request being handled on each record (``record.request_id``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = REQUEST_ID.get()
        return True


class JSONFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg", ...fields}``; ``fields`` come from ``extra``."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
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


def configure_logging(config: LoggingConfig) -> None:
    """Send resillm's records to stderr in the configured format (idempotent)."""
    root = logging.getLogger("resillm")
    for handler in list(root.handlers):
        if getattr(handler, "_resillm", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if config.format == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    handler._resillm = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(config.level.upper())
    root.propagate = False
