"""A fake Bedrock Runtime on loopback: Converse and ConverseStream, SigV4 checked.

Like AWS, it recomputes every request's SigV4 signature with botocore (from the raw path,
the headers the client signed and the body bytes received) and refuses a mismatch with 403
``InvalidSignatureException``; an access key id listed as expired gets 403
``ExpiredTokenException``, an unknown one ``UnrecognizedClientException``. A Bedrock API
key may be sent as ``Authorization: Bearer`` instead. Every request body is validated
against botocore's ``ConverseRequest`` shape (a mismatch is a 400 ``ValidationException``).

Answers follow a :class:`Scenario` per model id: a text answer or a tool call, errors for
the next N requests (throttling, ...), an exception frame in the middle of a stream.
Streams are real binary event-stream frames (prelude, headers, payload, both CRCs), each
written in two pieces so clients must decode incrementally.
"""

from __future__ import annotations

import asyncio
import binascii
import hmac
import json
import os
import re
import struct
import uuid
from collections import deque
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from aiohttp import web
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.model import ServiceModel
from botocore.session import get_session
from botocore.validate import ParamValidator

EVENT_STREAM = "application/vnd.amazon.eventstream"
MAX_CLOCK_SKEW_S = 300
# The statuses AWS answers each exception with (botocore's service model, plus auth).
EXCEPTION_STATUS = {
    "ThrottlingException": 429,
    "ServiceUnavailableException": 503,
    "ModelNotReadyException": 429,
    "ValidationException": 400,
    "AccessDeniedException": 403,
    "ResourceNotFoundException": 404,
    "ModelTimeoutException": 408,
    "InternalServerException": 500,
    "ModelErrorException": 424,
    "ServiceQuotaExceededException": 400,
    "UnrecognizedClientException": 403,
    "ExpiredTokenException": 403,
    "InvalidSignatureException": 403,
    "IncompleteSignatureException": 403,
    "MissingAuthenticationTokenException": 403,
}
_AUTH_RE = re.compile(
    r"AWS4-HMAC-SHA256 Credential=(?P<key>[^/]+)/(?P<date>\d{8})/(?P<region>[^/]+)/"
    r"(?P<service>[^/]+)/aws4_request, SignedHeaders=(?P<signed>[a-z0-9;-]+), "
    r"Signature=(?P<signature>[0-9a-f]{64})"
)
_PATH_RE = re.compile(r"/model/(?P<model>[^/?]+)/(?P<op>converse|converse-stream)")


# -- event-stream frames --------------------------------------------------------------------


def encode_frame(headers: dict[str, str], payload: bytes) -> bytes:
    """One event-stream message: prelude (total length, headers length, CRC), string
    headers, payload, and the CRC32 of everything before it."""
    encoded = b""
    for name, value in headers.items():
        raw_name, raw_value = name.encode(), value.encode()
        encoded += struct.pack("!B", len(raw_name)) + raw_name
        encoded += struct.pack("!BH", 7, len(raw_value)) + raw_value  # 7: string
    total = 12 + len(encoded) + len(payload) + 4
    prelude = struct.pack("!II", total, len(encoded))
    prelude += struct.pack("!I", binascii.crc32(prelude) & 0xFFFFFFFF)
    message = prelude + encoded + payload
    return message + struct.pack("!I", binascii.crc32(message) & 0xFFFFFFFF)


def event_frame(event_type: str, body: dict[str, Any]) -> bytes:
    # Bedrock pads each event with a "p" member so sizes do not reveal the tokens.
    payload = json.dumps({**body, "p": "abcdefghij"[: 1 + len(event_type) % 10]}).encode()
    headers = {
        ":event-type": event_type,
        ":content-type": "application/json",
        ":message-type": "event",
    }
    return encode_frame(headers, payload)


def exception_frame(exception_type: str, message: str) -> bytes:
    headers = {
        ":exception-type": exception_type,
        ":content-type": "application/json",
        ":message-type": "exception",
    }
    return encode_frame(headers, json.dumps({"message": message}).encode())


# -- scenarios ------------------------------------------------------------------------------


