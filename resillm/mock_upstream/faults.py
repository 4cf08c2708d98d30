"""Fault injection: server-wide options, overridden per request by `x-mock-*` headers.

A gateway test configures a provider with extra `headers` to make one target misbehave:

| header | effect |
|---|---|
| `x-mock-fail-status: 500` | always answer that status with the API's error JSON |
| `x-mock-fail-first: N` | fail the first N requests carrying this header value, then succeed |
| `x-mock-down-for: S` | fail requests carrying this value for S s after the first, then recover |
| `x-mock-fail-code: context_length_exceeded` | the error's `code` (and message wording) |
| `x-mock-retry-after: 0.5` | sent back as `retry-after` on failures |
| `x-mock-latency: 0.5` | seconds before anything is sent |
| `x-mock-hang: 1` | send nothing at all until the client goes away |
| `x-mock-reset: 1` | reset the TCP connection (RST) before any response byte |
| `x-mock-chunk-delay: 0.05` | seconds between content chunks |
| `x-mock-chunks: 20` | content chunks (words) in the answer |
| `x-mock-cut-after: N` | N content chunks, then the TCP connection is dropped mid-body |
| `x-mock-stall-after: N` | N content chunks, then silence until the client goes away |
| `x-mock-malformed-at: N` | one `data: {not json` event before content chunk N |
| `x-mock-error-event-after: N` | N content chunks, then an in-stream error event, then the end |
| `x-mock-no-finish: 1` | a clean end (with `[DONE]`) but no finish reason |
| `x-mock-omit-done: 1` | the finish reason (and usage) but no `[DONE]`, then a clean end |
| `x-mock-reject-prefill: 1` | 400 when the conversation ends with an assistant message |
| `x-mock-fault: NAME[,NAME...]` | named scenarios, below |

With `fail-first` or `down-for`, the status is `fail-status` (503 unless given) and the
request succeeds once the fault is over; without either, `fail-status` fails every time.

Named scenarios let one mock server play many parts. They are picked by `x-mock-fault`, or
by the request's model: `"model": "mock-fault:cut-3"` (a gateway target with that model)
behaves like `x-mock-fault: cut-3`. Each name stands for the headers beside it:

| name | same as |
|---|---|
| `fail-first-N` | `fail-first: N` |
| `NNN` (a 4xx or 5xx status) | `fail-status: NNN`; `429` also `retry-after: 0` |
| `hang` | `hang: 1` |
| `reset` | `reset: 1` |
| `slow-first-byte` | `latency: 1` |
| `cut-N` | `cut-after: N` |
| `stall-N` | `stall-after: N` |
| `malformed-N` | `malformed-at: N` |
| `error-event-N` | `error-event-after: N` |
| `no-finish` | `no-finish: 1` |
| `omit-done` | `omit-done: 1` |
| `reject-prefill` | `reject-prefill: 1` |
| `context-length` | `fail-status: 400`, `fail-code: context_length_exceeded` |
| `content-policy` | `fail-status: 400`, `fail-code: content_policy_violation` |
| `down-Ns`, `down-Nms` | `down-for: N` seconds (or milliseconds) |

Precedence: explicit `x-mock-*` headers, then `x-mock-fault`, then the model's names, then
the server-wide options; later names in one list win over earlier ones. `fail-first` and
`down-for` keep one count (one clock) per origin and value: explicit headers with the same
value share one, and so do the requests that pick the same list of names by the same header
value or the same model, so two targets `mock-fault:fail-first-2` and
`mock-fault:fail-first-2,slow-first-byte` fail two requests each.

Without streaming, cut and stall happen before any response byte, `malformed-at` makes the
JSON body unparseable, and `error-event-after`, `no-finish` and `omit-done` do nothing.
Latency comes before everything, failures included; then hang, then reset.
"""

from __future__ import annotations

import random
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from resillm.mock_upstream.options import MockUpstreamOptions

_T = TypeVar("_T")

HEADER_PREFIX = "x-mock-"
FAULT_HEADER = HEADER_PREFIX + "fault"
FAULT_MODEL_PREFIX = "mock-fault:"


class FaultHeaderError(ValueError):
    """An `x-mock-*` header (or a `mock-fault:` model) whose value cannot be used."""


@dataclass(frozen=True)
class Faults:
    """What to do wrong (or slowly) for one request."""

    fail_status: int | None
    fail_code: str | None
    retry_after: float | None
    latency: float
    hang: bool
    reset: bool
    chunk_delay: float
    chunks: int
    cut_after: int | None
    stall_after: int | None
    malformed_at: int | None
    error_event_after: int | None
    no_finish: bool
    omit_done: bool
    reject_prefill: bool


