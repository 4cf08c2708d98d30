"""Cache keys, the memory store, answer assembly and replay, in-flight requests (no sockets)."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import msgspec
import pytest

from resillm.cache import BODY_OVERHEAD, IGNORED_FIELDS, Flights, ResponseCache, cache_key
from resillm.cache_answer import (
    AnswerRecorder,
    CachedAnswer,
    CachedBody,
    CachedChoice,
    CachedToolCall,
    answer_decoder,
    answer_encoder,
    completion_json,
    stream_events,
)
from resillm.cache_store import ENTRY_OVERHEAD_BYTES, MemoryCacheStore
from resillm.cli import summary
from resillm.config import CacheConfig
from resillm.config_loader import ConfigError, config_from_dict
from resillm.schema import ChatCompletion, ChatCompletionChunk, Usage, json_decoder

BASE: dict[str, Any] = {
    "model": "chat",
    "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
    "temperature": 0.2,
    "max_tokens": 50,
}
USAGE = Usage(prompt_tokens=5, completion_tokens=3, total_tokens=8)
MINIMAL: dict[str, Any] = {
    "providers": {"m": {"type": "mock"}},
    "models": {"chat": {"targets": [{"provider": "m", "model": "m"}]}},
}


def key_of(body: dict[str, Any] | bytes, alias: str = "chat") -> str:
    raw = json_decoder.decode(body) if isinstance(body, bytes) else body
    return cache_key(alias, raw)


# -- keys ----------------------------------------------------------------------------------


def test_key_ignores_key_order_and_whitespace() -> None:
    compact = b'{"model":"chat","messages":[{"role":"user","content":"hi"}],"temperature":0.2}'
    spaced = b"""{
        "temperature": 0.2,
        "messages": [ {"content": "hi", "role": "user"} ],
        "model": "chat"
    }"""
    assert key_of(compact) == key_of(spaced)


@pytest.mark.parametrize("field", sorted(IGNORED_FIELDS))
def test_key_ignores_fields_that_do_not_change_the_answer(field: str) -> None:
    value: Any = {"include_usage": True} if field == "stream_options" else "x"
    assert key_of({**BASE, field: value}) == key_of(BASE)


def test_key_treats_null_as_absent_and_n_1_as_no_n() -> None:
    assert key_of({**BASE, "seed": None, "n": 1}) == key_of(BASE)


def test_key_treats_integral_floats_as_integers() -> None:
    assert key_of({**BASE, "temperature": 1}) == key_of({**BASE, "temperature": 1.0})


@pytest.mark.parametrize(
    "change",
    [
        {"messages": [{"role": "user", "content": "hello"}]},
        {"temperature": 0.3},
        {"max_tokens": 51},
        {"max_completion_tokens": 50},
        {"top_p": 0.5},
        {"stop": ["\n"]},
        {"seed": 7},
        {"response_format": {"type": "json_object"}},
        {"tools": [{"type": "function", "function": {"name": "f"}}]},
        {"tool_choice": "required"},
        {"n": 2},
        {"some_vendor_field": True},
    ],
)
def test_key_changes_with_what_shapes_the_answer(change: dict[str, Any]) -> None:
    assert key_of({**BASE, **change}) != key_of(BASE)


def test_key_changes_with_the_alias() -> None:
    assert key_of(BASE, alias="other") != key_of(BASE)


def test_key_is_a_short_hex_string() -> None:
    key = key_of(BASE)
    assert len(key) == 40 and int(key, 16) >= 0


# -- memory store --------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.anyio
async def test_memory_entries_expire_after_their_ttl() -> None:
    clock = FakeClock()
    store = MemoryCacheStore(max_entries=10, max_bytes=10**6, clock=clock)
    await store.set("a", b"1", ttl_s=60)
    clock.now += 59.9
    assert await store.get("a") == b"1"
    clock.now += 0.2
    assert await store.get("a") is None
    assert len(store) == 0 and store.bytes == 0


@pytest.mark.anyio
async def test_memory_purge_drops_only_expired_entries() -> None:
    clock = FakeClock()
    store = MemoryCacheStore(max_entries=10, max_bytes=10**6, clock=clock)
    await store.set("old", b"1", ttl_s=10)
    clock.now += 5
    await store.set("new", b"2", ttl_s=10)
    clock.now += 6
    assert store.purge_expired() == 1
    assert await store.get("new") == b"2"


@pytest.mark.anyio
async def test_memory_evicts_the_least_recently_used_beyond_max_entries() -> None:
    store = MemoryCacheStore(max_entries=2, max_bytes=10**6)
    await store.set("a", b"1", ttl_s=60)
    await store.set("b", b"2", ttl_s=60)
    assert await store.get("a") == b"1"  # a is now more recent than b
    await store.set("c", b"3", ttl_s=60)
    assert await store.get("b") is None
    assert await store.get("a") == b"1" and await store.get("c") == b"3"


@pytest.mark.anyio
async def test_memory_evicts_beyond_max_bytes() -> None:
    entry = 1 + 100 + ENTRY_OVERHEAD_BYTES
    store = MemoryCacheStore(max_entries=100, max_bytes=3 * entry)
    for key in "abcd":
        await store.set(key, b"x" * 100, ttl_s=60)
    assert store.bytes == 3 * entry
    assert await store.get("a") is None
    assert [await store.get(k) for k in "bcd"] == [b"x" * 100] * 3


@pytest.mark.anyio
async def test_memory_skips_an_entry_larger_than_max_bytes() -> None:
    store = MemoryCacheStore(max_entries=100, max_bytes=1000)
    await store.set("small", b"x", ttl_s=60)
    await store.set("huge", b"x" * 2000, ttl_s=60)
    assert await store.get("huge") is None
    assert await store.get("small") == b"x"


@pytest.mark.anyio
async def test_memory_replacing_an_entry_keeps_the_byte_count_exact() -> None:
    store = MemoryCacheStore(max_entries=10, max_bytes=10**6)
    await store.set("a", b"x" * 10, ttl_s=60)
    await store.set("a", b"x" * 30, ttl_s=60)
    assert len(store) == 1
    assert store.bytes == 1 + 30 + ENTRY_OVERHEAD_BYTES


@pytest.mark.anyio
async def test_memory_resize_evicts_down_to_the_new_bounds() -> None:
    store = MemoryCacheStore(max_entries=10, max_bytes=10**6)
    for key in "abcde":
        await store.set(key, b"1", ttl_s=60)
    store.resize(max_entries=2, max_bytes=10**6)
    assert len(store) == 2 and await store.get("e") == b"1"


def test_memory_store_matches_a_plain_lru_through_long_churn() -> None:
    """Thousands of stores, reads (which reorder), expiries and sweeps against a reference
    model: the same entries kept, evicted and expired, and the byte count exact."""
    clock = FakeClock()
    store = MemoryCacheStore(max_entries=50, max_bytes=50 * 200, clock=clock)
    model: dict[str, tuple[bytes, float]] = {}  # least recently used first
    rng = random.Random(7)
    for step in range(20000):
        key = f"k{rng.randrange(120)}"
        action = rng.random()
        if action < 0.5:
            value = b"v" * rng.randrange(1, 60)
            store.set_now(key, value, ttl_s=30)
            model.pop(key, None)
            model[key] = (value, clock.now + 30)
            while (
                len(model) > 50
                or sum(len(k) + len(v) + ENTRY_OVERHEAD_BYTES for k, (v, _) in model.items())
                > 50 * 200
            ):
                del model[next(iter(model))]
        elif action < 0.9:
            expected = model.get(key)
            if expected is not None and expected[1] <= clock.now:
                del model[key]
                expected = None
            elif expected is not None:
                model[key] = model.pop(key)  # read: now the most recent
            assert store.get_now(key) == (expected[0] if expected else None), step
        elif action < 0.98:
            clock.now += rng.random() * 3
        else:
            gone = [k for k, (_, at) in model.items() if at <= clock.now]
            assert store.purge_expired() == len(gone), step
            for k in gone:
                del model[k]
        assert len(store) == len(model), step
    assert store.bytes == sum(len(k) + len(v) + ENTRY_OVERHEAD_BYTES for k, (v, _) in model.items())


# -- assembly ------------------------------------------------------------------------------


def sse(*events: dict[str, Any] | str) -> list[bytes]:
    return [
        b"data: " + (e.encode() if isinstance(e, str) else msgspec.json.encode(e)) + b"\n\n"
        for e in events
    ]


def chunk(*choices: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m-1",
            "choices": list(choices), **extra}  # fmt: skip


def record(messages: list[bytes], *, stream: bool = True) -> CachedAnswer | None:
    recorder = AnswerRecorder(stream=stream)
    for body in messages:
        recorder.feed(body)
    return recorder.answer(provider="p", model="fallback-model", usage=USAGE)


def test_stream_assembly_joins_text_and_tool_fragments_by_index() -> None:
    answer = record(
        sse(
            chunk({"index": 0, "delta": {"role": "assistant", "content": ""}}),
            chunk({"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}),
            chunk({"index": 1, "delta": {"tool_calls": [
                {"index": 1, "id": "call_b", "type": "function",
                 "function": {"name": "g", "arguments": ""}}]}, "finish_reason": None}),
            chunk({"index": 1, "delta": {"tool_calls": [
                {"index": 0, "id": "call_a", "type": "function",
                 "function": {"name": "f", "arguments": '{"x"'}}]}, "finish_reason": None}),
            chunk({"index": 1, "delta": {"tool_calls": [
                {"index": 1, "function": {"arguments": "{}"}},
                {"index": 0, "function": {"arguments": ": 1}"}}]}, "finish_reason": None}),
            chunk({"index": 0, "delta": {"content": "lo"}, "finish_reason": None}),
            chunk({"index": 0, "delta": {}, "finish_reason": "stop"}),
            chunk({"index": 1, "delta": {}, "finish_reason": "tool_calls"}),
            "[DONE]",
        )
    )  # fmt: skip
    assert answer is not None
    assert answer.model == "m-1" and answer.provider == "p" and answer.usage == USAGE
    text, tools = answer.choices
    assert (text.content, text.finish_reason, text.tool_calls) == ("Hello", "stop", None)
    assert tools.content is None and tools.finish_reason == "tool_calls"
    assert tools.tool_calls == [
        CachedToolCall("call_a", "f", '{"x": 1}'),
        CachedToolCall("call_b", "g", "{}"),
    ]


def test_stream_assembly_takes_the_usage_chunk_when_there_is_one() -> None:
    usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    answer = record(
        sse(
            chunk({"index": 0, "delta": {"content": "a"}, "finish_reason": "stop"}),
            chunk(usage=usage),
            "[DONE]",
        )
    )
    assert answer is not None and answer.usage == Usage(**usage)


def test_events_split_or_joined_across_body_messages_are_read() -> None:
    events = b"".join(
        sse(chunk({"index": 0, "delta": {"content": "a"}, "finish_reason": "stop"}), "[DONE]")
    )
    answer = record([events])
    assert answer is not None and answer.choices[0].content == "a"


@pytest.mark.parametrize(
    "tail",
    [
        [],  # cut: no [DONE]
        sse('{"error": {"message": "boom", "type": "upstream_error"}}'),
        sse("{not json", "[DONE]"),
        sse("[DONE]", '{"choices": []}'),
    ],
)
def test_a_stream_that_did_not_end_well_is_not_an_answer(tail: list[bytes]) -> None:
    head = sse(chunk({"index": 0, "delta": {"content": "a"}, "finish_reason": "stop"}))
    assert record(head + tail) is None


def test_a_choice_without_a_finish_reason_is_not_an_answer() -> None:
    assert record(sse(chunk({"index": 0, "delta": {"content": "a"}}), "[DONE]")) is None


def test_json_assembly_reads_text_and_tool_calls() -> None:
    body = {
        "id": "x", "object": "chat.completion", "created": 1, "model": "m-2",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "[]"}},
            ]}}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        "system_fingerprint": "fp",
    }  # fmt: skip
    encoded = msgspec.json.encode(body)
    answer = record([encoded[:10], encoded[10:]], stream=False)
    assert answer is not None
    assert answer.model == "m-2" and answer.system_fingerprint == "fp"
    assert answer.choices[0].tool_calls == [
        CachedToolCall("c1", "f", "{}"),
        CachedToolCall("c2", "g", "[]"),
    ]


def test_json_that_is_not_an_answer_is_not_stored() -> None:
    assert record([b"{not json"], stream=False) is None
    assert record([b'{"error": {"message": "x"}}'], stream=False) is None


# -- replay --------------------------------------------------------------------------------

TEXT = CachedAnswer(
    model="m-1",
    provider="p",
    choices=[CachedChoice(0, "x" * 2500, None, None, "stop")],
    usage=USAGE,
)
TOOL = CachedAnswer(
    model="m-1",
    provider="p",
    choices=[
        CachedChoice(0, None, [CachedToolCall("call_1", "f", '{"a": 1}')], None, "tool_calls")
    ],
)


def chunks_of(events: list[bytes]) -> list[ChatCompletionChunk]:
    assert events[-1] == b"data: [DONE]\n\n"
    decoder = msgspec.json.Decoder(ChatCompletionChunk)
    return [decoder.decode(e.removeprefix(b"data: ").rstrip()) for e in events[:-1]]


def test_replayed_json_is_a_fresh_chat_completion() -> None:
    first = msgspec.json.decode(completion_json(TEXT), type=ChatCompletion)
    second = msgspec.json.decode(completion_json(TEXT), type=ChatCompletion)
    assert first.id != second.id
    assert first.model == "m-1" and first.usage == USAGE
    assert first.choices[0].message.content == "x" * 2500
    tool = msgspec.json.decode(completion_json(TOOL), type=ChatCompletion).choices[0]
    assert tool.message.content is None and tool.finish_reason == "tool_calls"
    assert tool.message.tool_calls is not None
    assert tool.message.tool_calls[0].function.arguments == '{"a": 1}'


def test_replayed_stream_is_role_text_pieces_finish_and_done() -> None:
    chunks = chunks_of(list(stream_events(TEXT, include_usage=False)))
    assert len({c.id for c in chunks}) == 1 and {c.model for c in chunks} == {"m-1"}
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == "x" * 2500 and len(chunks) == 5  # role, three pieces, finish
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)


def test_replayed_stream_ends_with_usage_when_asked() -> None:
    chunks = chunks_of(list(stream_events(TEXT, include_usage=True)))
    assert chunks[-1].choices == [] and chunks[-1].usage == USAGE


def test_replayed_tool_call_sends_id_and_name_then_arguments() -> None:
    chunks = chunks_of(list(stream_events(TOOL, include_usage=False)))
    head = chunks[1].choices[0].delta.tool_calls
    tail = chunks[2].choices[0].delta.tool_calls
    assert head is not None and tail is not None
    assert (head[0].index, head[0].id, head[0].type) == (0, "call_1", "function")
    assert head[0].function is not None and head[0].function.name == "f"
    assert tail[0].function is not None and tail[0].function.arguments == '{"a": 1}'
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_answers_round_trip_through_msgpack() -> None:
    for answer in (TEXT, TOOL, CachedBody("m", "p", b'{"choices":[]}')):
        assert answer_decoder.decode(answer_encoder.encode(answer)) == answer


# -- the cache and its flights -------------------------------------------------------------


@pytest.mark.anyio
async def test_cache_stores_and_finds_an_answer() -> None:
    cache = ResponseCache(CacheConfig(enabled=True))
    await cache.start()
    try:
        assert (await cache.get("k")).result == "miss"
        await cache.put("k", TOOL)
        assert await cache.get("k") == (TOOL, "hit")
    finally:
        await cache.stop()


@pytest.mark.anyio
async def test_a_stored_json_body_is_read_into_its_answer_when_found() -> None:
    body = (
        b'{"id":"x","model":"m-2","system_fingerprint":"fp","choices":[{"index":0,'
        b'"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],'
        b'"usage":{"prompt_tokens":5,"completion_tokens":3,"total_tokens":8}}'
    )
    cache = ResponseCache(CacheConfig(enabled=True))
    await cache.put("k", CachedBody("m-fallback", "p", body))
    found = await cache.get("k")
    assert found == (
        CachedAnswer("m-2", "p", [CachedChoice(0, "hi", None, None, "stop")], USAGE, "fp"),
        "hit",
    )


def test_the_memory_store_keeps_a_json_body_as_it_is_and_counts_its_size() -> None:
    body = (
        b'{"model":"m","choices":[{"index":0,"message":{"content":"hi"},"finish_reason":"stop"}]}'
    )
    cache = ResponseCache(CacheConfig(enabled=True))
    assert cache.put_now("k", CachedBody("m", "p", body))
    kept = cache.memory.get_now("k")
    assert isinstance(kept, CachedBody) and kept.body is body  # not copied, not encoded
    assert cache.memory.bytes == len("k") + len(body) + 2 + BODY_OVERHEAD + ENTRY_OVERHEAD_BYTES
    assert cache.put_now("s", TEXT)  # a stream's assembled answer: encoded, sized exactly
    assert cache.memory.get_now("s") == answer_encoder.encode(TEXT)
    assert cache.get_now("k") == (
        CachedAnswer("m", "p", [CachedChoice(0, "hi", None, None, "stop")], None, None),
        "hit",
    )


@pytest.mark.anyio
async def test_a_stored_json_body_that_is_not_a_whole_answer_is_a_miss() -> None:
    unfinished = b'{"model":"m","choices":[{"index":0,"message":{"content":"hi"}}]}'
    cache = ResponseCache(CacheConfig(enabled=True))
    await cache.put("k", CachedBody("m", "p", unfinished))
    assert await cache.get("k") == (None, "miss")


@pytest.mark.anyio
async def test_an_unreadable_entry_is_a_miss() -> None:
    cache = ResponseCache(CacheConfig(enabled=True))
    await cache.memory.set("k", b"\x93garbage", ttl_s=60)
    assert (await cache.get("k")).result == "miss"


@pytest.mark.anyio
async def test_turning_the_cache_off_empties_the_memory_store() -> None:
    cache = ResponseCache(CacheConfig(enabled=True))
    await cache.put("k", TEXT)
    await cache.configure(CacheConfig(enabled=False))
    assert len(cache.memory) == 0


@pytest.mark.anyio
async def test_a_flight_has_one_leader_and_lands_once() -> None:
    flights = Flights()
    flight = flights.lead("k")
    assert flight is not None and flight.waiters is None  # no one waits: no future made
    assert flights.lead("k") is None
    waiters = flights.current("k")
    assert waiters is not None and flights.current("k") is waiters  # one for all waiters
    flights.land("k", flight, TEXT)
    assert await waiters == TEXT
    assert flights.current("k") is None and len(flights) == 0
    flights.land("k", flight, None)  # a second landing changes nothing
    assert waiters.result() == TEXT


@pytest.mark.anyio
async def test_waiting_on_a_flight_is_cancellable() -> None:
    flights = Flights()
    flight = flights.lead("k")
    waiters = flights.current("k")
    assert flight is not None and waiters is not None
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await asyncio.shield(waiters)
    flights.land("k", flight, None)
    assert waiters.result() is None


# -- config --------------------------------------------------------------------------------


def test_cache_config_defaults_follow_the_spec() -> None:
    cache = config_from_dict({**MINIMAL, "cache": {}}).cache
    assert (cache.enabled, cache.backend, cache.ttl, cache.max_size) == (
        False,
        "memory",
        3600.0,
        1000,
    )
    assert cache.redis_url == "redis://127.0.0.1:6379/0"
    assert cache.coalesce and cache.redis_timeout == 0.25


def test_cache_config_takes_durations_and_rejects_unknown_keys() -> None:
    cache = config_from_dict(
        {**MINIMAL, "cache": {"enabled": True, "ttl": "5m", "coalesce_timeout": "2s"}}
    ).cache
    assert (cache.ttl, cache.coalesce_timeout) == (300.0, 2.0)
    with pytest.raises(ConfigError, match="max_sizes"):
        config_from_dict({**MINIMAL, "cache": {"max_sizes": 5}})
    with pytest.raises(ConfigError, match=r"cache\.ttl: must be a duration greater than 0"):
        config_from_dict({**MINIMAL, "cache": {"ttl": 0}})


def test_check_summary_names_the_cache() -> None:
    on = config_from_dict({**MINIMAL, "cache": {"enabled": True, "backend": "redis"}})
    assert "cache: redis, ttl 3600s, coalescing on" in summary("x.yaml", on)
    assert "cache: off" in summary("x.yaml", config_from_dict(MINIMAL))
