"""AWS credentials for Bedrock, and signing the exact request resillm sends.

Static keys from the config are used as they are. Otherwise botocore's own chain finds them
(environment, shared credentials and config files with ``profile``, SSO, container and
instance roles) — which can read files and call metadata or STS endpoints, so it runs in a
worker thread, never on the event loop. Temporary credentials are refreshed the same way
before they expire; between refreshes every request signs with one cached frozen set.

A Bedrock API key (``api_key``, or ``AWS_BEARER_TOKEN_BEDROCK`` as the AWS SDKs read it)
replaces SigV4 with ``Authorization: Bearer``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials, ReadOnlyCredentials, RefreshableCredentials
from botocore.exceptions import BotoCoreError, ClientError
from botocore.session import Session

from resillm.config import BedrockProviderConfig
from resillm.errors import UpstreamStatusError

SIGNING_NAME = "bedrock"  # bedrock-runtime signs as "bedrock" (botocore's signingName)
# Refresh at once when this close to expiry; earlier (botocore's advisory window) at most
# every REFRESH_RETRY_S, so a failing refresh does not cost a thread per request.
EXPIRING_S = 60
REFRESH_RETRY_S = 10.0

WHAT_TO_CONFIGURE = (
    "set access_key_id and secret_access_key (or api_key) on the provider, or make them "
    "available to botocore's credential chain: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
    "in the environment, a profile ('profile:' or AWS_PROFILE) in ~/.aws/credentials or "
    "~/.aws/config, SSO ('aws sso login'), or a container or instance role"
)


class MissingCredentials(Exception):
    """No usable AWS credentials; the message says what to configure."""


class CredentialsUnavailable(UpstreamStatusError):
    """Raised for an attempt that could not be signed. Like a 401 from the upstream, it
    sends the request to the next target; it never reached AWS."""

    def __init__(self, message: str, *, provider: str, model: str) -> None:
        super().__init__(
            401,
            message,
            error_type="authentication_error",
            code="aws_credentials_unavailable",
            provider=provider,
            model=model,
        )


class AwsCredentials:
    """One provider's credentials: resolved on first use, refreshed before they expire."""

    def __init__(self, config: BedrockProviderConfig, provider: str) -> None:
        self._provider = provider
        self._profile = config.profile
        self._config_error: str | None = None
        self._source: Credentials | None = None
        self._frozen: ReadOnlyCredentials | None = None
        self._next_refresh = 0.0
        self._lock = asyncio.Lock()
        key, secret = config.access_key_id, config.secret_access_key
        if key and secret:
            self._source = Credentials(key, secret, config.session_token)
            self._frozen = self._source.get_frozen_credentials()
        elif key or secret:
            self._config_error = (
                f"bedrock provider '{provider}': set both access_key_id and secret_access_key"
            )

    async def get(self) -> ReadOnlyCredentials:
        """The credentials to sign with now; raises ``MissingCredentials``."""
        frozen = self._frozen
        if frozen is not None and not self._refresh_due():
            return frozen
        async with self._lock:
            frozen = self._frozen
            if frozen is not None and not self._refresh_due():
                return frozen
            self._next_refresh = time.monotonic() + REFRESH_RETRY_S
            frozen = await asyncio.to_thread(self._resolve)
            self._frozen = frozen
            return frozen

    def _refresh_due(self) -> bool:
        source = self._source
        if not isinstance(source, RefreshableCredentials):
            return False
        if source.refresh_needed(EXPIRING_S):
            return True
        return source.refresh_needed() and time.monotonic() >= self._next_refresh

    def _resolve(self) -> ReadOnlyCredentials:
        """In a worker thread: find the credentials (first call), refresh them if needed."""
        if self._config_error:
            raise MissingCredentials(self._config_error)
        where = f"bedrock provider '{self._provider}'"
        if self._source is None:
            try:
                source = Session(profile=self._profile).get_credentials()
            except BotoCoreError as exc:
                raise MissingCredentials(f"{where}: {exc}; {WHAT_TO_CONFIGURE}") from exc
            if source is None:
                raise MissingCredentials(f"{where}: no AWS credentials found; {WHAT_TO_CONFIGURE}")
            self._source = source
        try:
            frozen = self._source.get_frozen_credentials()
        except (BotoCoreError, ClientError, RuntimeError) as exc:
            raise MissingCredentials(
                f"{where}: could not refresh the AWS credentials: {exc}; {WHAT_TO_CONFIGURE}"
            ) from exc
        if not frozen.access_key or not frozen.secret_key:
            raise MissingCredentials(f"{where}: the AWS credentials are incomplete")
        return frozen


class Signer(Protocol):
    async def sign(self, url: str, body: bytes, headers: dict[str, str]) -> dict[str, str]:
        """The headers to send with ``body`` to ``url`` (a POST), authentication included."""
        ...


class SigV4Signer:
    """SigV4 over exactly the URL and body bytes sent (the URL already percent-encoded)."""

    def __init__(self, credentials: AwsCredentials, region: str) -> None:
        self.credentials = credentials
        self.region = region

    async def sign(self, url: str, body: bytes, headers: dict[str, str]) -> dict[str, str]:
        frozen = await self.credentials.get()
        request = AWSRequest(method="POST", url=url, data=body, headers=headers)
        SigV4Auth(frozen, SIGNING_NAME, self.region).add_auth(request)
        return dict(request.headers.items())


class BearerSigner:
    """A Bedrock API key: no signature, the key as a bearer token."""

    def __init__(self, token: str) -> None:
        self.token = token

    async def sign(self, url: str, body: bytes, headers: dict[str, str]) -> dict[str, str]:
        return {**headers, "Authorization": f"Bearer {self.token}"}
