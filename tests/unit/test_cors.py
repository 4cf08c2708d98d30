"""The CORS layer as raw ASGI: preflights, allowed and refused origins, and its absence
from the ``/v1`` stack while ``cors.allow_origins`` is empty (the default)."""

from __future__ import annotations

from typing import Any

import pytest

from middleware.cors import CorsMiddleware
from resillm.asgi import Message, Receive, Scope, Send
from resillm.config import CorsConfig
from resillm.config_loader import ConfigError, config_from_dict

pytestmark = pytest.mark.anyio
APP = "https://app.example.com"
PROVIDERS = {
    "providers": {"m": {"type": "mock"}},
    "models": {"x": {"targets": [{"provider": "m", "model": "m"}]}},
}


async def inner(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"x-inner", b"1")]})
    await send({"type": "http.response.body", "body": b"{}"})


async def call(
    config: CorsConfig, method: str = "POST", **headers: str
) -> tuple[list[Message], list[str]]:
    reached: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        reached.append(scope["method"])
        await inner(scope, receive, send)

    scope: dict[str, Any] = {
        "type": "http",
        "method": method,
        "path": "/v1/chat/completions",
        "headers": [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()],
    }
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    await CorsMiddleware(app, config=config)(scope, receive, send)
    return sent, reached


def headers_of(sent: list[Message]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in sent[0]["headers"]}


async def test_a_preflight_from_an_allowed_origin_is_answered_without_the_app() -> None:
    config = CorsConfig(allow_origins=[APP], max_age=120)
    sent, reached = await call(config, "OPTIONS", origin=APP, access_control_request_method="POST")
    assert reached == []
    assert sent[0]["status"] == 204
    assert headers_of(sent) == {
        "access-control-allow-origin": APP,
        "vary": "Origin",
        "access-control-allow-methods": "GET, POST, OPTIONS",
        "access-control-allow-headers": "authorization, content-type, x-api-key, traceparent",
        "access-control-max-age": "120",
    }


async def test_an_answer_to_an_allowed_origin_carries_allow_origin() -> None:
    config = CorsConfig(allow_origins=[APP], expose_headers=["x-request-id"])
    sent, reached = await call(config, origin=APP)
    assert reached == ["POST"]
    assert headers_of(sent) == {
        "x-inner": "1",
        "access-control-allow-origin": APP,
        "vary": "Origin",
        "access-control-expose-headers": "x-request-id",
    }
    assert sent[1]["body"] == b"{}"


async def test_other_origins_and_plain_requests_pass_through_untouched() -> None:
    config = CorsConfig(allow_origins=[APP])
    for headers in (
        {"origin": "https://evil.example.com"},
        {"origin": "https://evil.example.com", "access_control_request_method": "POST"},
        {},
    ):
        method = "OPTIONS" if "access_control_request_method" in headers else "POST"
        sent, reached = await call(config, method, **headers)
        assert reached == [method]
        assert headers_of(sent) == {"x-inner": "1"}


async def test_a_star_allows_any_origin() -> None:
    sent, _ = await call(CorsConfig(allow_origins=["*"]), origin="https://any.example.org")
    assert headers_of(sent)["access-control-allow-origin"] == "https://any.example.org"


def test_the_section_is_closed_by_default_and_validated() -> None:
    assert config_from_dict(PROVIDERS).cors == CorsConfig(allow_origins=[])
    config = config_from_dict({**PROVIDERS, "cors": {"allow_origins": [APP], "max_age": 5}})
    assert config.cors.allow_origins == [APP] and config.cors.max_age == 5
    for bad in ({"allow_origin": [APP]}, {"max_age": -1}, {"allow_origins": [""]}):
        with pytest.raises(ConfigError):
            config_from_dict({**PROVIDERS, "cors": bad})
