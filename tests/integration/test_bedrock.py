"""The gateway in front of a fake Bedrock Runtime that checks every SigV4 signature,
driven by the official openai SDK."""

from __future__ import annotations

import asyncio
import base64
import json
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import run_gateway
from tests.fakes.bedrock_server import (
    FakeBedrock,
    ToolUse,
    isolate_aws_env,
    start_fake_bedrock,
)

pytestmark = pytest.mark.anyio
KEY_ID, SECRET, TOKEN = "AKIDINTEGRATION01", "integration-secret", "session-token-1"
ENV_KEY_ID, ENV_SECRET = "AKIDFROMENVIRON01", "environment-secret"
PROFILE_KEY_ID, PROFILE_SECRET = "AKIDFROMPROFILE01", "profile-secret"
EXPIRED_KEY_ID = "ASIAEXPIRED000001"
API_KEY = "bedrock-api-key-abc123"
CLAUDE = "us.anthropic.claude-3-5-sonnet-20240620-v1:0"
NOVA = "amazon.nova-pro-v1:0"
ARN = "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.meta.llama3-2-90b-instruct-v1:0"
HELLO = [{"role": "user", "content": "Hello?"}]
WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


@pytest.fixture(autouse=True)
def no_aws_from_this_machine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    isolate_aws_env(monkeypatch, tmp_path)


@pytest.fixture
async def fake() -> AsyncIterator[FakeBedrock]:
    server = await start_fake_bedrock(
        credentials={
            KEY_ID: (SECRET, TOKEN),
            ENV_KEY_ID: (ENV_SECRET, None),
            PROFILE_KEY_ID: (PROFILE_SECRET, None),
            EXPIRED_KEY_ID: ("whatever", None),
        },
        expired_key_ids={EXPIRED_KEY_ID},
        api_keys={API_KEY},
    )
    try:
        yield server
    finally:
        await server.close()


def bedrock(fake: FakeBedrock, **fields: Any) -> dict[str, Any]:
    provider = {"type": "bedrock", "region": "us-east-1", "base_url": fake.url}
    if "access_key_id" not in fields and "api_key" not in fields and not fields.pop("chain", False):
        provider |= {"access_key_id": KEY_ID, "secret_access_key": SECRET, "session_token": TOKEN}
    return provider | fields


def gateway_config(
    fake: FakeBedrock,
    models: list[str] | None = None,
    *,
    provider: dict[str, Any] | None = None,
    resilience: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "providers": {"aws": provider or bedrock(fake)},
        "models": {
            "chat": {"targets": [{"provider": "aws", "model": m} for m in models or [CLAUDE]]}
        },
        "resilience": resilience
        or {"retry": {"max_attempts": 3, "initial_backoff": "1ms", "max_backoff": "10ms"}},
        "logging": {"level": "warning"},
    }


def client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)


async def post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/v1/chat/completions", json=body) as response:
            return response.status, await response.json(content_type=None)


# -- answers -------------------------------------------------------------------------------


async def test_completion_through_the_gateway(fake: FakeBedrock) -> None:
    async with run_gateway(gateway_config(fake)) as gw, client(gw.url) as sdk:
        raw = await sdk.chat.completions.with_raw_response.create(
            model="chat",
            messages=[{"role": "system", "content": "Be brief."}, *HELLO],
            max_tokens=64,
            temperature=0.2,
        )
        answer = raw.parse()
    assert answer.choices[0].message.content == "Hello from the fake Bedrock."
    assert answer.choices[0].finish_reason == "stop"
    assert answer.model == CLAUDE
    assert answer.usage is not None and answer.usage.prompt_tokens == 11
    assert raw.headers["x-resillm-provider"] == "aws"
    assert raw.headers["x-resillm-model"] == CLAUDE
    [received] = fake.requests
    assert received.model == CLAUDE and received.operation == "Converse"
    assert received.body == {
        "messages": [{"role": "user", "content": [{"text": "Hello?"}]}],
        "system": [{"text": "Be brief."}],
        "inferenceConfig": {"maxTokens": 64, "temperature": 0.2},
    }


