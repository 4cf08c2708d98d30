"""Streaming phases: time to first token at low concurrency, and many streams held at once."""

from __future__ import annotations

import asyncio
import bisect
import itertools
import math
import time
from dataclasses import dataclass, field

import aiohttp
import msgspec
from loadgen import JSON_HEADERS, Figures, Samples, Target, body, percentile
from processes import listen_overflows

HELD_TIMEOUT_S = 120.0


class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    delta: _Delta


class _Chunk(msgspec.Struct):
    choices: list[_Choice] = []


_decode_chunk = msgspec.json.Decoder(_Chunk).decode


@dataclass
class Stream:
    """What the client saw of one stream: when each content chunk arrived, and the end."""

    start: float
    arrivals: list[float] = field(default_factory=list)
    done: bool = False  # `data: [DONE]` arrived
    end: float = 0.0  # the answer's last byte

    @property
    def ttft(self) -> float:
        return self.arrivals[0] - self.start

    def gaps(self) -> list[float]:
        return [later - earlier for earlier, later in itertools.pairwise(self.arrivals)]


def _read_events(events: list[bytes], stream: Stream, arrived: float) -> None:
    for event in events:
        for line in event.split(b"\n"):
            if line.startswith(b"data: {"):
                chunk = _decode_chunk(line[6:])
                found = sum(1 for choice in chunk.choices if choice.delta.content)
                stream.arrivals.extend([arrived] * found)
            elif line.strip() == b"data: [DONE]":
                stream.done = True


async def one_stream(
    session: aiohttp.ClientSession, url: str, data: bytes, headers: dict[str, str]
) -> Stream:
    """One streamed answer, read as whatever the socket has (not line by line) to keep the
    driver's own cost per chunk small; chunks that arrive in one read share its arrival time.
    Raises RuntimeError when the answer is not a stream that ends with `[DONE]`."""
    stream = Stream(time.perf_counter())
    pending = b""
    async with session.post(url, data=data, headers=headers) as response:
        if response.status != 200:
            raise RuntimeError(f"status {response.status}")
        async for data_read in response.content.iter_any():
            arrived = time.perf_counter()
            *events, pending = (pending + data_read).replace(b"\r\n", b"\n").split(b"\n\n")
            _read_events(events, stream, arrived)
    stream.end = time.perf_counter()
    _read_events([pending], stream, stream.end)
    if not stream.done:
        raise RuntimeError(f"no [DONE] after {len(stream.arrivals)} content chunk(s)")
    if not stream.arrivals:
        raise RuntimeError("no content chunk")
    return stream


_STREAM_ERRORS = (aiohttp.ClientError, TimeoutError, RuntimeError, msgspec.DecodeError)


async def streaming(
    session: aiohttp.ClientSession,
    target: Target,
    count: int,
    concurrency: int,
    samples: Samples,
) -> None:
    """`count` streams, `concurrency` at a time: time to first content chunk; at c=8 also the
    mean gap between chunks (the mock sends them back to back: the gateway's cost per chunk)."""
    left = count

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            data = target.body(stream=True)
            try:
                stream = await one_stream(session, target.url, data, JSON_HEADERS)
            except _STREAM_ERRORS:
                samples.stream_errors += 1
                continue
            samples.ttft_ms[concurrency].append(stream.ttft * 1000)
            if concurrency > 1 and len(stream.arrivals) > 1:
                spread = stream.arrivals[-1] - stream.arrivals[0]
                samples.gaps_us.append(spread / (len(stream.arrivals) - 1) * 1e6)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


HELD_SHARE = 0.9  # "held": while at least this share of the peak number were open


def open_spans(streams: list[Stream]) -> tuple[int, list[tuple[float, float]]]:
    """The most streams open at one time (first content chunk to end), and the spans of
    time when at least HELD_SHARE of that many were open."""
    edges = sorted(
        [(stream.arrivals[0], 1) for stream in streams] + [(stream.end, -1) for stream in streams]
    )
    most = now = 0
    for _, step in edges:  # at a tie the end (-1) sorts first: touching is not overlapping
        now += step
        most = max(most, now)
    spans: list[tuple[float, float]] = []
    now, since = 0, math.nan
    for moment, step in edges:
        before, now = now, now + step
        if before < HELD_SHARE * most <= now:
            since = moment
        elif now < HELD_SHARE * most <= before:
            spans.append((since, moment))
    return most, spans


def within(moment: float, spans: list[tuple[float, float]]) -> bool:
    index = bisect.bisect_right(spans, (moment, math.inf)) - 1
    return index >= 0 and spans[index][0] <= moment < spans[index][1]


async def held_streams(target: Target, count: int, chunks: int, figures: Figures) -> None:
    """`count` streams opened at once and held while the mock paces their chunks.

    A stream counts as completed when it ends with `[DONE]` after all `chunks` content
    chunks. The gaps between consecutive content chunks of the completed streams, while
    at least 90% of the peak number were open, give the chunk-delay percentiles (the
    mock's own pacing is in the direct figures too); `held_gap_p99_all_ms` counts all.
    One session with no connection limit, so all `count` connections are open together.
    """
    headers = {**JSON_HEADERS, **target.held_headers}
    bodies = [body(target.held_model, stream=True) for _ in range(count)]
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
    timeout = aiohttp.ClientTimeout(total=HELD_TIMEOUT_S)
    start, overflows = time.monotonic(), listen_overflows()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        results = await asyncio.gather(
            *(one_stream(session, target.url, data, headers) for data in bodies),
            return_exceptions=True,
        )
    figures.held_seconds = time.monotonic() - start
    figures.held_listen_overflows = listen_overflows() - overflows if overflows >= 0 else -1
    streams = [r for r in results if isinstance(r, Stream) and len(r.arrivals) == chunks]
    unexpected = [r for r in results if isinstance(r, BaseException)]
    for error in unexpected:
        if not isinstance(error, _STREAM_ERRORS):
            raise error
    figures.held_streams = count
    figures.held_completed = len(streams)
    ttfts = [stream.ttft * 1000 for stream in streams]
    figures.held_ttft_p50_ms = percentile(ttfts, 0.50)
    figures.held_ttft_p99_ms = percentile(ttfts, 0.99)
    # Held: while at least 90% of the peak number were open, so neither the connection
    # storm at the start (in the TTFT) nor the stragglers at the end weigh in.
    figures.held_peak_open, spans = open_spans(streams)
    gaps = [(b - a) * 1000 for stream in streams for a, b in itertools.pairwise(stream.arrivals)]
    held = [
        (b - a) * 1000
        for stream in streams
        for a, b in itertools.pairwise(stream.arrivals)
        if within(a, spans)
    ]
    figures.held_gap_p50_ms = percentile(held, 0.50)
    figures.held_gap_p99_ms = percentile(held, 0.99)
    figures.held_gap_samples = len(held)
    figures.held_gap_p99_all_ms = percentile(gaps, 0.99)
    short = sum(1 for r in results if isinstance(r, Stream) and len(r.arrivals) != chunks)
    if short:
        figures.notes.append(f"held streams: {short} ended without all {chunks} content chunks")
    if unexpected:
        kinds = sorted({type(error).__name__ + f": {error}"[:80] for error in unexpected})
        figures.notes.append(f"held streams: {len(unexpected)} failed ({'; '.join(kinds[:3])})")
