"""One incremental Server-Sent Events decoder, and the encoder for what resillm sends.

The decoder follows the WHATWG rules that matter for LLM APIs: ``\\n``, ``\\r\\n`` and ``\\r``
line ends (split anywhere between two reads), comment lines, ``event:`` names, multi-line
``data:``, an event dispatched on a blank line. Bytes are fed as they arrive.
"""

from __future__ import annotations

from typing import NamedTuple


class SSEEvent(NamedTuple):
    event: str
    data: bytes


class SSEDecoder:
    """Feed bytes, get complete events; keeps partial lines between feeds."""

    __slots__ = ("_buffer", "_data", "_event", "_has_data", "_pending_cr")

    def __init__(self) -> None:
        self._buffer = b""
        self._pending_cr = False
        self._event = ""
        self._data: list[bytes] = []
        self._has_data = False

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        if not chunk:
            return []
        if self._pending_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]  # the \n of a \r\n split across two reads
        self._pending_cr = chunk.endswith(b"\r")
        buffer = self._buffer + chunk if self._buffer else chunk
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        events: list[SSEEvent] = []
        start = 0
        while True:
            end = buffer.find(b"\n", start)
            if end < 0:
                break
            event = self._line(buffer[start:end])
            if event is not None:
                events.append(event)
            start = end + 1
        self._buffer = buffer[start:]
        return events

    def flush(self) -> list[SSEEvent]:
        """At end of stream: a final event without its blank line is still delivered."""
        events: list[SSEEvent] = []
        if self._buffer:
            event = self._line(self._buffer)
            self._buffer = b""
            if event is not None:
                events.append(event)
        event = self._line(b"")
        if event is not None:
            events.append(event)
        return events

    def _line(self, line: bytes) -> SSEEvent | None:
        if not line:
            if not self._has_data:
                self._event = ""
                return None
            event = SSEEvent(self._event or "message", b"\n".join(self._data))
            self._data.clear()  # reused: no list made per event
            self._event, self._has_data = "", False
            return event
        if line[0] == 0x3A:  # ":" comment / keep-alive
            return None
        field, sep, value = line.partition(b":")
        if sep and value[:1] == b" ":
            value = value[1:]
        if field == b"data":
            self._data.append(value)
            self._has_data = True
        elif field == b"event":
            self._event = value.decode("utf-8", "replace")
        return None


DONE_EVENT = b"data: [DONE]\n\n"


def encode_data(payload: bytes) -> bytes:
    """One ``data:`` event; ``payload`` is a single line of JSON."""
    return b"data: " + payload + b"\n\n"
