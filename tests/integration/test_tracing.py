"""OpenTelemetry traces through the real gateway (SPEC section 7).

Spans are captured with the SDK's ``InMemorySpanExporter`` handed to the gateway in place of
the configured exporter; they are read after the gateway stopped, which flushes them. One
test sends them over OTLP/HTTP to a fake collector on loopback instead.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from middleware.tracing import Tracing, build_exporter, signal_url
from resillm.app import Gateway
from resillm.cli import main as cli_main
from resillm.config import TracingConfig
from resillm.config_loader import ConfigError, config_from_dict
from resillm.mock_upstream import MockUpstream
from tests.conftest import serve_asgi

pytestmark = pytest.mark.anyio

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"
HELLO = [{"role": "user", "content": "Say something traced."}]


def provider(mock: MockUpstream, **faults: str) -> dict[str, Any]:
    headers = {f"x-mock-{name.replace('_', '-')}": value for name, value in faults.items()}
    return {"type": "openai_compatible", "base_url": mock.url + "/v1", "headers": headers}


def traced_config(
    mock: MockUpstream,
    *,
    bad: dict[str, str] | None = None,
    tracing: dict[str, Any] | None = None,
    circuit_breaker: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Alias ``chat``: target ``bad/bad-model`` (with ``bad`` faults) then ``good/good-model``;
    without ``bad``, only ``good``."""
    providers = {"good": provider(mock)}
    targets = [{"provider": "good", "model": "good-model"}]
    if bad is not None:
        providers["bad"] = provider(mock, **bad)
        targets.insert(0, {"provider": "bad", "model": "bad-model"})
    return {
        "providers": providers,
        "models": {"chat": {"targets": targets}},
        "resilience": {
            "retry": {"max_attempts": 2, "initial_backoff": "1ms", "max_backoff": "5ms"},
            "circuit_breaker": circuit_breaker or {},
        },
        "logging": {"level": "error"},
        "tracing": {"enabled": True, **(tracing or {})},
    }


@asynccontextmanager
async def traced_gateway(
    config: dict[str, Any], exporter: InMemorySpanExporter | None = None
) -> AsyncIterator[str]:
    """The gateway under hypercorn; stopping it flushes its spans to ``exporter``."""
    gateway = Gateway(config_from_dict(config), span_exporter=exporter)
    async with serve_asgi(gateway, config) as url:
        yield url
    assert gateway.tracing is None  # shut down with the gateway


async def chat(
    url: str, *, stream: bool = False, headers: dict[str, str] | None = None, **extra: Any
) -> tuple[int, bytes]:
    body = {"model": "chat", "messages": HELLO, "stream": stream, **extra}
    async with (
        aiohttp.ClientSession() as session,
        session.post(url + "/v1/chat/completions", json=body, headers=headers or {}) as response,
    ):
        return response.status, await response.read()


def by_kind(spans: Sequence[ReadableSpan], kind: SpanKind) -> list[ReadableSpan]:
    return sorted((s for s in spans if s.kind is kind), key=lambda s: s.start_time or 0)


def hex_id(value: int, width: int) -> str:
    return format(value, f"0{width}x")


def events(span: ReadableSpan, name: str) -> list[dict[str, Any]]:
    return [dict(e.attributes or {}) for e in span.events if e.name == name]