@dataclass
class ToolUse:
    name: str
    input: dict[str, Any]
    id: str = "tooluse_fake01"


@dataclass
class Scenario:
    """How the fake answers one model id."""

    text: str = "Hello from the fake Bedrock."
    tool_use: ToolUse | None = None
    stop_reason: str | None = None  # default: end_turn, or tool_use with a tool call
    input_tokens: int = 11
    output_tokens: int = 7
    cache_read_tokens: int | None = None
    # Exception types answered (as HTTP errors) to the next requests, one per request.
    errors: deque[str] = field(default_factory=deque)
    always_error: str | None = None
    error_message: str | None = None  # instead of "fake <ExceptionType>"
    # After this many content deltas, the next stream ends with an exception frame (once).
    stream_exception_after: int | None = None
    stream_exception: str = "throttlingException"
    send_metadata: bool = True
    frame_delay_s: float = 0.0


@dataclass
class Received:
    model: str
    operation: str
    body: dict[str, Any]
    headers: dict[str, str]


@dataclass
class FakeBedrock:
    url: str
    runner: web.AppRunner
    credentials: dict[str, tuple[str, str | None]]
    expired_key_ids: set[str]
    api_keys: set[str]
    region: str
    scenarios: dict[str, Scenario] = field(default_factory=dict)
    requests: list[Received] = field(default_factory=list)

    def scenario(self, model: str) -> Scenario:
        return self.scenarios.setdefault(model, Scenario())

    def count(self, model: str) -> int:
        return sum(1 for r in self.requests if r.model == model)

    async def close(self) -> None:
        await self.runner.cleanup()


