"""Where Bedrock credentials come from, how they refresh, and the signature they make."""

from __future__ import annotations

import re
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from botocore.credentials import Credentials, RefreshableCredentials
from botocore.session import Session

from providers.bedrock.credentials import (
    AwsCredentials,
    MissingCredentials,
    SigV4Signer,
)
from resillm.config import BedrockProviderConfig
from tests.fakes.bedrock_server import isolate_aws_env, recompute_signature

pytestmark = pytest.mark.anyio
KEY_ID, SECRET = "AKIDUNITTEST0000", "unit-test-secret"


@pytest.fixture(autouse=True)
def no_aws_from_this_machine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    isolate_aws_env(monkeypatch, tmp_path)


def config(**fields: Any) -> BedrockProviderConfig:
    return BedrockProviderConfig(region="eu-west-3", **fields)


async def test_static_keys_from_the_config() -> None:
    credentials = AwsCredentials(
        config(access_key_id=KEY_ID, secret_access_key=SECRET, session_token="tok"), "bed"
    )
    frozen = await credentials.get()
    assert (frozen.access_key, frozen.secret_key, frozen.token) == (KEY_ID, SECRET, "tok")


async def test_half_static_keys_are_a_clear_error() -> None:
    credentials = AwsCredentials(config(access_key_id=KEY_ID), "bed")
    with pytest.raises(MissingCredentials, match="set both access_key_id and secret_access_key"):
        await credentials.get()


async def test_keys_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "env-token")
    frozen = await AwsCredentials(config(), "bed").get()
    assert (frozen.access_key, frozen.secret_key, frozen.token) == (KEY_ID, SECRET, "env-token")


async def test_a_named_profile_from_the_credentials_file_in_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("AWS_SHARED_CREDENTIALS_FILE")
    monkeypatch.delenv("AWS_CONFIG_FILE")
    (tmp_path / ".aws").mkdir()
    (tmp_path / ".aws" / "credentials").write_text(
        "[default]\naws_access_key_id = WRONG\naws_secret_access_key = wrong\n\n"
        f"[team]\naws_access_key_id = {KEY_ID}\naws_secret_access_key = {SECRET}\n"
    )
    frozen = await AwsCredentials(config(profile="team"), "bed").get()
    assert (frozen.access_key, frozen.secret_key) == (KEY_ID, SECRET)


async def test_aws_profile_and_a_config_file_named_by_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config_file = tmp_path / "aws-config"
    config_file.write_text(
        f"[profile ops]\naws_access_key_id = {KEY_ID}\naws_secret_access_key = {SECRET}\n"
    )
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config_file))
    monkeypatch.setenv("AWS_PROFILE", "ops")
    frozen = await AwsCredentials(config(), "bed").get()
    assert frozen.access_key == KEY_ID


async def test_no_credentials_anywhere_says_what_to_configure() -> None:
    with pytest.raises(MissingCredentials) as caught:
        await AwsCredentials(config(), "bed").get()
    message = str(caught.value)
    assert "bedrock provider 'bed'" in message
    for hint in ("access_key_id", "AWS_ACCESS_KEY_ID", "profile", "aws sso login", "role"):
        assert hint in message


async def test_an_unknown_profile_is_a_clear_error() -> None:
    with pytest.raises(MissingCredentials, match="nope"):
        await AwsCredentials(config(profile="nope"), "bed").get()


class Refresher:
    """A refresh function for RefreshableCredentials that records the threads it ran on."""

    def __init__(self, lifetime: timedelta) -> None:
        self.lifetime = lifetime
        self.calls = 0
        self.threads: list[threading.Thread] = []

    def __call__(self) -> dict[str, str]:
        self.calls += 1
        self.threads.append(threading.current_thread())
        expiry = datetime.now(UTC) + self.lifetime
        return {
            "access_key": f"ASIAREFRESHED{self.calls}",
            "secret_key": "refreshed-secret",
            "token": f"token-{self.calls}",
            "expiry_time": expiry.isoformat(),
        }