async def test_span_tree_continues_the_clients_trace_through_retry_and_fallback(
    upstream: MockUpstream,
) -> None:
    exporter = InMemorySpanExporter()
    config = traced_config(upstream, bad={"fail_status": "503"})
    async with traced_gateway(config, exporter) as url:
        status, _ = await chat(url, headers={"traceparent": TRACEPARENT})
    assert status == 200
    spans = exporter.get_finished_spans()
    (server,) = by_kind(spans, SpanKind.SERVER)
    clients = by_kind(spans, SpanKind.CLIENT)
    assert len(spans) == 4

    # The SERVER span is the client's span's child, in the client's trace.
    assert server.name == "POST /v1/chat/completions"
    assert hex_id(server.context.trace_id, 32) == TRACE_ID
    assert server.parent is not None and hex_id(server.parent.span_id, 16) == PARENT_SPAN_ID
    assert server.parent.is_remote
    attributes = dict(server.attributes or {})
    assert attributes["http.request.method"] == "POST"
    assert attributes["http.route"] == "/v1/chat/completions"
    assert attributes["http.response.status_code"] == 200
    assert attributes["gen_ai.request.model"] == "chat"
    assert attributes["gen_ai.response.model"] == "good-model"
    assert attributes["resillm.attempts"] == 3
    assert attributes["resillm.retries"] == 1
    assert attributes["resillm.fallbacks"] == 1
    assert attributes["resillm.request_id"]
    assert server.status.status_code is StatusCode.UNSET

    # One CLIENT span per attempt, each the SERVER span's child.
    assert [c.name for c in clients] == ["chat bad-model", "chat bad-model", "chat good-model"]
    for client in clients:
        assert client.parent is not None and client.parent.span_id == server.context.span_id
        assert client.context.trace_id == server.context.trace_id
    first, second, third = (dict(c.attributes or {}) for c in clients)
    assert first["resillm.attempt"] == 1 and second["resillm.attempt"] == 2
    assert first["resillm.retries"] == 0 and second["resillm.retries"] == 1
    assert first["resillm.fallback"] is False and third["resillm.fallback"] is True
    assert first["resillm.target"] == "bad/bad-model"
    assert first["gen_ai.system"] == "openai_compatible"
    assert first["gen_ai.request.model"] == "chat"
    assert first["http.response.status_code"] == 503
    assert first["error.type"] == "503"
    assert clients[0].status.status_code is StatusCode.ERROR
    assert any(e.name == "exception" for e in clients[0].events)
    assert third == {
        **third,
        "resillm.attempt": 3,
        "resillm.retries": 0,
        "resillm.target": "good/good-model",
        "gen_ai.response.model": "good-model",
        "gen_ai.usage.input_tokens": third["gen_ai.usage.input_tokens"],
        "gen_ai.usage.output_tokens": 8,
    }
    assert third["gen_ai.usage.input_tokens"] > 0
    assert clients[2].status.status_code is not StatusCode.ERROR

    # Retries and fallbacks are events of the request.
    (retry,) = events(server, "resillm.retry")
    assert retry["resillm.target"] == "bad/bad-model"
    assert retry["resillm.retries"] == 1
    assert retry["error.type"] == "503"
    assert events(server, "resillm.fallback") == [
        {"resillm.from_target": "bad/bad-model", "resillm.to_target": "good/good-model"}
    ]

    # The upstream got the trace, as the child of the attempt that reached it.
    traceparent = upstream.stats.last_headers["traceparent"]
    version, trace_id, span_id, flags = traceparent.split("-")
    assert (version, trace_id, flags) == ("00", TRACE_ID, "01")
    assert span_id == hex_id(clients[2].context.span_id, 16)


async def test_new_trace_when_the_client_sends_none(upstream: MockUpstream) -> None:
    exporter = InMemorySpanExporter()
    async with traced_gateway(traced_config(upstream), exporter) as url:
        status, _ = await chat(url)
    assert status == 200
    (server,) = by_kind(exporter.get_finished_spans(), SpanKind.SERVER)
    assert len(by_kind(exporter.get_finished_spans(), SpanKind.CLIENT)) == 1
    assert server.parent is None
    trace_id = upstream.stats.last_headers["traceparent"].split("-")[1]
    assert trace_id == hex_id(server.context.trace_id, 32)
    assert trace_id != TRACE_ID


async def test_stream_client_span_lasts_to_the_end_with_its_usage(upstream: MockUpstream) -> None:
    exporter = InMemorySpanExporter()
    async with traced_gateway(traced_config(upstream), exporter) as url:
        status, body = await chat(
            url, stream=True, headers={"traceparent": TRACEPARENT}, stream_options={}
        )
    assert status == 200 and body.rstrip().endswith(b"data: [DONE]")
    spans = exporter.get_finished_spans()
    (server,) = by_kind(spans, SpanKind.SERVER)
    (client,) = by_kind(spans, SpanKind.CLIENT)
    attributes = dict(client.attributes or {})
    assert attributes["gen_ai.response.model"] == "good-model"
    assert attributes["gen_ai.usage.output_tokens"] == 8
    assert attributes["gen_ai.usage.input_tokens"] > 0
    assert client.status.status_code is not StatusCode.ERROR
    assert (client.end_time or 0) <= (server.end_time or 0)
    assert dict(server.attributes or {})["resillm.stream"] is True
    assert upstream.stats.last_headers["traceparent"].split("-")[1] == TRACE_ID


async def test_open_circuit_is_an_event_and_its_target_gets_no_span(
    upstream: MockUpstream,
) -> None:
    exporter = InMemorySpanExporter()
    config = traced_config(
        upstream,
        bad={"fail_status": "503"},
        circuit_breaker={"failure_threshold": 1, "open_timeout": "60s"},
    )
    config["models"]["chat"]["targets"] = [{"provider": "bad", "model": "bad-model"}]
    async with traced_gateway(config, exporter) as url:
        assert (await chat(url))[0] == 502  # opens the circuit
        assert (await chat(url))[0] == 503  # rejected without a network call
    server = by_kind(exporter.get_finished_spans(), SpanKind.SERVER)[-1]
    trace_id = server.context.trace_id
    spans = [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]
    assert spans == [server]  # no CLIENT span: nothing was sent
    (rejected,) = events(server, "resillm.circuit_open")
    assert rejected["resillm.target"] == "bad/bad-model"
    assert rejected["resillm.retry_in_s"] > 0
    assert dict(server.attributes or {})["http.response.status_code"] == 503
    assert server.status.status_code is StatusCode.ERROR