Clock = Callable[[], float]


class FaultInjector:
    """Decides each request's faults; holds the failure RNG, the fail-first counters and
    the down-for clocks."""

    def __init__(self, options: MockUpstreamOptions, clock: Clock = time.monotonic) -> None:
        self._options = options
        self._clock = clock
        self._rng = random.Random(options.seed)
        self._fail_first_seen: Counter[tuple[str, int]] = Counter()
        self._down_since: dict[tuple[str, float], float] = {}

    def for_request(self, headers: Mapping[str, str], model: str = "") -> Faults:
        """The faults of one request, from its headers, its model name and the options."""
        opts = self._options
        h = _HeaderReader(*_merged_fault_headers(headers, model))
        return Faults(
            fail_status=self._fail_status(h),
            fail_code=h.get("fail-code", str, opts.fail_code),
            retry_after=h.get("retry-after", _non_negative_float, opts.retry_after),
            latency=h.get("latency", _non_negative_float, opts.latency),
            hang=h.get("hang", _flag, opts.hang),
            reset=h.get("reset", _flag, opts.reset),
            chunk_delay=h.get("chunk-delay", _non_negative_float, opts.chunk_delay),
            chunks=h.get("chunks", _positive_int, opts.chunks),
            cut_after=h.get("cut-after", _non_negative_int, opts.cut_after),
            stall_after=h.get("stall-after", _non_negative_int, opts.stall_after),
            malformed_at=h.get("malformed-at", _non_negative_int, opts.malformed_at),
            error_event_after=h.get("error-event-after", _non_negative_int, opts.error_event_after),
            no_finish=h.get("no-finish", _flag, opts.no_finish),
            omit_done=h.get("omit-done", _flag, opts.omit_done),
            reject_prefill=h.get("reject-prefill", _flag, opts.reject_prefill),
        )

    def _fail_status(self, h: _HeaderReader) -> int | None:
        opts = self._options
        header_status = h.get("fail-status", _status, None)
        status = header_status if header_status is not None else opts.fail_status
        down_for = h.get("down-for", _non_negative_float, None)
        fail_first = h.get("fail-first", _non_negative_int, None)
        if down_for is not None or fail_first is not None:
            # A request-level fault that ends: it decides alone, the options stand aside.
            down = down_for is not None and self._is_down((h.scope("down-for"), down_for))
            if down or (
                fail_first is not None and self._count_toward((h.scope("fail-first"), fail_first))
            ):
                return status
            return None
        if header_status is not None:
            return header_status
        if opts.down_for is not None and self._is_down(("options", opts.down_for)):
            return status
        if opts.fail_first and self._count_toward(("options", opts.fail_first)):
            return status
        if opts.fail_rate and self._rng.random() < opts.fail_rate:
            return status
        return None

    def _count_toward(self, key: tuple[str, int]) -> bool:
        """Whether this is one of the first `key[1]` requests under that fail-first value."""
        self._fail_first_seen[key] += 1
        return self._fail_first_seen[key] <= key[1]

    def _is_down(self, key: tuple[str, float]) -> bool:
        """Whether `key[1]` seconds have not yet passed since the first request under it."""
        now = self._clock()
        since = self._down_since.setdefault(key, now)
        return now - since < key[1]