def patch_chain(monkeypatch: pytest.MonkeyPatch, source: Credentials) -> list[int]:
    lookups: list[int] = []

    def get_credentials(self: Session) -> Credentials:
        lookups.append(1)
        assert threading.current_thread() is not threading.main_thread()
        return source

    monkeypatch.setattr(Session, "get_credentials", get_credentials)
    return lookups


async def test_temporary_credentials_refresh_in_a_worker_thread_before_expiry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    refresher = Refresher(timedelta(hours=1))
    source = RefreshableCredentials(
        "ASIAOLD",
        "old-secret",
        "old-token",
        datetime.now(UTC) + timedelta(seconds=30),  # about to expire
        refresher,
        "test",
    )
    lookups = patch_chain(monkeypatch, source)
    credentials = AwsCredentials(config(), "bed")
    first = await credentials.get()
    assert first.access_key == "ASIAREFRESHED1" and first.token == "token-1"
    assert refresher.threads[0] is not threading.main_thread()
    # Valid for an hour: the cached frozen set is used, nothing is looked up again.
    second = await credentials.get()
    assert second is first and refresher.calls == 1 and lookups == [1]


async def test_credentials_are_refreshed_again_when_they_near_expiry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    refresher = Refresher(timedelta(seconds=20))  # every refresh is already near expiry
    source = RefreshableCredentials(
        "ASIAOLD", "old", "tok", datetime.now(UTC) + timedelta(hours=1), refresher, "test"
    )
    patch_chain(monkeypatch, source)
    credentials = AwsCredentials(config(), "bed")
    assert (await credentials.get()).access_key == "ASIAOLD"
    assert refresher.calls == 0
    source._expiry_time = datetime.now(UTC) + timedelta(seconds=30)
    assert (await credentials.get()).access_key == "ASIAREFRESHED1"
    assert (await credentials.get()).access_key == "ASIAREFRESHED2"


async def test_a_failed_refresh_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> dict[str, str]:
        raise RuntimeError("STS is unreachable")

    source = RefreshableCredentials(
        "ASIAOLD", "old", "tok", datetime.now(UTC) - timedelta(seconds=1), broken, "test"
    )
    patch_chain(monkeypatch, source)
    with pytest.raises(MissingCredentials, match=r"could not refresh.*STS is unreachable"):
        await AwsCredentials(config(), "bed").get()


async def test_sigv4_signature_covers_the_exact_url_and_body() -> None:
    credentials = AwsCredentials(
        config(access_key_id=KEY_ID, secret_access_key=SECRET, session_token="tok"), "bed"
    )
    url = "https://bedrock-runtime.eu-west-3.amazonaws.com/model/us.a.b-v1%3A0/converse"
    body = b'{"messages": []}'
    headers = await SigV4Signer(credentials, "eu-west-3").sign(
        url, body, {"Content-Type": "application/json"}
    )
    auth = headers["Authorization"]
    match = re.fullmatch(
        r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/eu-west-3/bedrock/aws4_request, "
        r"SignedHeaders=([a-z;-]+), Signature=([0-9a-f]{64})",
        auth,
    )
    assert match is not None, auth
    assert match[1] == KEY_ID
    assert match[3] == "content-type;host;x-amz-date;x-amz-security-token"
    assert headers["X-Amz-Security-Token"] == "tok"
    signed = {
        "content-type": "application/json",
        "host": "bedrock-runtime.eu-west-3.amazonaws.com",
        "x-amz-date": headers["X-Amz-Date"],
        "x-amz-security-token": "tok",
    }

    def recompute(url: str, body: bytes) -> str:
        return recompute_signature(
            method="POST",
            url=url,
            headers=signed,
            body=body,
            credentials=Credentials(KEY_ID, SECRET, "tok"),
            region="eu-west-3",
            service="bedrock",
            amz_date=headers["X-Amz-Date"],
        )

    assert recompute(url, body) == match[4]
    assert recompute(url, body + b" ") != match[4]
    assert recompute(url.replace("%3A", ":"), body) != match[4]