async def test_streamed_tool_call_assembled_by_the_openai_sdk(fake: FakeBedrock) -> None:
    fake.scenario(CLAUDE).text = "Let me check the weather."
    fake.scenario(CLAUDE).tool_use = ToolUse("get_weather", {"city": "Paris", "days": [1, 2]})
    async with run_gateway(gateway_config(fake)) as gw, client(gw.url) as sdk:
        async with sdk.chat.completions.stream(
            model="chat",
            messages=[{"role": "user", "content": "Weather in Paris?"}],
            tools=[WEATHER_TOOL],
            tool_choice="required",
        ) as stream:
            async for _ in stream:
                pass
            final = await stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check the weather."
    [call] = choice.message.tool_calls or []
    assert call.type == "function"
    assert call.id == "tooluse_fake01"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": [1, 2]}
    assert final.model == CLAUDE
    [received] = fake.requests
    assert received.operation == "ConverseStream"
    assert received.headers["Accept"] == "application/vnd.amazon.eventstream"
    assert received.body["toolConfig"] == {
        "tools": [
            {
                "toolSpec": {
                    "name": "get_weather",
                    "description": "The weather in a city",
                    "inputSchema": {"json": WEATHER_TOOL["function"]["parameters"]},
                }
            }
        ],
        "toolChoice": {"any": {}},
    }


async def test_stream_usage_only_when_the_client_asks(fake: FakeBedrock) -> None:
    async with run_gateway(gateway_config(fake)) as gw, client(gw.url) as sdk:
        for include in (False, True):
            stream = await sdk.chat.completions.create(
                model="chat",
                messages=HELLO,
                stream=True,
                stream_options={"include_usage": include},
            )
            text, usage = "", None
            async for chunk in stream:
                usage = chunk.usage or usage
                text += "".join(c.delta.content or "" for c in chunk.choices)
            assert text == "Hello from the fake Bedrock."
            if include:
                assert usage is not None and usage.total_tokens == 18
            else:
                assert usage is None


async def test_tool_results_and_images_reach_bedrock(fake: FakeBedrock) -> None:
    png = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(2000)).decode()
    messages: Any = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What city is this?"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
            ],
        },
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": "call_9",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_9", "content": "Sunny"},
    ]
    async with run_gateway(gateway_config(fake)) as gw, client(gw.url) as sdk:
        answer = await sdk.chat.completions.create(
            model="chat", messages=messages, tools=[WEATHER_TOOL]
        )
    assert answer.choices[0].message.content
    body = fake.requests[0].body
    assert body["messages"][0]["content"][1] == {
        "image": {"format": "png", "source": {"bytes": png}}
    }
    assert body["messages"][2]["content"] == [
        {"toolResult": {"toolUseId": "call_9", "content": [{"text": "Sunny"}]}}
    ]


@pytest.mark.parametrize(
    "model", [ARN, NOVA, "arn:aws:bedrock:us-east-1::foundation-model/a.b-v1:0"]
)
async def test_model_ids_with_colons_and_slashes_are_signed_and_routed(
    fake: FakeBedrock, model: str
) -> None:
    async with run_gateway(gateway_config(fake, [model])) as gw, client(gw.url) as sdk:
        answer = await sdk.chat.completions.create(model="chat", messages=HELLO)
        stream = await sdk.chat.completions.create(model="chat", messages=HELLO, stream=True)
        chunks = [chunk async for chunk in stream]
    assert answer.model == model
    assert {c.model for c in chunks} == {model}
    assert [r.model for r in fake.requests] == [model, model]


# -- resilience ------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_throttling_is_retried_on_the_same_target(fake: FakeBedrock, stream: bool) -> None:
    fake.scenario(CLAUDE).errors = deque(["ThrottlingException", "ThrottlingException"])
    async with run_gateway(gateway_config(fake, [CLAUDE, NOVA])) as gw, client(gw.url) as sdk:
        raw = await sdk.chat.completions.with_raw_response.create(
            model="chat", messages=HELLO, stream=stream
        )
        if stream:
            async for _ in raw.parse():
                pass
    assert raw.headers["x-resillm-model"] == CLAUDE
    assert raw.headers["x-resillm-attempts"] == "3"
    assert fake.count(CLAUDE) == 3 and fake.count(NOVA) == 0