# Named scenarios: a pattern over the name, and the `x-mock-*` headers (without the prefix)
# it stands for, built from the pattern's groups.
_NAMED: list[tuple[re.Pattern[str], Callable[[re.Match[str]], dict[str, str]]]] = [
    (re.compile(r"fail-first-(\d+)"), lambda m: {"fail-first": m[1]}),
    (
        re.compile(r"(4\d\d|5\d\d)"),
        lambda m: {"fail-status": m[1], **({"retry-after": "0"} if m[1] == "429" else {})},
    ),
    (re.compile(r"hang"), lambda _m: {"hang": "1"}),
    (re.compile(r"reset"), lambda _m: {"reset": "1"}),
    (re.compile(r"slow-first-byte"), lambda _m: {"latency": "1"}),
    (re.compile(r"cut-(\d+)"), lambda m: {"cut-after": m[1]}),
    (re.compile(r"stall-(\d+)"), lambda m: {"stall-after": m[1]}),
    (re.compile(r"malformed-(\d+)"), lambda m: {"malformed-at": m[1]}),
    (re.compile(r"error-event-(\d+)"), lambda m: {"error-event-after": m[1]}),
    (re.compile(r"no-finish"), lambda _m: {"no-finish": "1"}),
    (re.compile(r"omit-done"), lambda _m: {"omit-done": "1"}),
    (re.compile(r"reject-prefill"), lambda _m: {"reject-prefill": "1"}),
    (
        re.compile(r"context-length"),
        lambda _m: {"fail-status": "400", "fail-code": "context_length_exceeded"},
    ),
    (
        re.compile(r"content-policy"),
        lambda _m: {"fail-status": "400", "fail-code": "content_policy_violation"},
    ),
    (re.compile(r"down-(\d+(?:\.\d+)?)s"), lambda m: {"down-for": m[1]}),
    (re.compile(r"down-(\d+)ms"), lambda m: {"down-for": f"{int(m[1]) / 1000:g}"}),
]
FAULT_NAMES = (
    "fail-first-N, NNN (a 4xx/5xx status), hang, reset, slow-first-byte, cut-N, stall-N, "
    "malformed-N, error-event-N, no-finish, omit-done, reject-prefill, context-length, "
    "content-policy, down-Ns, down-Nms"
)


def named_fault_headers(names: str, source: str) -> dict[str, str]:
    """The `x-mock-*` headers (prefix included) that a comma-separated list of named
    scenarios stands for; `source` names where the list came from, for error messages."""
    headers: dict[str, str] = {}
    for raw in names.split(","):
        name = raw.strip().lower()
        if not name:
            continue
        for pattern, expand in _NAMED:
            match = pattern.fullmatch(name)
            if match is not None:
                headers.update({HEADER_PREFIX + k: v for k, v in expand(match).items()})
                break
        else:
            raise FaultHeaderError(f"{source}: unknown fault {name!r}; known: {FAULT_NAMES}")
    return headers


def _merged_fault_headers(
    headers: Mapping[str, str], model: str
) -> tuple[dict[str, str], dict[str, str]]:
    """The request's `x-mock-*` headers with its named scenarios spelled out underneath,
    and for each header where it came from (fail-first and down-for count per origin)."""
    values: dict[str, str] = {}
    scopes: dict[str, str] = {}

    def add(found: Mapping[str, str], scope: str) -> None:
        values.update(found)
        scopes.update(dict.fromkeys(found, scope))

    if model.startswith(FAULT_MODEL_PREFIX):
        model_scope = f"model {model}"
        add(named_fault_headers(model[len(FAULT_MODEL_PREFIX) :], model_scope), model_scope)
    names = headers.get(FAULT_HEADER)
    if names is not None:
        header_scope = f"{FAULT_HEADER}: {names}"
        add(named_fault_headers(names, FAULT_HEADER), header_scope)
    explicit: dict[str, str] = {}
    for name, value in headers.items():
        lowered = name.lower()
        if lowered.startswith(HEADER_PREFIX) and lowered != FAULT_HEADER:
            explicit.setdefault(lowered, value)  # a repeated header: its first value
    add(explicit, "headers")
    return values, scopes


class _HeaderReader:
    def __init__(self, headers: Mapping[str, str], scopes: Mapping[str, str]) -> None:
        self._headers = headers
        self._scopes = scopes

    def scope(self, name: str) -> str:
        """Where the header came from: explicit headers, a list of names, a model."""
        return self._scopes.get(HEADER_PREFIX + name, "headers")

    def get(self, name: str, parse: Callable[[str], _T], default: _T) -> _T:
        raw = self._headers.get(HEADER_PREFIX + name)
        if raw is None:
            return default
        try:
            return parse(raw.strip())
        except ValueError as exc:
            raise FaultHeaderError(f"{HEADER_PREFIX}{name}: {exc}") from None


def _status(raw: str) -> int:
    status = int(raw)
    if not 400 <= status <= 599:
        raise ValueError(f"expected a 4xx or 5xx status, got {status}")
    return status


def _non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError(f"expected a number >= 0, got {value}")
    return value


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError(f"expected a number >= 1, got {value}")
    return value


def _non_negative_float(raw: str) -> float:
    value = float(raw)
    if not value >= 0:  # also rejects NaN
        raise ValueError(f"expected seconds >= 0, got {raw}")
    return value


def _flag(raw: str) -> bool:
    if raw.lower() in ("1", "true", "yes"):
        return True
    if raw.lower() in ("0", "false", "no"):
        return False
    raise ValueError(f"expected 1 or 0, got {raw}")
