"""The Anthropic Messages API adapter: HTTP, headers, connection limits, stream reading.

Translation lives in :mod:`request`, :mod:`response` and :mod:`stream`; this module only
moves bytes: one ``POST {base_url}/v1/messages`` per attempt on the shared session, under
the provider's connection cap, with failures mapped by ``upstream_errors``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp

from providers.anthropic.request import AnthropicRequest, to_anthropic
from providers.anthropic.response import from_anthropic, with_context_code
from providers.anthropic.stream import StreamTranslator
from providers.anthropic.wire import request_encoder
from providers.base import ChunkStream, Completion, UpstreamCall
from providers.http import status_error, upstream_errors
from providers.sse import SSEDecoder
from providers.stream import UpstreamChunkStream
from resillm.config import AnthropicProviderConfig
from resillm.errors import UpstreamStatusError
from resillm.tracecontext import with_trace_headers

MESSAGES_PATH = "/v1/messages"


class AnthropicProvider:
    """One configured Anthropic provider; binds targets to upstreams."""

    def __init__(
        self, name: str, config: AnthropicProviderConfig, session: aiohttp.ClientSession
    ) -> None:
        self.name = name
        self.config = config
        self.session = session
        # Anthropic continues a trailing assistant message: stream recovery can use it.
        self.prefill = config.prefill if config.prefill is not None else True
        self.limit = asyncio.Semaphore(config.max_connections)

    def bind(self, model: str, *, api_key: str | None, base_url: str | None) -> AnthropicUpstream:
        config = self.config
        key = api_key if api_key is not None else config.api_key
        url = (base_url or config.base_url).rstrip("/") + MESSAGES_PATH
        headers = {
            "Content-Type": "application/json",
            "anthropic-version": config.anthropic_version,
        }
        if config.anthropic_beta:
            headers["anthropic-beta"] = ",".join(config.anthropic_beta)
        headers.update(config.headers)
        if key:
            headers["x-api-key"] = key
        return AnthropicUpstream(self, model, url, headers, key)

    async def aclose(self) -> None:
        return None


class AnthropicUpstream:
    """The provider bound to one model (and key)."""

    def __init__(
        self,
        provider: AnthropicProvider,
        model: str,
        url: str,
        headers: dict[str, str],
        secret: str | None,
    ) -> None:
        self.provider = provider.name
        self.model = model
        self._owner = provider
        self.url = url
        self.headers = headers
        self._secret = secret
        self._connect = aiohttp.ClientTimeout(
            total=None, sock_connect=provider.config.connect_timeout
        )
        self._timeout_s = provider.config.timeout

    def translate(self, call: UpstreamCall) -> AnthropicRequest:
        """Raises ``InvalidRequest`` (a 400, no failover) for what Anthropic cannot express."""
        return to_anthropic(
            call.request, call.raw, model=self.model, config=self._owner.config, stream=call.stream
        )

    async def _error(self, response: aiohttp.ClientResponse) -> UpstreamStatusError:
        error = await status_error(response, self.provider, self.model, self._secret)
        return with_context_code(error)

    async def complete(self, call: UpstreamCall) -> Completion:
        translated = self.translate(call)
        data = request_encoder.encode(translated.body)
        with upstream_errors(self.provider, self.model):
            async with (
                self._owner.limit,
                asyncio.timeout(self._timeout_s),
                self._owner.session.post(
                    self.url,
                    data=data,
                    headers=with_trace_headers(self.headers),
                    timeout=self._connect,
                ) as response,
            ):
                if response.status != 200:
                    raise await self._error(response)
                body = await response.read()
        return from_anthropic(
            body,
            provider=self.provider,
            model=self.model,
            prefill_suffix=translated.prefill_suffix,
        )

    async def open_stream(self, call: UpstreamCall) -> ChunkStream:
        translated = self.translate(call)
        data = request_encoder.encode(translated.body)
        limit = self._owner.limit
        await limit.acquire()
        try:
            with upstream_errors(self.provider, self.model):
                async with asyncio.timeout(self._timeout_s):
                    response = await self._owner.session.post(
                        self.url,
                        data=data,
                        headers=with_trace_headers(self.headers),
                        timeout=self._connect,
                    )
                if response.status != 200:
                    try:
                        raise await self._error(response)
                    finally:
                        response.release()
        except BaseException:
            limit.release()
            raise
        translator = StreamTranslator(
            provider=self.provider,
            model=self.model,
            include_usage=call.include_usage,
            prefill_suffix=translated.prefill_suffix,
        )
        return AnthropicChunkStream(self, response, translator, call.stream_idle_s, limit.release)


class AnthropicChunkStream(UpstreamChunkStream):
    """An Anthropic SSE answer read through a ``StreamTranslator``."""

    def __init__(
        self,
        upstream: AnthropicUpstream,
        response: aiohttp.ClientResponse,
        translator: StreamTranslator,
        idle_s: float | None,
        release: Callable[[], None],
    ) -> None:
        super().__init__(
            response,
            provider=upstream.provider,
            model=upstream.model,
            idle_s=idle_s,
            release=release,
        )
        self.translator = translator
        self._decoder = SSEDecoder()

    def consume(self, data: bytes) -> None:
        translator = self.translator
        for event in self._decoder.feed(data) if data else self._decoder.flush():
            for chunk in translator.feed(event):
                self.push(chunk)
            if translator.stopped:
                break
        self.malformed = translator.malformed
        if translator.stopped or not data:
            translator.check_complete()  # raises when the answer is not whole
            self.finished = True
            self.end()