@pytest.mark.parametrize("stream", [False, True])
async def test_throttling_retried_then_falling_back_to_the_next_target(
    fake: FakeBedrock, stream: bool
) -> None:
    fake.scenario(CLAUDE).always_error = "ThrottlingException"
    fake.scenario(NOVA).text = "Nova here."
    async with run_gateway(gateway_config(fake, [CLAUDE, NOVA])) as gw, client(gw.url) as sdk:
        raw = await sdk.chat.completions.with_raw_response.create(
            model="chat", messages=HELLO, stream=stream
        )
        if stream:
            text = ""
            async for chunk in raw.parse():
                text += "".join(c.delta.content or "" for c in chunk.choices)
        else:
            text = raw.parse().choices[0].message.content or ""
    assert text == "Nova here."
    assert raw.headers["x-resillm-model"] == NOVA
    assert raw.headers["x-resillm-attempts"] == "4"
    assert fake.count(CLAUDE) == 3 and fake.count(NOVA) == 1


async def test_failed_and_finished_calls_give_back_their_connection_slot(
    fake: FakeBedrock,
) -> None:
    """With max_connections 1, one leaked slot would hang every later request."""
    fake.scenario(CLAUDE).errors = deque(["ThrottlingException", "ServiceUnavailableException"])
    fake.scenario(NOVA).stream_exception_after = 2
    config = gateway_config(
        fake,
        [CLAUDE],
        provider=bedrock(fake, max_connections=1),
        resilience={"stream_recovery": False},
    )
    config["models"]["nova"] = {"targets": [{"provider": "aws", "model": NOVA}]}
    async with run_gateway(config) as gw, client(gw.url) as sdk:
        async with asyncio.timeout(10):
            for stream in (True, False, True, False):
                answer = await sdk.chat.completions.create(
                    model="chat", messages=HELLO, stream=stream
                )
                if stream:
                    async for _ in answer:
                        pass
            broken = await sdk.chat.completions.create(model="nova", messages=HELLO, stream=True)
            with pytest.raises(openai.APIError):
                async for _ in broken:
                    pass
            status, _ = await post(gw.url, {"model": "nova", "messages": HELLO})
    assert status == 200
    assert fake.count(CLAUDE) == 6 and fake.count(NOVA) == 2


async def test_every_target_throttled_is_a_429_naming_bedrock(fake: FakeBedrock) -> None:
    fake.scenario(CLAUDE).always_error = "ThrottlingException"
    async with run_gateway(gateway_config(fake)) as gw:
        status, body = await post(gw.url, {"model": "chat", "messages": HELLO})
    assert status == 429
    [attempt, *_] = body["error"]["attempts"]
    assert attempt["provider"] == "aws" and attempt["model"] == CLAUDE
    assert attempt["status"] == 429 and "ThrottlingException" in attempt["message"]


async def test_a_validation_error_goes_back_to_the_client(fake: FakeBedrock) -> None:
    fake.scenario(CLAUDE).always_error = "ValidationException"
    fake.scenario(CLAUDE).error_message = "The provided model identifier is invalid."
    async with run_gateway(gateway_config(fake, [CLAUDE, NOVA])) as gw:
        status, body = await post(gw.url, {"model": "chat", "messages": HELLO})
    assert status == 400
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"] == (
        "ValidationException: The provided model identifier is invalid."
    )
    assert fake.count(CLAUDE) == 1 and fake.count(NOVA) == 0


async def test_input_too_long_falls_back_without_retrying(fake: FakeBedrock) -> None:
    fake.scenario(CLAUDE).always_error = "ValidationException"
    fake.scenario(CLAUDE).error_message = "Input is too long for requested model."
    async with run_gateway(gateway_config(fake, [CLAUDE, NOVA])) as gw:
        status, body = await post(gw.url, {"model": "chat", "messages": HELLO})
    assert status == 200 and body["model"] == NOVA
    assert fake.count(CLAUDE) == 1 and fake.count(NOVA) == 1


