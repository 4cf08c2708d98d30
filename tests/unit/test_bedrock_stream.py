"""BedrockChunkStream over a scripted response body: how a ConverseStream ends or fails."""

from __future__ import annotations

import asyncio
import json

import msgspec
import pytest

from providers.base import Chunk, UpstreamCall
from providers.bedrock.stream import BedrockChunkStream, StreamTranslator
from resillm.errors import UpstreamProtocolError, UpstreamStatusError
from resillm.schema import ChatCompletionRequest
from tests.fakes.bedrock_server import Scenario, event_frame, exception_frame, stream_frames

pytestmark = pytest.mark.anyio
MODEL = "meta.llama3-70b-instruct-v1:0"


class ScriptedContent:
    """``response.content``: hands out the scripted pieces, then b"" (end of body), or
    stalls until ``set_exception`` (as aiohttp's reader does) when ``stall`` is set."""

    def __init__(self, pieces: list[bytes], stall: bool = False) -> None:
        self.pieces = list(pieces)
        self.stall = stall
        self.error: asyncio.Future[None] | None = None

    async def readany(self) -> bytes:
        if self.pieces:
            return self.pieces.pop(0)
        if self.stall:
            self.error = self.error or asyncio.get_running_loop().create_future()
            await self.error
        return b""

    def set_exception(self, exc: BaseException) -> None:
        self.error = self.error or asyncio.get_running_loop().create_future()
        if not self.error.done():
            self.error.set_exception(exc)


class ScriptedResponse:
    def __init__(self, pieces: list[bytes], stall: bool = False) -> None:
        self.content = ScriptedContent(pieces, stall)
        self.released = self.closed = False

    def release(self) -> None:
        self.released = True

    def close(self) -> None:
        self.closed = True


def open_stream(
    pieces: list[bytes], *, stall: bool = False, idle_s: float | None = 5.0
) -> tuple[BedrockChunkStream, ScriptedResponse, list[int]]:
    raw = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    request = msgspec.json.decode(json.dumps(raw), type=ChatCompletionRequest)
    call = UpstreamCall(request, raw, request_id="r", stream=True, stream_idle_s=idle_s)
    response = ScriptedResponse(pieces, stall)
    releases: list[int] = []
    stream = BedrockChunkStream(
        provider="bedrock",
        model=MODEL,
        response=response,  # type: ignore[arg-type]
        call=call,
        translator=StreamTranslator(MODEL),
        release=lambda: releases.append(1),
        secret="sekrit-key",
    )
    return stream, response, releases


async def collect(stream: BedrockChunkStream) -> tuple[list[Chunk], BaseException | None]:
    chunks: list[Chunk] = []
    try:
        async for chunk in stream:
            chunks.append(chunk)
    except Exception as exc:
        return chunks, exc
    return chunks, None


def text_of(chunks: list[Chunk]) -> str:
    return "".join(c.text for c in chunks)


async def test_stream_ends_after_the_usage_and_releases_the_connection() -> None:
    data = b"".join(stream_frames(Scenario(text="one two three")))
    # Arbitrary cuts: frames split across reads, several frames in one read.
    pieces = [data[i : i + 37] for i in range(0, len(data), 37)]
    stream, response, releases = open_stream(pieces)
    chunks, error = await collect(stream)
    assert error is None
    assert text_of(chunks) == "one two three"
    assert [c.finish_reason for c in chunks if c.finish_reason] == ["stop"]
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 11
    assert response.released and not response.closed and releases == [1]
    await stream.aclose()
    assert releases == [1]  # released once


