"""Durations in config: ``250ms``, ``30s``, ``5m``, ``1h`` or a number of seconds."""

from __future__ import annotations

import re

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|m|h)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


class Duration(float):
    """Seconds, as a float; parsed from config by :func:`parse_duration`."""


def parse_duration(value: object) -> Duration:
    """Parse a duration; raise ``ValueError`` with a readable message otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 250ms, 30s, 5m, 1h, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION_RE.match(value)
        if match is None:
            raise ValueError(f"expected a duration like 250ms, 30s, 5m, 1h, got {value!r}")
        seconds = float(match.group(1)) * _UNIT_S[match.group(2)]
    else:
        raise ValueError(f"expected a duration like 250ms, 30s, 5m, 1h, got {value!r}")
    if seconds < 0 or seconds != seconds or seconds == float("inf"):
        raise ValueError(f"a duration must be a finite number of seconds >= 0, got {value!r}")
    return Duration(seconds)
