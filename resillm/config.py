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


class LoggingConfig(_Section, frozen=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "text"] = "json"
    log_requests: bool = True
    log_responses: bool = False
    sample_rate: Probability = 1.0
    redact_pii: bool = True


class Config(_Section, frozen=True):
    """The whole configuration."""

    providers: dict[str, ProviderConfig]
    models: dict[str, ModelConfig]
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    resilience: ResilienceConfig = msgspec.field(default_factory=ResilienceConfig)
    logging: LoggingConfig = msgspec.field(default_factory=LoggingConfig)
