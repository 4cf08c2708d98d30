"""Structured logging: one JSON (or text) line per record, to stderr.

Handlers are installed only by :func:`configure_logging`, which the CLI calls; a host
that mounts the gateway keeps its own logging setup and receives the same records.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import msgspec

from resillm.config import LoggingConfig

ACCESS_LOGGER = "resillm.access"
_encoder = msgspec.json.Encoder()


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
        fields = getattr(record, "fields", None)
        if fields:
            line.update(fields)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return _encoder.encode(line).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, "fields", None)
        if fields:
            text += " " + " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
        return text


def configure_logging(config: LoggingConfig) -> None:
    """Send resillm's records to stderr in the configured format (idempotent)."""
    root = logging.getLogger("resillm")
    for handler in list(root.handlers):
        if getattr(handler, "_resillm", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if config.format == "json" else TextFormatter())
    handler._resillm = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(config.level.upper())
    root.propagate = False
