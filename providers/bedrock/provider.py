"""The Bedrock provider: Converse and ConverseStream over the shared aiohttp session.

boto3's client would block the event loop; resillm sends the requests itself and uses
botocore only for what must match AWS exactly: credentials, SigV4 and event-stream frames.
"""

from __future__ import annotations

import asyncio
import os
from urllib.parse import quote

import aiohttp
import msgspec
from yarl import URL

from providers.base import ChunkStream, Completion, UpstreamCall
from providers.bedrock.credentials import (
    AwsCredentials,
    BearerSigner,
    CredentialsUnavailable,
    MissingCredentials,
    Signer,
    SigV4Signer,
)
from providers.bedrock.request import BedrockRequest, to_converse
from providers.bedrock.response import (
    bedrock_error,
    completion_from_converse,
    error_message,
    error_type_of,
)
from providers.bedrock.stream import BedrockChunkStream, StreamTranslator
from providers.http import MAX_ERROR_BODY_BYTES, parse_retry_after, upstream_errors
from resillm.config import BedrockProviderConfig
from resillm.errors import UpstreamStatusError
from resillm.tracecontext import with_trace_headers

JSON = "application/json"
EVENT_STREAM = "application/vnd.amazon.eventstream"
BEARER_TOKEN_ENV = "AWS_BEARER_TOKEN_BEDROCK"  # the AWS SDKs' variable for a Bedrock API key
REQUEST_ID_HEADER = "x-amzn-RequestId"


def endpoint(region: str) -> str:
    return f"https://bedrock-runtime.{region}.amazonaws.com"


class BedrockProvider:
    """One configured Bedrock account and region; binds model ids to upstreams."""

    def __init__(
        self, name: str, config: BedrockProviderConfig, session: aiohttp.ClientSession
    ) -> None:
        self.name = name
        self.config = config
        self.session = session
        self.prefill = config.prefill if config.prefill is not None else True
        self.limit = asyncio.Semaphore(config.max_connections)
        self.credentials = AwsCredentials(config, name)

    def bind(self, model: str, *, api_key: str | None, base_url: str | None) -> BedrockUpstream:
        config = self.config
        base = (base_url or config.base_url or endpoint(config.region)).rstrip("/")
        token = api_key or config.api_key
        if token is None and not (config.access_key_id or config.secret_access_key):
            token = os.environ.get(BEARER_TOKEN_ENV) or None
        signer: Signer = (
            BearerSigner(token) if token else SigV4Signer(self.credentials, config.region)
        )
        return BedrockUpstream(self, model, base, signer, token)

    async def aclose(self) -> None:
        return None


class BedrockUpstream:
    """The provider bound to one model id (an id, an inference profile or an ARN)."""

    def __init__(
        self,
        provider: BedrockProvider,
        model: str,
        base: str,
        signer: Signer,
        secret: str | None,
    ) -> None:
        self.provider = provider.name
        self.model = model
        self._owner = provider
        # ARNs hold ':' and '/': one path segment, percent-encoded as botocore does.
        path = f"{base}/model/{quote(model, safe='')}"
        self._converse_url = path + "/converse"
        self._stream_url = path + "/converse-stream"
        self._signer = signer
        self._secret = secret
        self._connect = aiohttp.ClientTimeout(
            total=None, sock_connect=provider.config.connect_timeout
        )
        self._timeout_s = provider.config.timeout

    async def complete(self, call: UpstreamCall) -> Completion:
        translated = to_converse(call.request)
        body = msgspec.json.encode(translated.body)
        owner = self._owner
        with upstream_errors(self.provider, self.model):
            async with owner.limit, asyncio.timeout(self._timeout_s):
                headers = await self._sign(self._converse_url, body, JSON)
                async with owner.session.post(
                    URL(self._converse_url, encoded=True),
                    data=body,
                    headers=with_trace_headers(headers),
                    timeout=self._connect,
                ) as response:
                    if response.status != 200:
                        raise await self._status_error(response)
                    raw = await response.read()
                    request_id = response.headers.get(REQUEST_ID_HEADER)
        return completion_from_converse(
            raw,
            provider=self.provider,
            model=self.model,
            request_id=request_id,
            strip_leading_whitespace=translated.strip_leading_whitespace,
        )

    async def open_stream(self, call: UpstreamCall) -> ChunkStream:
        translated = to_converse(call.request)
        body = msgspec.json.encode(translated.body)
        limit = self._owner.limit
        await limit.acquire()
        try:
            with upstream_errors(self.provider, self.model):
                headers = await self._sign(self._stream_url, body, EVENT_STREAM)
                response = await self._owner.session.post(
                    URL(self._stream_url, encoded=True),
                    data=body,
                    headers=with_trace_headers(headers),
                    timeout=self._connect,
                )
                if response.status != 200:
                    try:
                        raise await self._status_error(response)
                    finally:
                        response.release()
        except BaseException:
            limit.release()
            raise
        return BedrockChunkStream(
            provider=self.provider,
            model=self.model,
            response=response,
            call=call,
            translator=self._translator(call, translated, response),
            release=limit.release,
            secret=self._secret,
        )

    def _translator(
        self, call: UpstreamCall, translated: BedrockRequest, response: aiohttp.ClientResponse
    ) -> StreamTranslator:
        return StreamTranslator(
            self.model,
            request_id=response.headers.get(REQUEST_ID_HEADER),
            include_usage=call.include_usage,
            strip_leading_whitespace=translated.strip_leading_whitespace,
        )

    async def _sign(self, url: str, body: bytes, accept: str) -> dict[str, str]:
        headers = {"Content-Type": JSON, "Accept": accept, **self._owner.config.headers}
        try:
            return await self._signer.sign(url, body, headers)
        except MissingCredentials as exc:
            raise CredentialsUnavailable(
                str(exc), provider=self.provider, model=self.model
            ) from exc

    async def _status_error(self, response: aiohttp.ClientResponse) -> UpstreamStatusError:
        raw = await response.content.read(MAX_ERROR_BODY_BYTES)
        text, body_type = error_message(raw)
        return bedrock_error(
            response.status,
            error_type_of(response.headers, body_type),
            text or response.reason or "",
            provider=self.provider,
            model=self.model,
            secret=self._secret,
            retry_after_s=parse_retry_after(response.headers),
        )