async def test_stream_cut_mid_way_ends_its_span_in_error_and_recovery_gets_one(
    upstream: MockUpstream,
) -> None:
    exporter = InMemorySpanExporter()
    config = traced_config(upstream, bad={"cut_after": "3"})
    config["providers"]["good"]["prefill"] = True  # the continuation goes there
    async with traced_gateway(config, exporter) as url:
        status, body = await chat(url, stream=True)
    assert status == 200 and body.rstrip().endswith(b"data: [DONE]")
    spans = exporter.get_finished_spans()
    (server,) = by_kind(spans, SpanKind.SERVER)
    cut, continued = by_kind(spans, SpanKind.CLIENT)
    assert dict(cut.attributes or {})["resillm.target"] == "bad/bad-model"
    assert cut.status.status_code is StatusCode.ERROR
    assert dict(continued.attributes or {})["resillm.target"] == "good/good-model"
    assert continued.status.status_code is not StatusCode.ERROR
    (interrupted,) = events(server, "resillm.stream_interrupted")
    assert interrupted["error.type"] in {"connection_error", "protocol_error"}
    assert dict(server.attributes or {})["resillm.recoveries"] == ("continued",)


async def test_every_target_failing_marks_the_server_span_as_an_error(
    upstream: MockUpstream,
) -> None:
    exporter = InMemorySpanExporter()
    config = traced_config(upstream, bad={"fail_status": "500"})
    config["models"]["chat"]["targets"] = [{"provider": "bad", "model": "bad-model"}]
    async with traced_gateway(config, exporter) as url:
        status, _ = await chat(url)
    assert status == 502
    spans = exporter.get_finished_spans()
    (server,) = by_kind(spans, SpanKind.SERVER)
    assert len(by_kind(spans, SpanKind.CLIENT)) == 2
    assert server.status.status_code is StatusCode.ERROR
    assert dict(server.attributes or {})["http.response.status_code"] == 502
    assert dict(server.attributes or {})["error.type"] == "502"


async def test_client_error_is_recorded_but_the_request_span_is_not_an_error(
    upstream: MockUpstream,
) -> None:
    exporter = InMemorySpanExporter()
    config = traced_config(upstream, bad={"fault": "content-policy"})
    async with traced_gateway(config, exporter) as url:
        status, _ = await chat(url)
    assert status == 400
    spans = exporter.get_finished_spans()
    (server,) = by_kind(spans, SpanKind.SERVER)
    (client,) = by_kind(spans, SpanKind.CLIENT)  # a plain 400: no retry, no fallback
    assert dict(client.attributes or {})["http.response.status_code"] == 400
    assert client.status.status_code is StatusCode.ERROR
    assert server.status.status_code is StatusCode.UNSET
    assert dict(server.attributes or {})["http.response.status_code"] == 400


async def test_rejected_request_still_gets_a_server_span(upstream: MockUpstream) -> None:
    exporter = InMemorySpanExporter()
    async with (
        traced_gateway(traced_config(upstream), exporter) as url,
        aiohttp.ClientSession() as session,
        session.post(url + "/v1/chat/completions", data=b"{not json") as response,
    ):
        assert response.status == 400
    (server,) = exporter.get_finished_spans()
    assert server.kind is SpanKind.SERVER
    assert dict(server.attributes or {})["http.response.status_code"] == 400


async def test_two_gateways_keep_their_spans_apart(upstream: MockUpstream) -> None:
    first, second = InMemorySpanExporter(), InMemorySpanExporter()
    async with (
        traced_gateway(traced_config(upstream, tracing={"service_name": "one"}), first) as a,
        traced_gateway(traced_config(upstream, tracing={"service_name": "two"}), second) as b,
    ):
        await chat(a)
        await chat(b)
        await chat(b)
    assert len(first.get_finished_spans()) == 2
    assert len(second.get_finished_spans()) == 4
    assert {s.resource.attributes["service.name"] for s in first.get_finished_spans()} == {"one"}
    assert {s.resource.attributes["service.name"] for s in second.get_finished_spans()} == {"two"}


async def test_no_trace_header_goes_upstream_when_tracing_is_off(upstream: MockUpstream) -> None:
    config = traced_config(upstream, tracing={"enabled": False})
    gateway = Gateway(config_from_dict(config))
    async with serve_asgi(gateway, config) as url:
        status, _ = await chat(url, headers={"traceparent": TRACEPARENT})
        assert gateway.tracing is None
    assert status == 200
    assert "traceparent" not in upstream.stats.last_headers


