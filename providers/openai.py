"""OpenAI, Azure OpenAI and any OpenAI-compatible server: a pass-through adapter.

The client's body is forwarded with only ``model`` replaced (and ``stream_options`` asking
for usage on streams), unknown fields included; answers are forwarded byte for byte. Only
a light view of each answer is decoded, for the model, finish reason and usage.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any
from urllib.parse import quote

import aiohttp
import msgspec

from providers.base import Chunk, ChunkStream, Completion, UpstreamCall
from providers.http import status_error, upstream_errors
from providers.sse import SSEDecoder
from resillm.config import AzureProviderConfig, OpenAICompatibleProviderConfig, OpenAIProviderConfig
from resillm.errors import UpstreamError, UpstreamProtocolError, UpstreamStatusError
from resillm.schema import CompletionView, json_encoder, view_decoder
from resillm.tracecontext import with_trace_headers

OpenAIFamilyConfig = OpenAIProviderConfig | AzureProviderConfig | OpenAICompatibleProviderConfig
logger = logging.getLogger("resillm.providers")
_DONE = b"[DONE]"


class OpenAIProvider:
    """One configured provider of the OpenAI family; binds targets to upstreams."""

    def __init__(
        self, name: str, config: OpenAIFamilyConfig, session: aiohttp.ClientSession
    ) -> None:
        self.name = name
        self.config = config
        self.session = session
        self.prefill = bool(config.prefill)
        self.limit = asyncio.Semaphore(config.max_connections)

    def bind(self, model: str, *, api_key: str | None, base_url: str | None) -> OpenAIUpstream:
        config = self.config
        key = api_key if api_key is not None else config.api_key
        base = (base_url or config.base_url).rstrip("/")
        headers = {"Content-Type": "application/json", **config.headers}
        if isinstance(config, AzureProviderConfig):
            if not base.endswith("/openai"):
                base += "/openai"
            url = (
                f"{base}/deployments/{quote(model, safe='')}/chat/completions"
                f"?api-version={quote(config.api_version, safe='')}"
            )
            if key:
                headers["api-key"] = key
        else:
            url = f"{base}/chat/completions"
            if key:
                headers["Authorization"] = f"Bearer {key}"
            if isinstance(config, OpenAIProviderConfig) and config.organization:
                headers["OpenAI-Organization"] = config.organization
        return OpenAIUpstream(self, model, url, headers, key)

    async def aclose(self) -> None:
        return None


class OpenAIUpstream:
    """The provider bound to one model (and key): builds the body and reads the answer."""

    def __init__(
        self,
        provider: OpenAIProvider,
        model: str,
        url: str,
        headers: dict[str, str],
        secret: str | None,
    ) -> None:
        self.provider = provider.name
        self.model = model
        self._owner = provider
        self._url = url
        self._headers = headers
        self._secret = secret
        self._connect = aiohttp.ClientTimeout(
            total=None, sock_connect=provider.config.connect_timeout
        )
        self._timeout_s = provider.config.timeout

    def _body(self, call: UpstreamCall) -> bytes:
        body = dict(call.raw)
        body["model"] = self.model
        if call.stream:
            body["stream"] = True
            # Always ask for usage: spend must be counted even when the client did not ask.
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        return json_encoder.encode(body)

    async def complete(self, call: UpstreamCall) -> Completion:
        with upstream_errors(self.provider, self.model):
            async with (
                self._owner.limit,
                asyncio.timeout(self._timeout_s),
                self._owner.session.post(
                    self._url,
                    data=self._body(call),
                    headers=with_trace_headers(self._headers),
                    timeout=self._connect,
                ) as response,
            ):
                if response.status != 200:
                    raise await status_error(response, self.provider, self.model, self._secret)
                body = await response.read()
        try:
            view = view_decoder.decode(body)
        except msgspec.DecodeError as exc:
            raise UpstreamProtocolError(
                f"{self.provider}/{self.model}: answer is not chat completion JSON",
                provider=self.provider,
                model=self.model,
            ) from exc
        finish = view.choices[0].finish_reason if view.choices else None
        return Completion(body, view.model or self.model, view.usage, finish)

    async def open_stream(self, call: UpstreamCall) -> ChunkStream:
        limit = self._owner.limit
        await limit.acquire()
        try:
            with upstream_errors(self.provider, self.model):
                response = await self._owner.session.post(
                    self._url,
                    data=self._body(call),
                    headers=with_trace_headers(self._headers),
                    timeout=self._connect,
                )
                if response.status != 200:
                    try:
                        raise await status_error(response, self.provider, self.model, self._secret)
                    finally:
                        response.release()
        except BaseException:
            limit.release()
            raise
        return OpenAIChunkStream(self, response, call, limit.release)


class OpenAIChunkStream:
    """Reads an OpenAI SSE answer into chunks; raises when it ends without a finish reason."""

    def __init__(
        self,
        upstream: OpenAIUpstream,
        response: aiohttp.ClientResponse,
        call: UpstreamCall,
        release: Any,
    ) -> None:
        self._upstream = upstream
        self._response = response
        self._idle_s = call.stream_idle_s
        self._client_wants_usage = call.include_usage
        self._release = release
        self._decoder = SSEDecoder()
        self._pending: deque[Chunk] = deque()
        self._finished = False
        self._ended = False
        self._started = False
        self._closed = False
        self._failure: UpstreamError | None = None
        self.malformed = 0

    def __aiter__(self) -> OpenAIChunkStream:
        return self

    async def __anext__(self) -> Chunk:
        while not self._pending:
            if self._ended:
                if self._failure is not None:
                    raise self._failure
                raise StopAsyncIteration
            await self._read()
        return self._pending.popleft()

    async def _read(self) -> None:
        upstream = self._upstream
        with upstream_errors(upstream.provider, upstream.model):
            async with asyncio.timeout(self._idle_s if self._started else None):
                data = await self._response.content.readany()
        events = self._decoder.feed(data) if data else self._decoder.flush()
        for event in events:
            self._on_data(event.data)
            if self._ended:
                return
        if not data:
            self._end()

    def _on_data(self, data: bytes) -> None:
        if not data:
            return
        if data == _DONE:
            self._end()
            return
        try:
            view: CompletionView = view_decoder.decode(data)
        except msgspec.DecodeError:
            # A malformed event mid-stream is skipped; the stream goes on (SPEC section 4).
            self.malformed += 1
            upstream = self._upstream
            logger.warning(
                "skipped a malformed stream event from %s/%s: %r",
                upstream.provider,
                upstream.model,
                data[:200],
            )
            return
        if view.error is not None:
            self._fail(_stream_error(self._upstream, view.error))
            return
        finish, text, tool_call = None, "", False
        for choice in view.choices:
            finish = finish or choice.finish_reason
            delta = choice.delta
            if delta is not None and choice.index == 0:
                text = delta.content or ""
                tool_call = delta.tool_calls is not None
        if finish:
            self._finished = True
        forward = bool(view.choices) or view.usage is None or self._client_wants_usage
        chunk = Chunk(
            data,
            model=view.model,
            finish_reason=finish,
            usage=view.usage,
            forward=forward,
            text=text,
            tool_call=tool_call,
        )
        self._started = self._started or chunk.substantial
        self._pending.append(chunk)

    def _end(self) -> None:
        if not self._finished:
            upstream = self._upstream
            self._fail(
                UpstreamProtocolError(
                    f"{upstream.provider}/{upstream.model}: stream ended without a finish reason",
                    provider=upstream.provider,
                    model=upstream.model,
                )
            )
            return
        self._ended = True
        self._close_response(reuse=True)

    def _fail(self, error: UpstreamError) -> None:
        """Deliver what came before the failure, then raise it."""
        self._ended = True
        self._failure = error
        self._close_response(reuse=False)

    def _close_response(self, *, reuse: bool) -> None:
        if self._closed:
            return
        self._closed = True
        if reuse:
            self._response.release()
        else:
            self._response.close()
        self._release()

    async def aclose(self) -> None:
        # Before the end, the connection is mid-answer and cannot be reused: close it.
        self._close_response(reuse=self._ended and self._failure is None)


def _stream_error(upstream: OpenAIUpstream, error: Any) -> UpstreamStatusError:
    detail = error if isinstance(error, dict) else {}
    message = str(detail.get("message") or error or "upstream stream error")
    error_type = detail.get("type")
    return UpstreamStatusError(
        502,
        message,
        error_type=str(error_type) if error_type else None,
        provider=upstream.provider,
        model=upstream.model,
    )