async def start_fake_bedrock(
    *,
    credentials: dict[str, tuple[str, str | None]] | None = None,
    expired_key_ids: set[str] | None = None,
    api_keys: set[str] | None = None,
    region: str = "us-east-1",
) -> FakeBedrock:
    """Start the fake on 127.0.0.1 and an ephemeral port. ``credentials`` maps access key
    ids to (secret access key, session token or None)."""
    app = web.Application(client_max_size=64 * 1024 * 1024)
    handler = _Handler()
    app.router.add_route("*", "/{tail:.*}", handler.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    handler.fake = FakeBedrock(
        url=f"http://127.0.0.1:{port}",
        runner=runner,
        credentials=credentials or {},
        expired_key_ids=expired_key_ids or set(),
        api_keys=api_keys or set(),
        region=region,
    )
    fake = handler.fake
    return fake


_service_model: ServiceModel | None = None


def bedrock_runtime_model() -> ServiceModel:
    """botocore's service model for bedrock-runtime: the authoritative wire format."""
    global _service_model
    if _service_model is None:
        _service_model = get_session().get_service_model("bedrock-runtime")
    return _service_model


def validation_errors(operation: str, params: dict[str, Any]) -> str:
    """botocore's own report of what in ``params`` breaks the operation's input shape."""
    shape = bedrock_runtime_model().operation_model(operation).input_shape
    report = ParamValidator().validate(params, shape)
    return report.generate_report() if report.has_errors() else ""


# -- the server ------------------------------------------------------------------------------


class _Handler:
    fake: FakeBedrock  # set once the server listens

    async def handle(self, request: web.Request) -> web.StreamResponse:
        match = _PATH_RE.fullmatch(request.raw_path)
        if request.method != "POST" or match is None:
            return _error("UnknownOperationException", "unknown operation", 404)
        body = await request.read()
        denied = self.check_auth(request, body)
        if denied is not None:
            return _error(*denied)
        model = unquote(match["model"])
        operation = "Converse" if match["op"] == "converse" else "ConverseStream"
        try:
            params = json.loads(body)
        except ValueError:
            return _error("ValidationException", "Malformed request body")
        self.fake.requests.append(Received(model, operation, params, dict(request.headers)))
        problems = validation_errors(operation, {**params, "modelId": model})
        if problems:
            return _error("ValidationException", problems)
        scenario = self.fake.scenario(model)
        kind = scenario.errors.popleft() if scenario.errors else scenario.always_error
        if kind:
            return _error(kind, scenario.error_message or f"fake {kind}")
        scenario = continued(scenario, params["messages"])
        if operation == "Converse":
            return web.json_response(
                converse_answer(scenario), headers={"x-amzn-RequestId": str(uuid.uuid4())}
            )
        return await self.stream(request, scenario)

    def check_auth(self, request: web.Request, body: bytes) -> tuple[str, str] | None:
        fake = self.fake
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            if auth.removeprefix("Bearer ") in fake.api_keys:
                return None
            return (
                "UnrecognizedClientException",
                "Invalid API Key format: Must start with pre-defined prefix",
            )
        if not auth:
            return "MissingAuthenticationTokenException", "Missing Authentication Token"
        match = _AUTH_RE.fullmatch(auth)
        if match is None:
            return (
                "IncompleteSignatureException",
                "Authorization header requires 'Credential', 'Signature' and 'SignedHeaders' "
                "parameters",
            )
        key = match["key"]
        if key in fake.expired_key_ids:
            return "ExpiredTokenException", "The security token included in the request is expired"
        if key not in fake.credentials:
            return (
                "UnrecognizedClientException",
                "The security token included in the request is invalid.",
            )
        secret, token = fake.credentials[key]
        if token != request.headers.get("X-Amz-Security-Token"):
            return (
                "UnrecognizedClientException",
                "The security token included in the request is invalid.",
            )
        if match["region"] != fake.region or match["service"] != "bedrock":
            return (
                "InvalidSignatureException",
                "Credential should be scoped to a valid region and service 'bedrock', "
                f"not '{match['region']}/{match['service']}'.",
            )
        signed = match["signed"].split(";")
        required = {"host", "x-amz-date"} | ({"x-amz-security-token"} if token else set())
        if not required <= set(signed) or any(name not in request.headers for name in signed):
            return "IncompleteSignatureException", f"signed headers must include {sorted(required)}"
        amz_date = request.headers["X-Amz-Date"]
        when = datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        if abs((datetime.now(UTC) - when).total_seconds()) > MAX_CLOCK_SKEW_S:
            return "InvalidSignatureException", "Signature expired"
        if not amz_date.startswith(match["date"]):
            return (
                "InvalidSignatureException",
                "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of "
                "date from HTTP",
            )
        expected = recompute_signature(
            method=request.method,
            url=f"http://{request.host}{request.raw_path}",
            headers={name: ",".join(request.headers.getall(name)) for name in signed},
            body=body,
            credentials=Credentials(key, secret, token),
            region=match["region"],
            service=match["service"],
            amz_date=amz_date,
        )
        if not hmac.compare_digest(expected, match["signature"]):
            return (
                "InvalidSignatureException",
                "The request signature we calculated does not match the signature you "
                "provided. Check your AWS Secret Access Key and signing method. Consult the "
                "service documentation for details.",
            )
        return None

    async def stream(self, request: web.Request, scenario: Scenario) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": EVENT_STREAM, "x-amzn-RequestId": str(uuid.uuid4())}
        )
        await response.prepare(request)
        frames = stream_frames(scenario)
        if scenario.stream_exception_after is not None:
            # The first few events, then the exception frame instead of the rest (once).
            cut = 1 + scenario.stream_exception_after
            frames = [
                *frames[:cut],
                exception_frame(scenario.stream_exception, f"fake {scenario.stream_exception}"),
            ]
            scenario.stream_exception_after = None
        for frame in frames:
            half = len(frame) // 2
            await response.write(frame[:half])
            await asyncio.sleep(0)
            await response.write(frame[half:])
            if scenario.frame_delay_s:
                await asyncio.sleep(scenario.frame_delay_s)
        await response.write_eof()
        return response


def recompute_signature(
    *,
    method: str,
    url: str,
    headers: dict[str, str],
    body: bytes,
    credentials: Credentials,
    region: str,
    service: str,
    amz_date: str,
) -> str:
    """The SigV4 signature AWS would compute for this request, with botocore's signer."""
    aws_request = AWSRequest(method=method, url=url, data=body, headers=headers)
    aws_request.context["timestamp"] = amz_date
    signer = SigV4Auth(credentials, service, region)
    canonical = signer.canonical_request(aws_request)
    return signer.signature(signer.string_to_sign(aws_request, canonical), aws_request)


