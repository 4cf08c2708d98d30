"""OpenAI, Azure OpenAI and any OpenAI-compatible server: a pass-through adapter.

The client's body is forwarded with only ``model`` replaced (and ``stream_options`` asking
for usage on streams), unknown fields included; answers are forwarded byte for byte. Only
a light view of each answer is decoded, for the model, finish reason and usage.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import aiohttp
import msgspec

from providers.base import Chunk, ChunkStream, Completion, UpstreamCall
from providers.http import status_error, upstream_errors
from providers.sse import SSEDecoder
from providers.stream import UpstreamChunkStream
from resillm.config import AzureProviderConfig, OpenAICompatibleProviderConfig, OpenAIProviderConfig
from resillm.errors import UpstreamProtocolError, UpstreamStatusError
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


class OpenAIChunkStream(UpstreamChunkStream):
    """An OpenAI SSE answer: payloads forwarded as they are, read through a light view."""

    def __init__(
        self,
        upstream: OpenAIUpstream,
        response: aiohttp.ClientResponse,
        call: UpstreamCall,
        release: Callable[[], object],
    ) -> None:
        super().__init__(
            response,
            provider=upstream.provider,
            model=upstream.model,
            idle_s=call.stream_idle_s,
            release=release,
        )
        self._client_wants_usage = call.include_usage
        self._decoder = SSEDecoder()

    def consume(self, data: bytes) -> None:
        for event in self._decoder.feed(data) if data else self._decoder.flush():
            self._on_data(event.data)
            if self.ended:
                return

    def _on_data(self, data: bytes) -> None:
        if not data:
            return
        if data == _DONE:
            self.end()
            return
        try:
            view: CompletionView = view_decoder.decode(data)
        except msgspec.DecodeError:
            # A malformed event mid-stream is skipped; the stream goes on (SPEC section 4).
            self.malformed += 1
            logger.warning(
                "skipped a malformed stream event from %s/%s: %r",
                self.provider,
                self.model,
                data[:200],
            )
            return
        if view.error is not None:
            self.fail(_stream_error(self.provider, self.model, view.error))
            return
        finish, text, tool_call = None, "", False
        for choice in view.choices:
            finish = finish or choice.finish_reason
            delta = choice.delta
            if delta is not None and choice.index == 0:
                text = delta.content or ""
                tool_call = delta.tool_calls is not None
        forward = bool(view.choices) or view.usage is None or self._client_wants_usage
        self.push(
            Chunk(
                data,
                model=view.model,
                finish_reason=finish,
                usage=view.usage,
                forward=forward,
                text=text,
                tool_call=tool_call,
            )
        )


def _stream_error(provider: str, model: str, error: Any) -> UpstreamStatusError:
    detail = error if isinstance(error, dict) else {}
    message = str(detail.get("message") or error or "upstream stream error")
    error_type = detail.get("type")
    return UpstreamStatusError(
        502,
        message,
        error_type=str(error_type) if error_type else None,
        provider=provider,
        model=model,
    )