async def test_exception_frame_before_the_first_token_is_retried(fake: FakeBedrock) -> None:
    scenario = fake.scenario(CLAUDE)
    scenario.stream_exception_after = 0  # messageStart, then throttlingException
    async with run_gateway(gateway_config(fake)) as gw, client(gw.url) as sdk:
        raw = await sdk.chat.completions.with_raw_response.create(
            model="chat", messages=HELLO, stream=True
        )
        text = ""
        async for chunk in raw.parse():
            text += "".join(c.delta.content or "" for c in chunk.choices)
    assert text == "Hello from the fake Bedrock."
    assert raw.headers["x-resillm-attempts"] == "2"
    assert fake.count(CLAUDE) == 2


async def test_mid_stream_exception_frame_ends_the_stream_with_an_error(fake: FakeBedrock) -> None:
    scenario = fake.scenario(CLAUDE)
    scenario.text = "one two three four five"
    scenario.stream_exception_after = 2
    scenario.stream_exception = "modelStreamErrorException"
    config = gateway_config(fake, resilience={"stream_recovery": False})
    async with run_gateway(config) as gw, client(gw.url) as sdk:
        stream = await sdk.chat.completions.create(model="chat", messages=HELLO, stream=True)
        text = ""
        with pytest.raises(openai.APIError) as caught:
            async for chunk in stream:
                text += "".join(c.delta.content or "" for c in chunk.choices)
    assert text == "one two"
    assert "ModelStreamErrorException" in str(caught.value)


async def test_mid_stream_exception_is_recovered_when_recovery_is_on(fake: FakeBedrock) -> None:
    scenario = fake.scenario(CLAUDE)
    scenario.text = "one two three four five"
    scenario.stream_exception_after = 2
    async with run_gateway(gateway_config(fake)) as gw, client(gw.url) as sdk:
        stream = await sdk.chat.completions.create(model="chat", messages=HELLO, stream=True)
        text = ""
        async for chunk in stream:
            text += "".join(c.delta.content or "" for c in chunk.choices)
    assert fake.count(CLAUDE) == 2
    # Bedrock takes a prefill: the second request continues the text already sent.
    assert fake.requests[1].body["messages"][-1] == {
        "role": "assistant",
        "content": [{"text": "one two"}],
    }
    assert text == "one two three four five"


# -- credentials and signatures ----------------------------------------------------------------


async def test_credentials_from_environment_variables(
    fake: FakeBedrock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ENV_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ENV_SECRET)
    config = gateway_config(fake, provider=bedrock(fake, chain=True))
    async with run_gateway(config) as gw, client(gw.url) as sdk:
        answer = await sdk.chat.completions.create(model="chat", messages=HELLO)
    assert answer.choices[0].message.content
    assert f"Credential={ENV_KEY_ID}/" in fake.requests[0].headers["Authorization"]