def continued(scenario: Scenario, messages: list[dict[str, Any]]) -> Scenario:
    """A trailing assistant turn is a prefill: like Claude, answer with what follows it
    (the scripted text when it does not start with the prefill). Scripted failures that
    fire once stay with the original scenario."""
    last = messages[-1] if messages else {}
    prefill = "".join(b.get("text", "") for b in last.get("content", ()))
    if last.get("role") != "assistant" or not scenario.text.startswith(prefill):
        return scenario
    rest = scenario.text[len(prefill) :]
    return replace(scenario, text=rest, errors=deque(), stream_exception_after=None)


def _error(kind: str, message: str, status: int | None = None) -> web.Response:
    return web.json_response(
        {"message": message},
        status=status or EXCEPTION_STATUS.get(kind, 400),
        headers={
            "x-amzn-ErrorType": f"{kind}:http://internal.amazon.com/coral/com.amazon.bedrock/",
            "x-amzn-RequestId": str(uuid.uuid4()),
        },
    )


def _usage(scenario: Scenario) -> dict[str, int]:
    usage = {
        "inputTokens": scenario.input_tokens,
        "outputTokens": scenario.output_tokens,
        "totalTokens": scenario.input_tokens + scenario.output_tokens,
    }
    if scenario.cache_read_tokens is not None:
        usage["cacheReadInputTokens"] = scenario.cache_read_tokens
        usage["totalTokens"] += scenario.cache_read_tokens
    return usage


def _stop_reason(scenario: Scenario) -> str:
    if scenario.stop_reason:
        return scenario.stop_reason
    return "tool_use" if scenario.tool_use else "end_turn"


def converse_answer(scenario: Scenario) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if scenario.text:
        content.append({"text": scenario.text})
    if scenario.tool_use:
        use = scenario.tool_use
        content.append({"toolUse": {"toolUseId": use.id, "name": use.name, "input": use.input}})
    return {
        "output": {"message": {"role": "assistant", "content": content}},
        "stopReason": _stop_reason(scenario),
        "usage": _usage(scenario),
        "metrics": {"latencyMs": 42},
    }


def text_pieces(text: str) -> list[str]:
    return re.findall(r"\s*\S+", text) or [text]


def stream_frames(scenario: Scenario) -> list[bytes]:
    """messageStart, the text block's deltas (text blocks have no start event), the tool
    call's start and argument fragments, messageStop, metadata."""
    frames = [event_frame("messageStart", {"role": "assistant"})]
    block = 0
    if scenario.text:
        for piece in text_pieces(scenario.text):
            frames.append(
                event_frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": piece}})
            )
        frames.append(event_frame("contentBlockStop", {"contentBlockIndex": 0}))
        block = 1
    if scenario.tool_use:
        use = scenario.tool_use
        start = {"toolUse": {"toolUseId": use.id, "name": use.name}}
        frames.append(
            event_frame("contentBlockStart", {"contentBlockIndex": block, "start": start})
        )
        arguments = json.dumps(use.input)
        for i in range(0, len(arguments), 7):
            delta = {"toolUse": {"input": arguments[i : i + 7]}}
            frames.append(
                event_frame("contentBlockDelta", {"contentBlockIndex": block, "delta": delta})
            )
        frames.append(event_frame("contentBlockStop", {"contentBlockIndex": block}))
    frames.append(event_frame("messageStop", {"stopReason": _stop_reason(scenario)}))
    if scenario.send_metadata:
        metadata = {"usage": _usage(scenario), "metrics": {"latencyMs": 42}}
        frames.append(event_frame("metadata", metadata))
    return frames


# -- test helpers ----------------------------------------------------------------------------


def isolate_aws_env(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    """Leave botocore's credential chain nothing from this machine: no AWS_* variables,
    an empty HOME, no shared files, no instance metadata calls."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(home / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.delenv("BOTO_CONFIG", raising=False)