# --- OTLP over HTTP to a fake collector -----------------------------------------------------


@asynccontextmanager
async def fake_collector() -> AsyncIterator[tuple[str, list[tuple[str, bytes]]]]:
    """An OTLP/HTTP receiver on loopback; yields its URL and the (content type, body) of
    every POST to /v1/traces."""
    received: list[tuple[str, bytes]] = []

    async def traces(request: web.Request) -> web.Response:
        received.append((request.content_type, await request.read()))
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", received
    finally:
        await runner.cleanup()


async def test_otlp_export_reaches_a_collector(upstream: MockUpstream) -> None:
    async with fake_collector() as (endpoint, received):
        config = traced_config(
            upstream, tracing={"exporter": "otlp", "endpoint": endpoint, "service_name": "gw"}
        )
        async with traced_gateway(config) as url:
            assert (await chat(url, headers={"traceparent": TRACEPARENT}))[0] == 200
    assert received, "no export reached the collector"
    assert {content_type for content_type, _ in received} == {"application/x-protobuf"}
    names: list[str] = []
    services: set[str] = set()
    for _, body in received:
        export = ExportTraceServiceRequest.FromString(body)
        for resource_spans in export.resource_spans:
            for attribute in resource_spans.resource.attributes:
                if attribute.key == "service.name":
                    services.add(attribute.value.string_value)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    names.append(span.name)
                    assert span.trace_id.hex() == TRACE_ID
    assert sorted(names) == ["POST /v1/chat/completions", "chat good-model"]
    assert services == {"gw"}


# --- configuration and exporters ------------------------------------------------------------


def test_signal_paths_are_added_to_bare_endpoints() -> None:
    assert signal_url("http://127.0.0.1:4318", "/v1/traces") == "http://127.0.0.1:4318/v1/traces"
    assert signal_url("http://c:4318/", "/v1/traces") == "http://c:4318/v1/traces"
    assert signal_url("http://c/custom/path", "/v1/traces") == "http://c/custom/path"


@pytest.mark.parametrize(
    ("exporter", "class_name", "url"),
    [
        ("otlp", "OTLPSpanExporter", None),
        ("zipkin", "ZipkinExporter", "http://127.0.0.1:9411/api/v2/spans"),
        ("console", "ConsoleSpanExporter", None),
    ],
)
def test_each_exporter_is_built(exporter: str, class_name: str, url: str | None) -> None:
    built = build_exporter(TracingConfig(enabled=True, exporter=exporter))  # type: ignore[arg-type]
    try:
        assert type(built).__name__ == class_name
        if url is not None:
            assert getattr(built, "endpoint", None) == url
    finally:
        built.shutdown()


async def test_tracing_provider_shuts_down_cleanly() -> None:
    tracing = Tracing(TracingConfig(enabled=True), InMemorySpanExporter())
    tracing.tracer.start_span("x").end()
    assert tracing.force_flush()
    await tracing.shutdown()


def minimal(tracing: dict[str, Any]) -> dict[str, Any]:
    return {
        "providers": {"m": {"type": "mock"}},
        "models": {"x": {"targets": [{"provider": "m", "model": "m"}]}},
        "tracing": tracing,
    }


def test_tracing_config_defaults() -> None:
    config = config_from_dict(minimal({}))
    assert config.tracing == TracingConfig(
        enabled=False, exporter="otlp", endpoint=None, service_name="resillm", sample_rate=1.0
    )


def test_unknown_tracing_key_is_an_error() -> None:
    with pytest.raises(ConfigError, match="unknown key 'exporterr'"):
        config_from_dict(minimal({"exporterr": "otlp"}))


def test_tracing_endpoint_must_be_a_url() -> None:
    with pytest.raises(ConfigError, match=r"tracing\.endpoint: expected an http"):
        config_from_dict(minimal({"enabled": True, "endpoint": "127.0.0.1:4318"}))


def test_tracing_without_the_extra_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
    with pytest.raises(ConfigError) as caught:
        config_from_dict(minimal({"enabled": True}))
    (issue,) = caught.value.issues
    assert issue.path == "tracing.enabled"
    assert "pip install 'resillm[otel]'" in issue.message
    # Off, the missing extra does not matter.
    config_from_dict(minimal({"enabled": False}))


def test_check_command_says_how_to_install_the_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "resillm.yaml"
    path.write_text(
        "providers:\n  m: {type: mock}\nmodels:\n  x:\n    targets: [{provider: m, model: m}]\n"
        "tracing:\n  enabled: true\n"
    )
    assert cli_main(["check", "-c", str(path)]) == 0
    assert "tracing: otlp" in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)
    assert cli_main(["check", "-c", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}:7:3: tracing.enabled:" in err
    assert "pip install 'resillm[otel]'" in err
