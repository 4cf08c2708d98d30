"""Every bad input of SPEC section 3 gets its status and an OpenAI-shaped error, never a 500."""

from __future__ import annotations

from typing import Any

import aiohttp
import openai
import pytest
from multidict import CIMultiDict

from resillm.mock_upstream import MockUpstream
from tests.conftest import openai_compatible, run_gateway

pytestmark = pytest.mark.anyio
HELLO = [{"role": "user", "content": "hi"}]
ERROR_KEYS = {"message", "type", "code", "param"}


async def post(
    url: str, data: bytes | None = None, *, json: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, CIMultiDict[str], Any]:
    async with aiohttp.ClientSession() as session:
        async with session.post(
            url + "/v1/chat/completions", data=data, json=json, headers=headers
        ) as response:
            return (
                response.status,
                CIMultiDict(response.headers),
                await response.json(content_type=None),
            )


def assert_openai_error(body: Any, error_type: str, code: str | None = None) -> dict[str, Any]:
    assert set(body) == {"error"}
    error = body["error"]
    assert ERROR_KEYS <= set(error)
    assert error["type"] == error_type
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"]
    if code is not None:
        assert error["code"] == code
    return dict(error)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"this is not json", None),
        (b"[1, 2, 3]", None),
        (b"", None),
        (b'{"messages": [{"role": "user", "content": "hi"}]}', "model"),
        (b'{"model": "chat"}', "messages"),
        (b'{"model": "chat", "messages": []}', "messages"),
        (b'{"model": 42, "messages": [{"role": "user", "content": "hi"}]}', "model"),
        (
            b'{"model": "chat", "messages": [{"role": "wizard", "content": "hi"}]}',
            "messages[0].role",
        ),
        (b'{"model": "chat", "messages": [{"role": "user", "content": 7}]}', "messages[0].content"),
        (
            b'{"model": "chat", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}',
            "stream",
        ),
        (
            b'{"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}',
            "max_tokens",
        ),
    ],
)
async def test_bad_bodies_get_400(upstream: MockUpstream, body: bytes, param: str | None) -> None:
    async with run_gateway(openai_compatible(upstream)) as gw:
        status, headers, answer = await post(gw.url, body)
    assert status == 400
    error = assert_openai_error(answer, "invalid_request_error")
    if param is not None:
        assert error["param"] == param
    assert headers["x-request-id"]
    assert upstream.stats.requests == 0


async def test_unknown_alias_is_404_model_not_found(upstream: MockUpstream) -> None:
    async with run_gateway(openai_compatible(upstream)) as gw:
        status, _, body = await post(gw.url, json={"model": "gpt-9", "messages": HELLO})
        async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x") as sdk:
            with pytest.raises(openai.NotFoundError):
                await sdk.chat.completions.create(model="gpt-9", messages=HELLO)  # type: ignore[arg-type]
    assert status == 404
    assert_openai_error(body, "invalid_request_error", "model_not_found")


async def test_oversized_body_is_413(upstream: MockUpstream) -> None:
    config = openai_compatible(upstream)
    config["server"] = {"max_request_bytes": 2048}
    big = [{"role": "user", "content": "x" * 5000}]
    async with run_gateway(config) as gw:
        status, _, body = await post(gw.url, json={"model": "chat", "messages": big})
        small_status, _, _ = await post(gw.url, json={"model": "chat", "messages": HELLO})
    assert status == 413
    assert_openai_error(body, "invalid_request_error", "request_too_large")
    assert small_status == 200


def keyed(upstream: MockUpstream) -> dict[str, Any]:
    config = openai_compatible(upstream)
    config["models"]["secret"] = {"targets": [{"provider": "up", "model": "m2"}]}
    config["auth"] = {
        "keys": [
            {"name": "team-a", "key": "team-a-key", "models": ["chat"]},
            {"name": "admin", "key": "all-models-key"},
        ]
    }
    return config


async def test_missing_or_wrong_key_is_401(upstream: MockUpstream) -> None:
    async with run_gateway(keyed(upstream)) as gw:
        missing = await post(gw.url, json={"model": "chat", "messages": HELLO})
        wrong = await post(
            gw.url,
            json={"model": "chat", "messages": HELLO},
            headers={"Authorization": "Bearer nope"},
        )
        async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="nope") as sdk:
            with pytest.raises(openai.AuthenticationError):
                await sdk.chat.completions.create(model="chat", messages=HELLO)  # type: ignore[arg-type]
    for status, _, body in (missing, wrong):
        assert status == 401
        assert_openai_error(body, "authentication_error", "invalid_api_key")
        assert "nope" not in str(body)
    assert upstream.stats.requests == 0


async def test_keys_work_as_bearer_and_x_api_key(upstream: MockUpstream) -> None:
    async with run_gateway(keyed(upstream)) as gw:
        bearer = await post(
            gw.url,
            json={"model": "chat", "messages": HELLO},
            headers={"Authorization": "Bearer team-a-key"},
        )
        x_api_key = await post(
            gw.url, json={"model": "chat", "messages": HELLO}, headers={"x-api-key": "team-a-key"}
        )
    assert bearer[0] == 200
    assert x_api_key[0] == 200


