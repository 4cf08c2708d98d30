"""Every mock-upstream fault before the answer starts, through the real gateway (SPEC 3-5).

The gateway runs under hypercorn on loopback in front of one or two mock upstreams; the
official `openai` SDK (or raw aiohttp, where the body or the raw SSE matters) is the client.
Faults are put on a target with its provider's `headers` (`x-mock-*`). Targets that share
one mock server have their own model names, so the mock's `by_model` counts the requests
each target received. Every test ends by checking that no upstream request is left open.
Silence, deadlines and faults in the middle of a stream are in `test_faults_stream.py`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import anyio
import msgspec
import openai
import pytest
from multidict import CIMultiDict
from openai.types.chat import ChatCompletionMessageParam

from resillm.mock_upstream import MockUpstream, MockUpstreamOptions, start_mock_upstream
from resillm.mock_upstream.answer import Prompt, compose_answer
from tests.conftest import RunningServer, run_gateway

pytestmark = pytest.mark.anyio

QUESTION = "Say something resilient."
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": QUESTION}]
# What the mock answers to HELLO, word for word, whichever target it plays.
FULL_ANSWER = compose_answer(
    Prompt(
        model="any",
        text_chars=len(QUESTION),
        last_user_text=QUESTION,
        last_is_user=True,
        prefill=None,
        first_tool=None,
        max_tokens=None,
        stream=False,
        include_usage=False,
    ),
    8,
).text
STREAMS = pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
ADMIN_KEY = "admin-secret"


# --- configs ------------------------------------------------------------------------------


def provider(mock: MockUpstream, faults: dict[str, Any] | None = None, **fields: Any) -> Any:
    """An OpenAI-compatible provider on `mock`; `faults` become `x-mock-*` headers."""
    headers = {f"x-mock-{name.replace('_', '-')}": str(v) for name, v in (faults or {}).items()}
    return {"type": "openai_compatible", "base_url": mock.url + "/v1", "headers": headers, **fields}


def alias(*targets: tuple[str, str], fallbacks: list[str] | None = None) -> dict[str, Any]:
    """An alias over (provider, model) targets, in priority order."""
    entry: dict[str, Any] = {"targets": [{"provider": p, "model": m} for p, m in targets]}
    if fallbacks:
        entry["fallbacks"] = fallbacks
    return entry


def gateway_config(
    providers: dict[str, Any],
    models: dict[str, Any],
    *,
    retry: dict[str, Any] | None = None,
    timeouts: dict[str, Any] | None = None,
    circuit_breaker: dict[str, Any] | None = None,
    admin_key: str | None = None,
) -> dict[str, Any]:
    """Small backoffs and timeouts so that every scenario takes well under a second."""
    config: dict[str, Any] = {
        "providers": providers,
        "models": models,
        "resilience": {
            "retry": {"initial_backoff": "10ms", "max_backoff": "100ms", **(retry or {})},
            "timeouts": {
                "first_token": "300ms",
                "stream_idle": "300ms",
                "request": "3s",
                **(timeouts or {}),
            },
            "circuit_breaker": circuit_breaker or {},
            # Stream recovery is the next issue's; these tests pin down the stream's end
            # when there is none.
            "stream_recovery": False,
        },
        "logging": {"level": "error"},
    }
    if admin_key is not None:
        config["auth"] = {"admin_key": admin_key}
    return config


def bad_then_good(mock: MockUpstream, faults: dict[str, Any], **bad: Any) -> dict[str, Any]:
    """Alias `chat`: provider `bad` (model `bad-model`, with `faults`), then `good`."""
    return gateway_config(
        {"bad": provider(mock, faults, **bad), "good": provider(mock)},
        {"chat": alias(("bad", "bad-model"), ("good", "good-model"))},
    )


def alone(mock: MockUpstream, faults: dict[str, Any], **settings: Any) -> dict[str, Any]:
    """Alias `chat`: one target, provider `bad` (model `bad-model`, with `faults`)."""
    return gateway_config(
        {"bad": provider(mock, faults)}, {"chat": alias(("bad", "bad-model"))}, **settings
    )


# --- clients ------------------------------------------------------------------------------


@dataclass
class Reply:
    """A successful answer as the SDK read it, with the gateway's headers."""

    text: str
    finish_reason: str | None
    model: str  # the answer's (or every chunk's) `model` field
    provider: str
    upstream_model: str
    attempts: int