async def test_credentials_from_a_profile_in_home(
    fake: FakeBedrock, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("AWS_SHARED_CREDENTIALS_FILE")
    monkeypatch.delenv("AWS_CONFIG_FILE")
    (tmp_path / ".aws").mkdir()
    (tmp_path / ".aws" / "credentials").write_text(
        f"[bedrock-team]\naws_access_key_id = {PROFILE_KEY_ID}\n"
        f"aws_secret_access_key = {PROFILE_SECRET}\n"
    )
    config = gateway_config(fake, provider=bedrock(fake, chain=True, profile="bedrock-team"))
    async with run_gateway(config) as gw, client(gw.url) as sdk:
        stream = await sdk.chat.completions.create(model="chat", messages=HELLO, stream=True)
        chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert f"Credential={PROFILE_KEY_ID}/" in fake.requests[0].headers["Authorization"]


async def test_no_credentials_is_reported_with_what_to_configure(fake: FakeBedrock) -> None:
    config = gateway_config(fake, provider=bedrock(fake, chain=True))
    async with run_gateway(config) as gw:
        status, body = await post(gw.url, {"model": "chat", "messages": HELLO})
    assert status == 502
    [attempt] = body["error"]["attempts"]
    assert attempt["status"] == 401
    assert "no AWS credentials found" in attempt["message"]
    assert "AWS_ACCESS_KEY_ID" in attempt["message"]
    assert fake.requests == []


async def test_a_bad_signature_is_rejected_and_reported(fake: FakeBedrock) -> None:
    provider = bedrock(fake, access_key_id=KEY_ID, secret_access_key="not-the-secret")
    provider["session_token"] = TOKEN
    async with run_gateway(gateway_config(fake, provider=provider)) as gw:
        status, body = await post(gw.url, {"model": "chat", "messages": HELLO})
    assert status == 502
    assert body["error"]["type"] == "upstream_error"
    [attempt] = body["error"]["attempts"]  # a 403 is not retried on the same target
    assert attempt["status"] == 403
    assert "InvalidSignatureException" in attempt["message"]
    assert "signature we calculated does not match" in attempt["message"]
    assert "check the AWS secret access key" in attempt["message"]
    assert "not-the-secret" not in json.dumps(body)


async def test_expired_credentials_are_rejected_and_reported(fake: FakeBedrock) -> None:
    provider = bedrock(fake, access_key_id=EXPIRED_KEY_ID, secret_access_key="whatever")
    async with run_gateway(gateway_config(fake, provider=provider)) as gw, client(gw.url) as sdk:
        with pytest.raises(openai.APIStatusError) as caught:
            await sdk.chat.completions.create(model="chat", messages=HELLO, stream=True)
    assert caught.value.status_code == 502
    assert "ExpiredTokenException" in caught.value.message
    assert "security token included in the request is expired" in caught.value.message


async def test_expired_credentials_fall_back_to_another_account(fake: FakeBedrock) -> None:
    config = {
        "providers": {
            "old": bedrock(fake, access_key_id=EXPIRED_KEY_ID, secret_access_key="whatever"),
            "new": bedrock(fake),
        },
        "models": {
            "chat": {
                "targets": [
                    {"provider": "old", "model": CLAUDE},
                    {"provider": "new", "model": CLAUDE},
                ]
            }
        },
        "logging": {"level": "warning"},
    }
    async with run_gateway(config) as gw, client(gw.url) as sdk:
        raw = await sdk.chat.completions.with_raw_response.create(model="chat", messages=HELLO)
    assert raw.headers["x-resillm-provider"] == "new"
    assert raw.headers["x-resillm-attempts"] == "2"


async def test_a_bedrock_api_key_is_sent_as_a_bearer_token(fake: FakeBedrock) -> None:
    config = gateway_config(fake, provider=bedrock(fake, api_key=API_KEY))
    async with run_gateway(config) as gw, client(gw.url) as sdk:
        answer = await sdk.chat.completions.create(model="chat", messages=HELLO)
    assert answer.choices[0].message.content
    assert fake.requests[0].headers["Authorization"] == f"Bearer {API_KEY}"


async def test_the_bearer_token_environment_variable_is_honoured(
    fake: FakeBedrock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_BEARER_TOKEN_BEDROCK", API_KEY)
    config = gateway_config(fake, provider=bedrock(fake, chain=True))
    async with run_gateway(config) as gw, client(gw.url) as sdk:
        await sdk.chat.completions.create(model="chat", messages=HELLO)
    assert fake.requests[0].headers["Authorization"] == f"Bearer {API_KEY}"


# -- what Bedrock cannot take ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
                        ],
                    }
                ]
            },
            "messages[0].content[0].image_url.url",
        ),
        ({"n": 3}, "n"),
    ],
)
async def test_what_bedrock_cannot_take_is_a_400_before_any_call(
    fake: FakeBedrock, fields: dict[str, Any], param: str
) -> None:
    async with run_gateway(gateway_config(fake)) as gw:
        status, body = await post(gw.url, {"model": "chat", "messages": HELLO, **fields})
    assert status == 400
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] == param
    assert fake.requests == []