async def test_key_not_allowed_the_model_is_403(upstream: MockUpstream) -> None:
    async with run_gateway(keyed(upstream)) as gw:
        denied = await post(
            gw.url,
            json={"model": "secret", "messages": HELLO},
            headers={"Authorization": "Bearer team-a-key"},
        )
        allowed = await post(
            gw.url,
            json={"model": "secret", "messages": HELLO},
            headers={"Authorization": "Bearer all-models-key"},
        )
        async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="team-a-key") as sdk:
            with pytest.raises(openai.PermissionDeniedError):
                await sdk.chat.completions.create(model="secret", messages=HELLO)  # type: ignore[arg-type]
            visible = [m.id for m in (await sdk.models.list()).data]
    assert denied[0] == 403
    assert_openai_error(denied[2], "permission_error")
    assert allowed[0] == 200
    assert visible == ["chat"]


async def test_upstream_plain_400_goes_back_as_it_is(upstream: MockUpstream) -> None:
    config = openai_compatible(upstream, headers={"x-mock-fail-status": "400"})
    async with run_gateway(config) as gw:
        status, _, body = await post(gw.url, json={"model": "chat", "messages": HELLO})
    assert status == 400
    assert_openai_error(body, "invalid_request_error")


@pytest.mark.parametrize(("upstream_status", "expected"), [(503, 502), (500, 502), (429, 429)])
async def test_failed_upstream_is_upstream_error_with_attempts(
    upstream: MockUpstream, upstream_status: int, expected: int
) -> None:
    config = openai_compatible(upstream, headers={"x-mock-fail-status": str(upstream_status)})
    async with run_gateway(config) as gw:
        status, _, body = await post(gw.url, json={"model": "chat", "messages": HELLO})
    assert status == expected
    error = assert_openai_error(body, "upstream_error", "upstream_error")
    assert error["attempts"][0]["provider"] == "up"
    assert error["attempts"][0]["model"] == "upstream-model"
    assert error["attempts"][0]["status"] == upstream_status


async def test_unreachable_upstream_is_502_not_500() -> None:
    config = {
        "providers": {
            "down": {
                "type": "openai_compatible",
                "base_url": "http://127.0.0.1:9/v1",
                "connect_timeout": "2s",
            }
        },
        "models": {"chat": {"targets": [{"provider": "down", "model": "m"}]}},
    }
    async with run_gateway(config) as gw:
        plain = await post(gw.url, json={"model": "chat", "messages": HELLO})
        streamed = await post(gw.url, json={"model": "chat", "messages": HELLO, "stream": True})
    for status, _, body in (plain, streamed):
        assert status == 502
        assert_openai_error(body, "upstream_error")


async def test_upstream_key_never_reaches_the_client(upstream: MockUpstream) -> None:
    secret = "sk-live-very-secret-upstream-key-123"
    config = openai_compatible(upstream, api_key=secret)
    # The upstream rejects the key and (like OpenAI) echoes it back in its message.
    config["providers"]["up"]["headers"] = {"x-mock-fail-status": "401"}
    async with run_gateway(config) as gw:
        status, headers, body = await post(gw.url, json={"model": "chat", "messages": HELLO})
    assert status == 502
    assert secret not in str(body)
    assert secret not in str(headers)


async def test_first_token_timeout_is_504(upstream: MockUpstream) -> None:
    config = openai_compatible(upstream, headers={"x-mock-latency": "3"})
    config["resilience"] = {"timeouts": {"first_token": "300ms"}}
    async with run_gateway(config) as gw:
        status, _, body = await post(
            gw.url, json={"model": "chat", "messages": HELLO, "stream": True}
        )
    assert status == 504
    assert_openai_error(body, "upstream_error")


async def test_stream_cut_mid_way_ends_with_an_error_event_not_done(
    upstream: MockUpstream,
) -> None:
    config = openai_compatible(upstream, headers={"x-mock-cut-after": "3"})
    async with run_gateway(config) as gw, aiohttp.ClientSession() as session:
        async with session.post(
            gw.url + "/v1/chat/completions",
            json={"model": "chat", "messages": HELLO, "stream": True},
        ) as response:
            assert response.status == 200
            text = (await response.read()).decode()
    events = [line[6:] for line in text.split("\n\n") if line.startswith("data: ")]
    assert "[DONE]" not in events
    assert '"error"' in events[-1]
    assert sum('"content"' in e for e in events[:-1]) >= 3


async def test_unknown_path_and_wrong_method(upstream: MockUpstream) -> None:
    async with run_gateway(openai_compatible(upstream)) as gw, aiohttp.ClientSession() as session:
        async with session.get(gw.url + "/v1/nothing") as response:
            assert response.status == 404
            assert_openai_error(await response.json(), "invalid_request_error")
        async with session.get(gw.url + "/v1/chat/completions") as response:
            assert response.status == 405
        async with session.get(gw.url + "/nothing") as response:
            assert response.status == 404
