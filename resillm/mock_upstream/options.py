"""The mock upstream's settings and the counters it keeps while serving."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class MockUpstreamOptions:
    """Server-wide behaviour; each fault can also be set per request by an `x-mock-*` header.

    Durations are seconds. Fault positions count content chunks: `cut_after=2` sends two
    content chunks, then drops the connection. A position at or past the number of chunks
    applies after the last content chunk, before the finish reason. `down_for=5` fails
    every request (with `fail_status`) for five seconds after the first one, then recovers.
    """

    fail_rate: float = 0.0
    fail_status: int = 503
    fail_code: str | None = None
    fail_first: int = 0
    retry_after: float | None = None
    latency: float = 0.0
    chunk_delay: float = 0.0
    chunks: int = 8
    seed: int | None = None
    api_key: str | None = None
    cut_after: int | None = None
    stall_after: int | None = None
    malformed_at: int | None = None
    error_event_after: int | None = None
    no_finish: bool = False
    omit_done: bool = False
    reject_prefill: bool = False
    hang: bool = False
    reset: bool = False
    down_for: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.fail_rate <= 1.0:
            raise ValueError(f"fail_rate must be within [0, 1], got {self.fail_rate}")
        if not 400 <= self.fail_status <= 599:
            raise ValueError(f"fail_status must be a 4xx or 5xx status, got {self.fail_status}")
        if self.chunks < 1:
            raise ValueError(f"chunks must be at least 1, got {self.chunks}")
        if self.latency < 0 or self.chunk_delay < 0:
            raise ValueError("latency and chunk_delay must not be negative")
        if self.down_for is not None and not self.down_for >= 0:
            raise ValueError(f"down_for must be seconds >= 0, got {self.down_for}")


@dataclass
class ReportedUsage:
    """The token usage the mock reported for one model, summed over its answers."""

    answers: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class MockUpstreamStats:
    """Counters over the API requests (chat completions and messages) served so far.

    `requests == active + completed + disconnected + aborted` once a request has begun.
    `aborted` counts connections the mock dropped on purpose (`x-mock-cut-after`,
    `x-mock-reset`); `disconnected` counts requests whose client went away before the answer
    was complete. `by_model` counts the authorised requests per model named in the body (a
    gateway's target model), failed ones included. `usage_by_model` sums, per model, the
    usage the mock actually wrote out — what a real upstream would bill: a whole JSON answer,
    an OpenAI stream's usage chunk (only when the client asked for it), an Anthropic
    stream's `message_delta`; never an answer cut, stalled or failed before it. `last_headers`
    has lower-cased names.
    """

    requests: int = 0
    active: int = 0
    completed: int = 0
    disconnected: int = 0
    aborted: int = 0
    failed: int = 0
    by_model: dict[str, int] = field(default_factory=dict)
    usage_by_model: dict[str, ReportedUsage] = field(default_factory=dict)
    last_request_json: object = None
    last_headers: dict[str, str] = field(default_factory=dict)

    def count_usage(self, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        """Note one answer's usage, once it has been written to the client."""
        usage = self.usage_by_model.setdefault(model, ReportedUsage())
        usage.answers += 1
        usage.prompt_tokens += prompt_tokens
        usage.completion_tokens += completion_tokens
