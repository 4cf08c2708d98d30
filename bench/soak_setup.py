"""The fault soak's world: two mock upstreams, the gateway config, the aliases and their faults.

Two client keys split the traffic so the budget can be checked exactly (see `soak.py`):

- `metered` calls the `m-*` aliases. Every fault behind them either makes the upstream report
  its full usage (success, a malformed event skipped, a stream ending without `[DONE]` or
  without a finish reason but with its usage chunk) or report nothing at all before the
  gateway gives up (error statuses, hangs, resets, cuts and stalls before the first token,
  an unparseable JSON body). Its clients never leave early. So no upstream call behind it is
  ever priced by the gateway's estimate, and its spend must equal, to the nano-dollar, what
  the mock upstreams reported for the `m-*` models at the one price every alias has.
- `loose` calls the `l-*` aliases: streams cut, stalled or ended by an error event after
  content was sent, Anthropic streams without their `message_delta`, slow answers that its
  clients abandon mid-stream or time out on. There the gateway bills estimates (four
  characters a token for what was received), which no upstream reported, so its spend is
  checked against the access log's `cost` of each of its requests instead.

Every target model names exactly one fault (or none), and is used by one key's aliases
only, so the mock's per-model counters tell both the per-fault request counts and the usage
reported per key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# USD per million tokens: whole nano-dollars per token, so per-request rounding is exact.
PRICE_IN, PRICE_OUT = 1.0, 3.0
METERED_KEY, LOOSE_KEY = "sk-soak-metered-0001", "sk-soak-loose-0002"
ADMIN_KEY = "soak-admin-key-0003"
KEYS = {"metered": METERED_KEY, "loose": LOOSE_KEY}
CHUNKS = 8  # the mock's default answer length, in content chunks (words)
LONG_CHUNKS = 24  # the m-long alias's answers
LIMIT_USD = 1_000_000.0  # limits that never reject: every request is still reserved, settled


@dataclass(frozen=True)
class Scenario:
    """One alias as the driver sees it: who calls it, how often, and how."""

    alias: str
    key: str  # "metered" or "loose"
    weight: float
    # Its streams may be finished by stream recovery. Its requests set no max_tokens: a
    # continuation asks for max_tokens more tokens after the text already sent, so a
    # recovered answer can run past the client's limit (a known gap, not what is soaked).
    recovers: bool = False
    tools: bool = False  # some requests carry a tool and ask about the weather
    chunks: int = CHUNKS  # the length of its answers
    # The only results its clients may see ("" for any clean one): an m-* alias always
    # has a target left that answers, so anything but its answer is a gateway bug.
    expect: str = ""


SCENARIOS = (
    Scenario("m-flaky", "metered", 5, expect="ok"),
    Scenario("m-steady", "metered", 2, tools=True, expect="ok"),
    Scenario("m-chain", "metered", 3, expect="ok"),
    Scenario("m-balance", "metered", 3, expect="ok"),
    Scenario("m-weighted", "metered", 2, expect="ok"),
    Scenario("m-busy", "metered", 2, recovers=True, expect="ok"),
    Scenario("m-context", "metered", 1, expect="ok"),
    Scenario("m-policy", "metered", 0.5, expect="error 400 content_policy_violation"),
    Scenario("m-long", "metered", 1, chunks=LONG_CHUNKS, expect="ok"),
    Scenario("l-cut", "loose", 2, recovers=True, tools=True),
    Scenario("l-stall", "loose", 1, recovers=True),
    Scenario("l-error", "loose", 2, recovers=True),
    Scenario("l-restart", "loose", 2, recovers=True),
    Scenario("l-claude", "loose", 2, recovers=True),
    Scenario("l-slow", "loose", 3),
)

# (provider, model, the fault it plays) for each alias, in chain order.
_FAULTY = "faults"  # the mock upstream serving faults by model name and header
TARGETS: dict[str, list[tuple[str, str, str]]] = {
    "m-flaky": [
        ("flaky", "m-flaky-a", "random 502 (--fail-rate)"),
        ("flaky", "m-flaky-b", "random 502 (--fail-rate)"),
        ("warming", "m-warming", "x-mock-fail-first: 4 with a fail-code"),
    ],
    "m-steady": [(_FAULTY, "m-steady", "none")],
    "m-chain": [
        (_FAULTY, "mock-fault:hang", "hang"),
        (_FAULTY, "mock-fault:reset", "reset"),
        (_FAULTY, "mock-fault:503", "fail-status 503"),
        (_FAULTY, "mock-fault:cut-0", "cut before the first token"),
        (_FAULTY, "mock-fault:stall-0", "stall before the first token"),
        ("limited", "mock-fault:429", "429 with Retry-After 30s (> max_backoff)"),
        (_FAULTY, "mock-fault:malformed-3", "malformed (JSON body unreadable, event skipped)"),
        ("down", "m-down", "x-mock-down-for: 6"),
    ],
    "m-balance": [
        (_FAULTY, "mock-fault:slow-first-byte", "slow-first-byte (latency 1s)"),
        (_FAULTY, "mock-fault:omit-done", "omit-done"),
        ("claude", "m-claude", "none (Anthropic)"),
        ("azure", "m-azure", "none (Azure)"),
    ],
    "m-weighted": [
        (_FAULTY, "mock-fault:fail-first-3,malformed-1", "fail-first-3, malformed-1"),
        ("claude", "mock-fault:malformed-2", "malformed (Anthropic)"),
        ("azure", "mock-fault:529", "fail-status 529 (Azure)"),
        ("jittery", "m-jittery", "x-mock-latency 0.05, x-mock-chunk-delay 0.01"),
    ],
    "m-busy": [
        (_FAULTY, "mock-fault:no-finish", "no-finish (usage chunk sent)"),
        (_FAULTY, "mock-fault:down-2s", "down-2s"),
        (_FAULTY, "m-busy-ok", "none"),
    ],
    "m-context": [
        (_FAULTY, "mock-fault:context-length", "context-length"),
        (_FAULTY, "m-context-ok", "none"),
    ],
    "m-policy": [(_FAULTY, "mock-fault:content-policy", "content-policy")],
    "m-long": [("long", "m-long", "x-mock-chunks: 24, x-mock-chunk-delay 0.005")],
    "l-cut": [
        (_FAULTY, "mock-fault:cut-3", "cut after 3 chunks"),
        (_FAULTY, "l-steady", "none"),
    ],
    "l-stall": [
        (_FAULTY, "mock-fault:stall-2", "stall after 2 chunks"),
        ("claude", "l-claude-ok", "none (Anthropic)"),
    ],
    "l-error": [
        (_FAULTY, "mock-fault:error-event-4", "error event after 4 chunks"),
        ("flaky", "l-flaky", "random 502 (--fail-rate), no prefill"),
    ],
    "l-restart": [
        ("picky", "l-picky", "x-mock-fault: cut-2,reject-prefill"),
        ("flaky", "l-flaky-2", "random 502 (--fail-rate), no prefill"),
    ],
    "l-claude": [
        ("claude", "mock-fault:no-finish,malformed-8", "no-finish, malformed (Anthropic)"),
        ("claude", "mock-fault:cut-4", "cut after 4 chunks (Anthropic)"),
        ("claude", "mock-fault:error-event-2", "error event after 2 chunks (Anthropic)"),
        ("claude", "l-claude-end", "none (Anthropic)"),
    ],
    "l-slow": [("slow", "l-slow", "x-mock-latency 0.2, x-mock-chunk-delay 0.12")],
}
STRATEGIES = {
    "m-flaky": "round_robin",
    "m-balance": "least_latency",
    "m-weighted": "weighted",
    "m-busy": "least_busy",
}
FALLBACKS = {"m-flaky": ["m-steady"], "m-chain": ["m-steady"], "l-claude": ["l-cut"]}


def _model_table() -> dict[tuple[str, str], tuple[str, str]]:
    table: dict[tuple[str, str], tuple[str, str]] = {}
    for alias, targets in TARGETS.items():
        key = "metered" if alias.startswith("m-") else "loose"
        for provider, model, fault in targets:
            mock = "flaky" if provider == "flaky" else "faults"
            if (mock, model) in table:
                raise ValueError(f"model {model!r} is used twice on the {mock} mock")
            table[mock, model] = (fault, key)
    return table


# (mock, model) -> (the fault it plays, the key whose aliases call it)
MODELS = _model_table()


def _providers(faults_url: str, flaky_url: str) -> dict[str, Any]:
    def compatible(url: str, **extra: Any) -> dict[str, Any]:
        return {
            "type": "openai_compatible",
            "base_url": url + "/v1",
            "timeout": "4s",
            "connect_timeout": "1s",
            **extra,
        }

    return {
        "faults": compatible(faults_url, prefill=True),
        "flaky": compatible(flaky_url),
        "warming": compatible(
            faults_url, headers={"x-mock-fail-first": "4", "x-mock-fail-code": "server_busy"}
        ),
        "limited": compatible(faults_url, headers={"x-mock-retry-after": "30"}),
        "down": compatible(faults_url, headers={"x-mock-down-for": "6"}),
        "jittery": compatible(
            faults_url, headers={"x-mock-latency": "0.05", "x-mock-chunk-delay": "0.01"}
        ),
        "picky": compatible(
            faults_url, prefill=True, headers={"x-mock-fault": "cut-2,reject-prefill"}
        ),
        "long": compatible(
            faults_url, headers={"x-mock-chunks": str(LONG_CHUNKS), "x-mock-chunk-delay": "0.005"}
        ),
        "slow": compatible(
            faults_url, headers={"x-mock-latency": "0.2", "x-mock-chunk-delay": "0.12"}
        ),
        "claude": {
            "type": "anthropic",
            "base_url": faults_url,
            "api_key": "sk-ant-soak-upstream-0004",
            "timeout": "4s",
            "connect_timeout": "1s",
        },
        "azure": {
            "type": "azure",
            "base_url": faults_url,
            "api_key": "soak-azure-upstream-0005",
            "timeout": "4s",
            "connect_timeout": "1s",
        },
    }


def gateway_config(*, port: int, faults_url: str, flaky_url: str, workdir: Path) -> dict[str, Any]:
    """The gateway's config, every alias priced alike, short timeouts throughout."""
    pricing = {"input_per_mtok": PRICE_IN, "output_per_mtok": PRICE_OUT}
    models: dict[str, Any] = {}
    for alias, targets in TARGETS.items():
        models[alias] = {
            "targets": [{"provider": provider, "model": model} for provider, model, _ in targets],
            "strategy": STRATEGIES.get(alias, "priority"),
            "fallbacks": FALLBACKS.get(alias, []),
            "pricing": pricing,
        }
    budget = {"hourly_limit": LIMIT_USD, "daily_limit": LIMIT_USD}
    keys = [
        {"name": name, "key": key, "budget": budget, "models": _aliases_of(name)}
        for name, key in KEYS.items()
    ]
    return {
        "server": {"host": "127.0.0.1", "port": port, "graceful_timeout": "5s"},
        "auth": {"keys": keys, "admin_key": ADMIN_KEY},
        "providers": _providers(faults_url, flaky_url),
        "models": models,
        "resilience": {
            "retry": {
                "max_attempts": 2,
                "initial_backoff": "10ms",
                "max_backoff": "200ms",
                "jitter": "full",
            },
            "circuit_breaker": {
                "failure_threshold": 3,
                "success_threshold": 1,
                "open_timeout": "2s",
                "half_open_max_requests": 1,
            },
            # Far from every latency the mock plays (1 s at most): an upstream never gets
            # to answer just as the gateway gives up on it.
            "timeouts": {"request": "12s", "first_token": "3s", "stream_idle": "1s"},
            "stream_recovery": True,
        },
        "budget": {
            **budget,
            "store": "memory",
            "snapshot_path": str(workdir / "budget.json"),
            "snapshot_interval": "2s",
        },
        # A few prompts come back again and again: cache hits and coalesced requests (cost
        # 0, no upstream call) among the misses; the store stays small and bounded.
        "cache": {"enabled": True, "backend": "memory", "ttl": "20s", "max_size": 300},
        "logging": {"level": "info", "format": "json", "log_requests": True},
        "admin": {"recent_requests": 50},
    }


def _aliases_of(key: str) -> list[str]:
    prefix = "m-" if key == "metered" else "l-"
    # l-claude falls back to l-cut, m-flaky and m-chain to m-steady: all within one key.
    return [alias for alias in TARGETS if alias.startswith(prefix)]


def write_config(path: Path, config: dict[str, Any]) -> None:
    """JSON is YAML: the gateway reads it as any config file."""
    path.write_text(json.dumps(config, indent=1) + "\n")


def mock_args(port: int, *, flaky: bool) -> list[str]:
    """`resillm mock-upstream` arguments: the flaky one fails a share of requests at random."""
    args = ["-m", "resillm.cli", "mock-upstream", "--port", str(port)]
    if flaky:
        args += ["--fail-rate", "0.3", "--fail-status", "502", "--seed", "15"]
    return args