async def ask(url: str, *, stream: bool, model: str = "chat", **extra: Any) -> Reply:
    """One chat completion through the SDK; its errors are raised as they are."""
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as client:
        create = client.chat.completions.with_raw_response.create
        if stream:
            raw = await create(model=model, messages=HELLO, stream=True, **extra)
            chunks = [chunk async for chunk in raw.parse()]
            choices = [chunk.choices[0] for chunk in chunks if chunk.choices]
            text = "".join(choice.delta.content or "" for choice in choices)
            finish = choices[-1].finish_reason if choices else None
            models = {chunk.model for chunk in chunks}
            assert len(models) == 1, models
            answer_model = models.pop()
        else:
            raw = await create(model=model, messages=HELLO, **extra)
            completion = raw.parse()
            text = completion.choices[0].message.content or ""
            finish, answer_model = completion.choices[0].finish_reason, completion.model
    return Reply(
        text=text,
        finish_reason=finish,
        model=answer_model,
        provider=raw.headers["x-resillm-provider"],
        upstream_model=raw.headers["x-resillm-model"],
        attempts=int(raw.headers["x-resillm-attempts"]),
    )


@dataclass
class Raw:
    """What came back, unparsed by any SDK: the status, headers, JSON body or SSE data."""

    status: int
    headers: CIMultiDict[str]
    body: Any  # the JSON body; None for a stream
    events: list[str]  # each `data:` payload of a stream, in order
    seconds: float  # from sending the request to the end of the body

    @property
    def error(self) -> dict[str, Any]:
        assert isinstance(self.body, dict), self.body
        error = self.body["error"]
        assert isinstance(error, dict)
        return error


async def post(url: str, *, stream: bool, model: str = "chat", **extra: Any) -> Raw:
    body = {"model": model, "messages": HELLO, "stream": stream, **extra}
    started = time.monotonic()
    async with (
        aiohttp.ClientSession() as session,
        session.post(url + "/v1/chat/completions", json=body) as response,
    ):
        if response.content_type == "text/event-stream":
            events = [
                line.decode().removeprefix("data: ").rstrip("\n")
                async for line in response.content
                if line.startswith(b"data: ")
            ]
            return Raw(
                response.status,
                CIMultiDict(response.headers),
                None,
                events,
                time.monotonic() - started,
            )
        payload = await response.json(content_type=None)
    return Raw(
        response.status, CIMultiDict(response.headers), payload, [], time.monotonic() - started
    )


async def admin_targets(url: str, key: str | None = ADMIN_KEY) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    async with (
        aiohttp.ClientSession() as session,
        session.get(url + "/admin/targets", headers=headers) as response,
    ):
        return response.status, await response.json(content_type=None)


