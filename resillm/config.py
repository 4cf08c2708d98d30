"""The configuration as frozen msgspec Structs (SPEC section 2).

Every section is a ``Struct`` with ``forbid_unknown_fields`` so a typo is an error, not a
silently ignored key. Loading (YAML, ``${VAR}`` expansion, line numbers in errors) lives in
:mod:`resillm.config_loader`; this module only declares shapes and defaults.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from resillm.durations import Duration

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
Probability = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
NonEmptyStr = Annotated[str, msgspec.Meta(min_length=1)]


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class ServerConfig(_Section, frozen=True):
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8080
    workers: PositiveInt = 1
    max_request_bytes: PositiveInt = 4 * 1024 * 1024
    # How long SIGTERM waits for in-flight requests and streams before closing them.
    graceful_timeout: Duration = Duration(30.0)
    # An idle keep-alive connection is closed after this; it also bounds how long a client
    # may take to send a request's headers (slowloris).
    keep_alive_timeout: Duration = Duration(75.0)
    max_header_bytes: PositiveInt = 64 * 1024  # request line + headers; more: 400, closed
    # Longest wait for any bytes from the client; None: no limit. It also cuts a stream
    # whose client sends nothing for this long, so keep it above the longest stream.
    read_timeout: Duration | None = None
    # The whole request body must arrive within this, from the end of the headers: else
    # 408 and the connection closed. A full max_request_bytes body needs ~140 KB/s.
    body_timeout: Duration | None = Duration(30.0)
    # A response write that waits this long for a client that does not read (nginx's
    # send_timeout) ends the request and closes its upstream call. Memory is bounded anyway
    # (backpressure); this frees the upstream connection a stalled client would hold.
    send_timeout: Duration | None = Duration(60.0)


class KeyBudgetConfig(_Section, frozen=True):
    hourly_limit: Annotated[float, msgspec.Meta(ge=0)] | None = None
    daily_limit: Annotated[float, msgspec.Meta(ge=0)] | None = None


class ClientKeyConfig(_Section, frozen=True):
    name: NonEmptyStr
    key: NonEmptyStr
    models: list[str] | None = None
    budget: KeyBudgetConfig | None = None


class AuthConfig(_Section, frozen=True):
    keys: list[ClientKeyConfig] = msgspec.field(default_factory=list)
    admin_key: str | None = None


class _ProviderBase(
    msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True, tag_field="type"
):
    timeout: Duration = Duration(120.0)
    connect_timeout: Duration = Duration(5.0)
    max_connections: PositiveInt = 100
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    prefill: bool | None = None


class OpenAIProviderConfig(_ProviderBase, tag="openai", frozen=True, kw_only=True):
    api_key: str | None = None
    base_url: str = "https://api.openai.com/v1"
    organization: str | None = None


class AzureProviderConfig(_ProviderBase, tag="azure", frozen=True, kw_only=True):
    api_key: str | None = None
    base_url: NonEmptyStr  # https://RESOURCE.openai.azure.com
    api_version: str = "2024-10-21"


class OpenAICompatibleProviderConfig(
    _ProviderBase, tag="openai_compatible", frozen=True, kw_only=True
):
    base_url: NonEmptyStr
    api_key: str | None = None


class AnthropicProviderConfig(_ProviderBase, tag="anthropic", frozen=True, kw_only=True):
    api_key: str | None = None
    base_url: str = "https://api.anthropic.com"
    anthropic_version: str = "2023-06-01"
    anthropic_beta: list[str] = msgspec.field(default_factory=list)
    # Anthropic requires max_tokens; used when the client sent neither max_tokens nor
    # max_completion_tokens.
    default_max_tokens: PositiveInt = 4096


class BedrockProviderConfig(_ProviderBase, tag="bedrock", frozen=True, kw_only=True):
    region: NonEmptyStr
    profile: str | None = None
    base_url: str | None = None  # endpoint override: VPC endpoints, proxies, tests
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None
    api_key: str | None = None  # a Bedrock API key (bearer token) instead of SigV4


class MockProviderConfig(_ProviderBase, tag="mock", frozen=True, kw_only=True):
    latency: Duration = Duration(0.0)
    chunk_delay: Duration = Duration(0.0)
    fail_rate: Probability = 0.0
    fail_status: Annotated[int, msgspec.Meta(ge=400, le=599)] = 503
    seed: int | None = None
    chunks: PositiveInt = 8


ProviderConfig = (
    OpenAIProviderConfig
    | AzureProviderConfig
    | OpenAICompatibleProviderConfig
    | AnthropicProviderConfig
    | BedrockProviderConfig
    | MockProviderConfig
)
PROVIDER_TYPES = ("openai", "azure", "openai_compatible", "anthropic", "bedrock", "mock")


class TargetConfig(_Section, frozen=True):
    provider: NonEmptyStr
    model: NonEmptyStr
    api_key: str | None = None
    base_url: str | None = None
    weight: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    prefill: bool | None = None


class PricingConfig(_Section, frozen=True):
    input_per_mtok: Annotated[float, msgspec.Meta(ge=0)]
    output_per_mtok: Annotated[float, msgspec.Meta(ge=0)]


Strategy = Literal["priority", "round_robin", "weighted", "least_latency", "least_busy", "cost"]


class ModelConfig(_Section, frozen=True):
    targets: Annotated[list[TargetConfig], msgspec.Meta(min_length=1)]
    strategy: Strategy = "priority"
    fallbacks: list[str] = msgspec.field(default_factory=list)
    pricing: PricingConfig | None = None


class RetryConfig(_Section, frozen=True):
    max_attempts: PositiveInt = 3
    initial_backoff: Duration = Duration(0.2)
    max_backoff: Duration = Duration(8.0)
    multiplier: Annotated[float, msgspec.Meta(ge=1.0)] = 2.0
    jitter: Literal["full", "equal", "none"] = "full"


class CircuitBreakerConfig(_Section, frozen=True):
    failure_threshold: PositiveInt = 5
    success_threshold: PositiveInt = 2
    open_timeout: Duration = Duration(30.0)
    half_open_max_requests: PositiveInt = 1


class TimeoutsConfig(_Section, frozen=True):
    request: Duration = Duration(300.0)
    first_token: Duration = Duration(60.0)
    stream_idle: Duration = Duration(30.0)


class ResilienceConfig(_Section, frozen=True):
    retry: RetryConfig = msgspec.field(default_factory=RetryConfig)
    circuit_breaker: CircuitBreakerConfig = msgspec.field(default_factory=CircuitBreakerConfig)
    timeouts: TimeoutsConfig = msgspec.field(default_factory=TimeoutsConfig)
    stream_recovery: bool = True


class EmailAlertConfig(_Section, frozen=True):
    smtp_host: NonEmptyStr
    from_: NonEmptyStr = msgspec.field(name="from")
    to: Annotated[list[NonEmptyStr], msgspec.Meta(min_length=1)]
    smtp_port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 587
    starttls: bool = True
    ssl: bool = False  # implicit TLS (port 465) instead of STARTTLS
    username: str | None = None
    password: str | None = None
    timeout: Duration = Duration(10.0)


class BudgetAlertsConfig(_Section, frozen=True):
    # Fractions of a limit; each fires once per window (and per key for key budgets).
    thresholds: list[Annotated[float, msgspec.Meta(gt=0)]] = msgspec.field(
        default_factory=lambda: [0.8, 1.0]
    )
    webhook_url: str | None = None
    slack_webhook_url: str | None = None
    email: EmailAlertConfig | None = None


class BudgetConfig(_Section, frozen=True):
    hourly_limit: Annotated[float, msgspec.Meta(ge=0)] | None = None  # USD
    daily_limit: Annotated[float, msgspec.Meta(ge=0)] | None = None
    action: Literal["reject", "warn"] = "reject"
    store: Literal["memory", "redis"] = "memory"
    snapshot_path: NonEmptyStr = "resillm-budget.json"
    snapshot_interval: Duration = Duration(10.0)  # > 0, checked by the loader
    redis_url: NonEmptyStr = "redis://127.0.0.1:6379/0"
    redis_timeout: Duration = Duration(0.5)  # > 0, checked by the loader
    redis_failure: Literal["open", "closed"] = "closed"
    # Completion tokens reserved for a request that sets neither max_tokens nor
    # max_completion_tokens.
    default_max_tokens: PositiveInt = 1024
    alerts: BudgetAlertsConfig = msgspec.field(default_factory=BudgetAlertsConfig)


class CacheConfig(_Section, frozen=True):
    enabled: bool = False
    backend: Literal["memory", "redis"] = "memory"
    ttl: Duration = Duration(3600.0)  # > 0, checked by the loader
    max_size: PositiveInt = 1000  # entries, memory backend (LRU)
    max_bytes: PositiveInt = 64 * 1024 * 1024  # memory backend: stored answers, in bytes
    redis_url: NonEmptyStr = "redis://127.0.0.1:6379/0"
    # Longest a Redis call may take before the request goes on without the cache.
    redis_timeout: Duration = Duration(0.25)  # > 0, checked by the loader
    # Identical requests arriving while one is in flight wait for its answer (per process).
    coalesce: bool = True
    coalesce_timeout: Duration = Duration(30.0)  # > 0, checked by the loader


class LoggingConfig(_Section, frozen=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "text"] = "json"
    log_requests: bool = True
    log_responses: bool = False
    sample_rate: Probability = 1.0
    redact_pii: bool = True
    # A success at least this slow is always logged, whatever sample_rate says.
    slow_request_s: Duration = Duration(10.0)


class TracingConfig(_Section, frozen=True):
    enabled: bool = False
    exporter: Literal["otlp", "zipkin", "console"] = "otlp"
    # None: the exporter's local default (otlp http://127.0.0.1:4318, zipkin :9411). A URL
    # without a path gets the standard one (/v1/traces, /api/v2/spans).
    endpoint: str | None = None
    service_name: NonEmptyStr = "resillm"
    sample_rate: Probability = 1.0  # share of new traces kept; a client's sampled flag wins


class AdminConfig(_Section, frozen=True):
    # Finished /v1 requests kept in memory (per worker) for the admin page; 0 keeps none.
    recent_requests: Annotated[int, msgspec.Meta(ge=0, le=100_000)] = 200


class CorsConfig(_Section, frozen=True):
    # Browser origins allowed to call /v1 ("*" for any); empty: no CORS headers at all.
    allow_origins: list[NonEmptyStr] = msgspec.field(default_factory=list)
    allow_headers: list[NonEmptyStr] = msgspec.field(
        default_factory=lambda: ["authorization", "content-type", "x-api-key", "traceparent"]
    )
    expose_headers: list[NonEmptyStr] = msgspec.field(default_factory=list)
    max_age: Annotated[int, msgspec.Meta(ge=0)] = 600  # seconds a preflight answer is cached


class Config(_Section, frozen=True):
    """The whole configuration."""

    providers: dict[str, ProviderConfig]
    models: dict[str, ModelConfig]
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    resilience: ResilienceConfig = msgspec.field(default_factory=ResilienceConfig)
    budget: BudgetConfig = msgspec.field(default_factory=BudgetConfig)
    cache: CacheConfig = msgspec.field(default_factory=CacheConfig)
    logging: LoggingConfig = msgspec.field(default_factory=LoggingConfig)
    tracing: TracingConfig = msgspec.field(default_factory=TracingConfig)
    admin: AdminConfig = msgspec.field(default_factory=AdminConfig)
    cors: CorsConfig = msgspec.field(default_factory=CorsConfig)