async def test_exception_frame_mid_stream_fails_after_the_content_before_it() -> None:
    frames = stream_frames(Scenario(text="alpha beta gamma"))
    pieces = [*frames[:3], exception_frame("throttlingException", "Too many tokens, slow down")]
    stream, response, releases = open_stream(pieces)
    chunks, error = await collect(stream)
    assert text_of(chunks) == "alpha beta"
    assert isinstance(error, UpstreamStatusError)
    assert error.status == 429 and error.retryable
    assert "throttlingException" not in error.message  # named as the HTTP exception is
    assert "ThrottlingException: Too many tokens, slow down" in error.message
    assert response.closed and releases == [1]


@pytest.mark.parametrize(
    ("exception", "status"),
    [
        ("throttlingException", 429),
        ("serviceUnavailableException", 503),
        ("modelStreamErrorException", 502),
        ("internalServerException", 500),
        ("validationException", 400),
    ],
)
async def test_stream_exceptions_map_to_statuses(exception: str, status: int) -> None:
    frames = stream_frames(Scenario(text="a b"))
    stream, _, _ = open_stream([*frames[:2], exception_frame(exception, "boom")])
    chunks, error = await collect(stream)
    assert text_of(chunks) == "a"
    assert isinstance(error, UpstreamStatusError) and error.status == status


async def test_an_exception_before_the_first_token_yields_no_chunk() -> None:
    """So the router can still retry: the client's response has not started."""
    frames = stream_frames(Scenario())
    stream, _, _ = open_stream([frames[0], exception_frame("throttlingException", "slow")])
    chunks, error = await collect(stream)
    assert chunks == []
    assert isinstance(error, UpstreamStatusError) and error.status == 429


async def test_end_of_body_after_the_stop_completes_without_usage() -> None:
    frames = stream_frames(Scenario(send_metadata=False))
    stream, response, _ = open_stream(frames)
    chunks, error = await collect(stream)
    assert error is None and chunks[-1].finish_reason == "stop"
    assert response.closed  # never saw the end of the answer's frames: not reused


async def test_end_of_body_before_the_stop_is_a_protocol_error() -> None:
    frames = stream_frames(Scenario(text="cut short here"))
    stream, _, _ = open_stream(frames[:3])
    chunks, error = await collect(stream)
    assert text_of(chunks) == "cut short"
    assert isinstance(error, UpstreamProtocolError)
    assert "without a stop reason" in error.message


async def test_a_corrupted_frame_is_a_protocol_error() -> None:
    frames = stream_frames(Scenario(text="a b"))
    broken = bytearray(frames[2])
    broken[-6] ^= 0xFF
    stream, response, _ = open_stream([*frames[:2], bytes(broken), *frames[3:]])
    chunks, error = await collect(stream)
    assert text_of(chunks) == "a"
    assert isinstance(error, UpstreamProtocolError) and "event-stream" in error.message
    assert response.closed


async def test_a_malformed_event_payload_is_skipped() -> None:
    frames = stream_frames(Scenario(text="a b"))
    bad = event_frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": 5}})
    stream, _, _ = open_stream([frames[0], bad, *frames[1:]])
    chunks, error = await collect(stream)
    assert error is None and text_of(chunks) == "a b"
    assert stream.malformed == 1


async def test_silence_after_the_stop_ends_the_stream_cleanly() -> None:
    frames = stream_frames(Scenario(send_metadata=False))
    stream, _, _ = open_stream(frames, stall=True, idle_s=0.05)
    chunks, error = await collect(stream)
    assert error is None and chunks[-1].finish_reason == "stop"


async def test_silence_mid_answer_is_a_timeout() -> None:
    frames = stream_frames(Scenario(text="a b c"))
    stream, _, _ = open_stream(frames[:3], stall=True, idle_s=0.05)
    chunks, error = await collect(stream)
    assert text_of(chunks) == "a b"
    assert error is not None and error.status == 504


async def test_aclose_mid_stream_closes_the_connection() -> None:
    stream, response, releases = open_stream(stream_frames(Scenario(text="a b c")))
    first = await anext(aiter(stream))
    assert first.text == "a"
    await stream.aclose()
    assert response.closed and not response.released and releases == [1]