async def get_status(url: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        await response.read()
        return response.status


def assert_all_failed(
    raw: Raw, status: int, attempts: Sequence[tuple[str, str, int | None]]
) -> None:
    """Every target failed: `status`, `upstream_error`, and the attempts as (provider,
    model, upstream status) in the order they were made."""
    assert raw.status == status, raw.body
    error = raw.error
    assert (error["type"], error["code"]) == ("upstream_error", "upstream_error")
    seen = [(a["provider"], a["model"], a["status"]) for a in error["attempts"]]
    assert seen == attempts
    assert all(isinstance(a["message"], str) and a["message"] for a in error["attempts"])


# --- the gateway, and no upstream request left open --------------------------------------


async def settled(*mocks: MockUpstream, within_s: float = 2.0) -> None:
    """Wait until no mock has a request in flight: the gateway closed what it opened."""
    for _ in range(int(within_s / 0.01)):  # plain counters: polled
        if not any(mock.stats.active for mock in mocks):
            break
        await anyio.sleep(0.01)
    assert [mock.stats.active for mock in mocks] == [0] * len(mocks), "upstream request leaked"


@asynccontextmanager
async def serving(config: dict[str, Any], *mocks: MockUpstream) -> AsyncIterator[RunningServer]:
    """The gateway; after the test's body (while the gateway still runs), nothing in flight."""
    async with run_gateway(config) as gateway:
        yield gateway
        await settled(*mocks)


@pytest.fixture
async def other() -> AsyncIterator[MockUpstream]:
    """A second mock server, for targets whose requests must be counted apart."""
    async with await start_mock_upstream() as server:
        yield server


# --- fail the first requests --------------------------------------------------------------


@STREAMS
async def test_two_failures_then_success_on_one_target_takes_three_attempts(
    upstream: MockUpstream, stream: bool
) -> None:
    async with serving(alone(upstream, {"fail_first": 2}), upstream) as gw:
        reply = await ask(gw.url, stream=stream)

    assert reply.text == FULL_ANSWER and reply.finish_reason == "stop"
    assert (reply.provider, reply.upstream_model, reply.attempts) == ("bad", "bad-model", 3)
    assert reply.model == "bad-model"
    assert (upstream.stats.requests, upstream.stats.failed) == (3, 2)


@STREAMS
async def test_a_target_failing_past_max_attempts_gives_502_with_each_attempt(
    upstream: MockUpstream, stream: bool
) -> None:
    # Twice three attempts, all failing; a high threshold keeps the circuit out of it.
    config = alone(upstream, {"fail_first": 6}, circuit_breaker={"failure_threshold": 10})
    async with serving(config, upstream) as gw:
        raw = await post(gw.url, stream=stream)
        with pytest.raises(openai.APIStatusError) as caught:
            await ask(gw.url, stream=stream)

    assert_all_failed(raw, 502, [("bad", "bad-model", 503)] * 3)
    assert caught.value.status_code == 502
    assert upstream.stats.by_model == {"bad-model": 6}


@STREAMS
async def test_a_target_failing_past_max_attempts_falls_back_to_the_next(
    upstream: MockUpstream, stream: bool
) -> None:
    async with serving(bad_then_good(upstream, {"fail_first": 5}), upstream) as gw:
        reply = await ask(gw.url, stream=stream)

    assert reply.text == FULL_ANSWER
    assert (reply.provider, reply.upstream_model, reply.model) == ("good",) + ("good-model",) * 2
    assert reply.attempts == 3 + 1
    assert upstream.stats.by_model == {"bad-model": 3, "good-model": 1}


# --- 429 and Retry-After ------------------------------------------------------------------


@STREAMS
async def test_429_with_a_short_retry_after_is_retried_after_that_wait(
    upstream: MockUpstream, stream: bool
) -> None:
    faults = {"fail_first": 2, "fail_status": 429, "retry_after": 0.08}  # max_backoff: 0.1
    async with serving(alone(upstream, faults), upstream) as gw:
        started = time.monotonic()
        reply = await ask(gw.url, stream=stream)
        took = time.monotonic() - started

    assert reply.text == FULL_ANSWER and reply.attempts == 3
    # Two waits of the upstream's 80 ms, not the configured 10-20 ms backoff.
    assert took >= 0.16


@STREAMS
async def test_429_asking_longer_than_max_backoff_gives_the_target_up_at_once(
    upstream: MockUpstream, stream: bool
) -> None:
    faults = {"fail_status": 429, "retry_after": 30}
    async with serving(bad_then_good(upstream, faults), upstream) as gw:
        started = time.monotonic()
        reply = await ask(gw.url, stream=stream)
        took = time.monotonic() - started

    assert (reply.text, reply.provider, reply.attempts) == (FULL_ANSWER, "good", 2)
    assert upstream.stats.by_model == {"bad-model": 1, "good-model": 1}
    assert took < 1.0  # neither the 30 s asked for nor a retry


@STREAMS
async def test_429_asking_longer_than_max_backoff_on_the_only_target_passes_the_wait_on(
    upstream: MockUpstream, stream: bool
) -> None:
    async with serving(alone(upstream, {"fail_status": 429, "retry_after": 30}), upstream) as gw:
        raw = await post(gw.url, stream=stream)

    assert_all_failed(raw, 429, [("bad", "bad-model", 429)])  # one attempt, no waiting
    assert raw.headers["Retry-After"] == "30"
    assert raw.seconds < 1.0


@STREAMS
async def test_every_attempt_429_gives_the_client_429(upstream: MockUpstream, stream: bool) -> None:
    config = gateway_config(
        {"one": provider(upstream, {"fault": "429"}), "two": provider(upstream, {"fault": "429"})},
        {"chat": alias(("one", "m1"), ("two", "m2"))},
        retry={"max_attempts": 2},
    )
    async with serving(config, upstream) as gw:
        raw = await post(gw.url, stream=stream)
        with pytest.raises(openai.RateLimitError):
            await ask(gw.url, stream=stream)

    assert_all_failed(raw, 429, [("one", "m1", 429)] * 2 + [("two", "m2", 429)] * 2)
    assert int(raw.headers["Retry-After"]) >= 1
    assert upstream.stats.by_model == {"m1": 4, "m2": 4}


# --- the connection breaks before any byte ------------------------------------------------


@pytest.mark.parametrize(
    ("stream", "faults"),
    [
        (False, {"reset": 1}),
        (True, {"reset": 1}),
        (False, {"cut_after": 0}),  # without a stream, cut-after closes before any byte
    ],
    ids=["json-reset", "stream-reset", "json-cut"],
)
async def test_a_broken_connection_before_any_byte_is_retried_then_falls_back(
    upstream: MockUpstream, stream: bool, faults: dict[str, Any]
) -> None:
    async with serving(bad_then_good(upstream, faults), upstream) as gw:
        reply = await ask(gw.url, stream=stream)
    async with serving(alone(upstream, faults), upstream) as gw:
        alone_raw = await post(gw.url, stream=stream)

    assert (reply.text, reply.provider, reply.attempts) == (FULL_ANSWER, "good", 3 + 1)
    assert upstream.stats.aborted == 3 + 3
    assert_all_failed(alone_raw, 502, [("bad", "bad-model", None)] * 3)


async def test_a_json_answer_that_is_not_json_is_retried_then_falls_back(
    upstream: MockUpstream,
) -> None:
    async with serving(bad_then_good(upstream, {"fault": "malformed-0"}), upstream) as gw:
        reply = await ask(gw.url, stream=False)

    assert (reply.text, reply.provider, reply.attempts) == (FULL_ANSWER, "good", 3 + 1)
    assert upstream.stats.by_model == {"bad-model": 3, "good-model": 1}


# --- errors a fallback can fix, and errors it cannot --------------------------------------


@STREAMS
async def test_context_length_moves_to_the_next_target_without_resending(
    upstream: MockUpstream, stream: bool
) -> None:
    async with serving(bad_then_good(upstream, {"fault": "context-length"}), upstream) as gw:
        reply = await ask(gw.url, stream=stream)

    assert (reply.text, reply.provider, reply.attempts) == (FULL_ANSWER, "good", 2)
    assert upstream.stats.by_model == {"bad-model": 1, "good-model": 1}


@STREAMS
async def test_context_length_on_the_only_target_is_the_upstreams_400(
    upstream: MockUpstream, stream: bool
) -> None:
    async with serving(alone(upstream, {"fault": "context-length"}), upstream) as gw:
        with pytest.raises(openai.BadRequestError) as caught:
            await ask(gw.url, stream=stream)

    assert caught.value.status_code == 400
    assert caught.value.code == "context_length_exceeded"
    assert "maximum context length" in caught.value.message
    assert upstream.stats.by_model == {"bad-model": 1}  # never resent to the same target


@STREAMS
async def test_content_policy_goes_back_to_the_client_after_one_attempt_without_fallback(
    upstream: MockUpstream, other: MockUpstream, stream: bool
) -> None:
    config = gateway_config(
        {"bad": provider(upstream, {"fault": "content-policy"}), "good": provider(other)},
        {"chat": alias(("bad", "bad-model"), ("good", "good-model"))},
    )
    async with serving(config, upstream, other) as gw:
        with pytest.raises(openai.BadRequestError) as caught:
            await ask(gw.url, stream=stream)

    assert caught.value.code == "content_policy_violation"
    assert "safety system" in caught.value.message
    assert (upstream.stats.requests, other.stats.requests) == (1, 0)


@STREAMS
async def test_401_from_a_target_falls_back_to_the_next(stream: bool, other: MockUpstream) -> None:
    async with await start_mock_upstream(MockUpstreamOptions(api_key="right-key")) as locked:
        config = gateway_config(
            {"locked": provider(locked, api_key="wrong-key"), "good": provider(other)},
            {"chat": alias(("locked", "m"), ("good", "good-model"))},
        )
        async with serving(config, locked, other) as gw:
            reply = await ask(gw.url, stream=stream)
        assert locked.stats.requests == 1  # a wrong key is not retried

    assert (reply.text, reply.provider, reply.attempts) == (FULL_ANSWER, "good", 2)
    assert other.stats.requests == 1


# --- circuit breakers ---------------------------------------------------------------------


def target_report(report: Any, model: str) -> dict[str, Any]:
    found = [t for t in report["targets"] if t["model"] == model]
    assert len(found) == 1, report
    assert isinstance(found[0], dict)
    return found[0]


@STREAMS
async def test_circuit_opens_rejects_without_calling_upstream_then_closes_on_recovery(
    upstream: MockUpstream, stream: bool
) -> None:
    config = gateway_config(
        {"bad": provider(upstream, {"down_for": 0.6})},
        {"chat": alias(("bad", "bad-model"))},
        retry={"max_attempts": 1},
        circuit_breaker={"failure_threshold": 2, "open_timeout": "300ms", "success_threshold": 1},
        admin_key=ADMIN_KEY,
    )
    async with serving(config, upstream) as gw:
        started = time.monotonic()
        for _ in range(2):
            assert (await post(gw.url, stream=stream)).status == 502
        rejected = await post(gw.url, stream=stream)
        assert upstream.stats.requests == 2  # the open circuit made no network call
        open_report = target_report((await admin_targets(gw.url))[1], "bad-model")
        ready_while_open = await get_status(gw.url + "/ready")

        await anyio.sleep(0.7 - (time.monotonic() - started))  # the target is back
        reply = await ask(gw.url, stream=stream)
        closed_report = target_report((await admin_targets(gw.url))[1], "bad-model")
        ready_after = await get_status(gw.url + "/ready")

    assert rejected.status == 503
    assert (rejected.error["type"], rejected.error["code"]) == ("circuit_open", "circuit_open")
    assert int(rejected.headers["Retry-After"]) >= 1
    assert open_report["circuit"] == "open" and open_report["consecutive_failures"] == 2
    assert 0 < open_report["half_open_in_s"] <= 0.3
    assert (reply.text, reply.provider, reply.attempts) == (FULL_ANSWER, "bad", 1)
    assert closed_report["circuit"] == "closed" and closed_report["consecutive_failures"] == 0
    assert (ready_while_open, ready_after) == (503, 200)  # `chat` had no usable target


async def test_admin_targets_needs_the_admin_key_and_is_off_without_one(
    upstream: MockUpstream,
) -> None:
    config = alone(upstream, {})
    async with serving({**config, "auth": {"admin_key": ADMIN_KEY}}, upstream) as gw:
        without = await admin_targets(gw.url, None)
        wrong = await admin_targets(gw.url, "not-the-key")
        right = await admin_targets(gw.url)
    async with serving(config, upstream) as gw:
        off = await admin_targets(gw.url)

    assert (without[0], wrong[0], right[0], off[0]) == (403, 403, 200, 404)
    assert without[1]["error"]["type"] == "permission_error"
    assert ADMIN_KEY not in msgspec.json.encode(without[1]).decode()
    assert target_report(right[1], "bad-model")["circuit"] == "closed"


@STREAMS
async def test_a_target_down_for_a_while_is_bypassed_then_used_again_when_it_recovers(
    upstream: MockUpstream, stream: bool
) -> None:
    config = gateway_config(
        {"primary": provider(upstream, {"down_for": 0.8}), "backup": provider(upstream)},
        {"chat": alias(("primary", "primary-model"), ("backup", "backup-model"))},
        circuit_breaker={"failure_threshold": 2, "open_timeout": "250ms", "success_threshold": 1},
    )
    async with serving(config, upstream) as gw:
        started = time.monotonic()
        first = await ask(gw.url, stream=stream)  # two failures open primary's circuit
        after_first = dict(upstream.stats.by_model)
        second = await ask(gw.url, stream=stream)  # open: straight to the backup
        after_second = dict(upstream.stats.by_model)
        await anyio.sleep(0.45 - (time.monotonic() - started))
        probe = await ask(gw.url, stream=stream)  # half-open, still down: opens again
        after_probe = dict(upstream.stats.by_model)
        await anyio.sleep(1.0 - (time.monotonic() - started))
        recovered = [await ask(gw.url, stream=stream) for _ in range(2)]

    assert [(r.provider, r.attempts) for r in (first, second, probe)] == [
        ("backup", 3),
        ("backup", 1),
        ("backup", 2),
    ]
    assert after_first == {"primary-model": 2, "backup-model": 1}
    assert after_second == {"primary-model": 2, "backup-model": 2}
    assert after_probe == {"primary-model": 3, "backup-model": 3}
    assert [(r.provider, r.upstream_model, r.attempts) for r in recovered] == [
        ("primary", "primary-model", 1)
    ] * 2
    assert all(r.text == FULL_ANSWER for r in (first, second, probe, *recovered))


# --- alias-level fallbacks ----------------------------------------------------------------


@STREAMS
async def test_when_every_target_fails_the_fallback_alias_answers(
    upstream: MockUpstream, stream: bool
) -> None:
    config = gateway_config(
        {"bad": provider(upstream, {"fail_status": 500}), "good": provider(upstream)},
        {
            "chat": alias(("bad", "bad-1"), ("bad", "bad-2"), fallbacks=["spare"]),
            "spare": alias(("good", "spare-model")),
        },
        retry={"max_attempts": 2},
    )
    async with serving(config, upstream) as gw:
        reply = await ask(gw.url, stream=stream)

    assert reply.text == FULL_ANSWER
    assert (reply.provider, reply.upstream_model, reply.model) == (
        "good",
        "spare-model",
        "spare-model",
    )
    assert reply.attempts == 2 + 2 + 1
    assert upstream.stats.by_model == {"bad-1": 2, "bad-2": 2, "spare-model": 1}


async def test_a_half_open_circuit_lets_one_probe_through_while_others_go_on(
    upstream: MockUpstream,
) -> None:
    # latency makes the probe slow, so that every other request arrives while it runs.
    config = gateway_config(
        {
            "primary": provider(upstream, {"down_for": 0.3, "latency": 0.2}),
            "backup": provider(upstream),
        },
        {"chat": alias(("primary", "primary-model"), ("backup", "backup-model"))},
        retry={"max_attempts": 1},
        circuit_breaker={"failure_threshold": 1, "open_timeout": "200ms", "success_threshold": 1},
    )
    async with serving(config, upstream) as gw:
        started = time.monotonic()
        first = await ask(gw.url, stream=True)  # fails on primary, which opens
        await anyio.sleep(0.6 - (time.monotonic() - started))  # half-open, and back up
        replies: list[Reply] = []

        async def one() -> None:
            replies.append(await ask(gw.url, stream=True))

        async with anyio.create_task_group() as tasks:
            for _ in range(4):
                tasks.start_soon(one)

    assert first.provider == "backup"
    assert sorted(reply.provider for reply in replies) == ["backup"] * 3 + ["primary"]
    assert upstream.stats.by_model == {"primary-model": 2, "backup-model": 4}
    assert all(reply.text == FULL_ANSWER for reply in replies)
