"""Config loading (SPEC section 2): defaults, ``${VAR}`` expansion, every error located."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from resillm.cli import main
from resillm.config import (
    Config,
    MockProviderConfig,
    OpenAICompatibleProviderConfig,
    OpenAIProviderConfig,
)
from resillm.config_loader import ConfigError, ConfigIssue, config_from_dict, load_config
from resillm.durations import Duration, parse_duration

MINIMAL = """\
providers:
  m: {type: mock}
models:
  chat:
    targets:
      - {provider: m, model: mock-1}
"""


def write(tmp_path: Path, text: str, name: str = "resillm.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def issues_of(path: Path) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.issues, "a ConfigError must carry at least one issue"
    return info.value.issues


def only_issue(path: Path) -> ConfigIssue:
    issues = issues_of(path)
    assert len(issues) == 1, issues
    return issues[0]


def issue_at(issues: list[ConfigIssue], key_path: str) -> ConfigIssue:
    found = [issue for issue in issues if issue.path == key_path]
    assert found, f"no issue for {key_path!r} in {issues}"
    return found[0]


def minimal_dict(**sections: Any) -> dict[str, Any]:
    return {
        "providers": {"m": {"type": "mock"}},
        "models": {"chat": {"targets": [{"provider": "m", "model": "mock-1"}]}},
        **sections,
    }


# -- valid configs and defaults ------------------------------------------------------------


def test_minimal_config_gets_every_documented_default(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))

    assert config.server.host == "127.0.0.1"
    assert config.server.port == 8080
    assert config.server.workers == 1
    assert config.server.max_request_bytes == 4194304
    assert config.auth.keys == []
    assert config.auth.admin_key is None
    retry = config.resilience.retry
    assert (retry.max_attempts, retry.initial_backoff, retry.max_backoff) == (3, 0.2, 8.0)
    assert (retry.multiplier, retry.jitter) == (2.0, "full")
    breaker = config.resilience.circuit_breaker
    assert (breaker.failure_threshold, breaker.success_threshold) == (5, 2)
    assert (breaker.open_timeout, breaker.half_open_max_requests) == (30.0, 1)
    timeouts = config.resilience.timeouts
    assert (timeouts.request, timeouts.first_token, timeouts.stream_idle) == (300.0, 60.0, 30.0)
    assert config.resilience.stream_recovery is True
    logging = config.logging
    assert (logging.level, logging.format, logging.sample_rate) == ("info", "json", 1.0)
    assert (logging.log_requests, logging.log_responses, logging.redact_pii) == (True, False, True)
    model = config.models["chat"]
    assert model.strategy == "priority"
    assert model.fallbacks == []
    assert model.targets[0].weight == 1.0


def test_provider_defaults_per_attempt_timeouts_and_pool(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            """\
            providers:
              openai: {type: openai, api_key: sk-test}
            models:
              gpt: {targets: [{provider: openai, model: gpt-4o}]}
            """,
        )
    )
    provider = config.providers["openai"]
    assert isinstance(provider, OpenAIProviderConfig)
    assert provider.base_url == "https://api.openai.com/v1"
    assert (provider.timeout, provider.connect_timeout) == (120.0, 5.0)
    assert provider.max_connections == 100
    assert provider.headers == {}


def test_full_config_values_are_read(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            """\
            server:
              host: 0.0.0.0
              port: 9000
              workers: 4
              max_request_bytes: 1024
            auth:
              keys:
                - name: team-a
                  key: key-a
                  models: [gpt]
                  budget: {hourly_limit: 1.0, daily_limit: 5.0}
              admin_key: admin-secret
            providers:
              openai: {type: openai, api_key: sk-test, timeout: 10s}
              local: {type: openai_compatible, base_url: "http://127.0.0.1:8000/v1", prefill: true}
              flaky: {type: mock, fail_rate: 0.5, latency: 50ms}
            models:
              gpt:
                strategy: weighted
                targets:
                  - {provider: openai, model: gpt-4o, weight: 2}
                  - {provider: local, model: llama}
                fallbacks: [cheap]
                pricing: {input_per_mtok: 2.5, output_per_mtok: 10.0}
              cheap:
                targets: [{provider: flaky, model: mock-1}]
            resilience:
              retry: {max_attempts: 5, initial_backoff: 100ms, jitter: none}
              timeouts: {request: 1m, first_token: 5s, stream_idle: 2.5}
              stream_recovery: false
            logging: {level: debug, format: text, sample_rate: 0.25}
            """,
        )
    )
    assert (config.server.host, config.server.port, config.server.workers) == ("0.0.0.0", 9000, 4)
    assert config.server.max_request_bytes == 1024
    key = config.auth.keys[0]
    assert (key.name, key.key, key.models) == ("team-a", "key-a", ["gpt"])
    assert key.budget is not None and key.budget.daily_limit == 5.0
    assert config.auth.admin_key == "admin-secret"
    assert config.providers["openai"].timeout == 10.0
    local = config.providers["local"]
    assert isinstance(local, OpenAICompatibleProviderConfig) and local.prefill is True
    flaky = config.providers["flaky"]
    assert isinstance(flaky, MockProviderConfig)
    assert (flaky.fail_rate, flaky.latency) == (0.5, 0.05)
    gpt = config.models["gpt"]
    assert gpt.strategy == "weighted"
    assert [t.weight for t in gpt.targets] == [2.0, 1.0]
    assert gpt.fallbacks == ["cheap"]
    assert gpt.pricing is not None and gpt.pricing.output_per_mtok == 10.0
    retry = config.resilience.retry
    assert (retry.max_attempts, retry.initial_backoff, retry.jitter) == (5, 0.1, "none")
    assert retry.max_backoff == 8.0  # untouched keys of a given section keep their default
    timeouts = config.resilience.timeouts
    assert (timeouts.request, timeouts.first_token, timeouts.stream_idle) == (60.0, 5.0, 2.5)
    assert config.resilience.stream_recovery is False
    assert (config.logging.level, config.logging.format) == ("debug", "text")
    assert config.logging.sample_rate == 0.25


def test_empty_optional_section_means_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL + "server:\nlogging:\n"))
    assert config.server.port == 8080
    assert config.logging.format == "json"


def test_config_from_dict_applies_the_same_rules() -> None:
    config = config_from_dict(minimal_dict(server={"port": 1234}))
    assert isinstance(config, Config)
    assert config.server.port == 1234
    with pytest.raises(ConfigError) as info:
        config_from_dict(minimal_dict(server={"prot": 1234}))
    assert [issue.path for issue in info.value.issues] == ["server.prot"]


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    with pytest.raises(AttributeError):
        config.server.port = 1  # type: ignore[misc]


# -- ${VAR} expansion ----------------------------------------------------------------------


def test_env_var_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESILLM_TEST_KEY", "sk-from-env")
    config = load_config(
        write(
            tmp_path,
            """\
            providers:
              openai:
                type: openai
                api_key: ${RESILLM_TEST_KEY}
            models:
              gpt: {targets: [{provider: openai, model: gpt-4o}]}
            """,
        )
    )
    provider = config.providers["openai"]
    assert isinstance(provider, OpenAIProviderConfig)
    assert provider.api_key == "sk-from-env"


def test_env_var_inside_yaml_flow_mapping(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESILLM_TEST_KEY", "sk-flow")
    monkeypatch.setenv("RESILLM_TEST_MODEL", "gpt-4o-2024")
    config = load_config(
        write(
            tmp_path,
            """\
            providers:
              openai: {type: openai, api_key: ${RESILLM_TEST_KEY}}
            models:
              gpt:
                targets: [{provider: openai, model: ${RESILLM_TEST_MODEL}}]
            """,
        )
    )
    provider = config.providers["openai"]
    assert isinstance(provider, OpenAIProviderConfig)
    assert provider.api_key == "sk-flow"
    assert config.models["gpt"].targets[0].model == "gpt-4o-2024"


def test_default_used_when_variable_unset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RESILLM_TEST_HOST", raising=False)
    monkeypatch.delenv("RESILLM_TEST_PORT", raising=False)
    config = load_config(
        write(
            tmp_path,
            """\
            providers:
              local:
                type: openai_compatible
                base_url: http://${RESILLM_TEST_HOST:-127.0.0.1}:${RESILLM_TEST_PORT:-8000}/v1
            models:
              m: {targets: [{provider: local, model: llama}]}
            """,
        )
    )
    local = config.providers["local"]
    assert isinstance(local, OpenAICompatibleProviderConfig)
    assert local.base_url == "http://127.0.0.1:8000/v1"


def test_set_variable_wins_over_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESILLM_TEST_HOST", "10.0.0.7")
    config = load_config(
        write(
            tmp_path,
            """\
            providers:
              local: {type: openai_compatible, base_url: "http://${RESILLM_TEST_HOST:-x}/v1"}
            models:
              m: {targets: [{provider: local, model: llama}]}
            """,
        )
    )
    local = config.providers["local"]
    assert isinstance(local, OpenAICompatibleProviderConfig)
    assert local.base_url == "http://10.0.0.7/v1"


def test_empty_default_gives_empty_string(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RESILLM_TEST_ORG", raising=False)
    config = load_config(
        write(
            tmp_path,
            """\
            providers:
              openai: {type: openai, organization: "${RESILLM_TEST_ORG:-}"}
            models:
              gpt: {targets: [{provider: openai, model: gpt-4o}]}
            """,
        )
    )
    provider = config.providers["openai"]
    assert isinstance(provider, OpenAIProviderConfig)
    assert provider.organization == ""


def test_double_dollar_escapes_to_literal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("X", "must-not-appear")
    config = load_config(
        write(
            tmp_path,
            """\
            providers:
              m:
                type: mock
                headers: {x-template: "$${X}", x-flow: $${X}}
            models:
              chat: {targets: [{provider: m, model: mock-1}]}
            """,
        )
    )
    assert config.providers["m"].headers == {"x-template": "${X}", "x-flow": "${X}"}


def test_env_var_gives_number_for_int_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RESILLM_TEST_PORT", "9090")
    monkeypatch.setenv("RESILLM_TEST_RATE", "0.25")
    config = load_config(
        write(
            tmp_path,
            MINIMAL
            + "server:\n  port: ${RESILLM_TEST_PORT}\n"
            + "logging:\n  sample_rate: ${RESILLM_TEST_RATE}\n",
        )
    )
    assert config.server.port == 9090
    assert config.logging.sample_rate == 0.25


def test_env_var_default_gives_bool_and_duration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RESILLM_TEST_RECOVERY", raising=False)
    monkeypatch.delenv("RESILLM_TEST_TIMEOUT", raising=False)
    config = load_config(
        write(
            tmp_path,
            MINIMAL
            + "resilience:\n"
            + "  stream_recovery: ${RESILLM_TEST_RECOVERY:-false}\n"
            + "  timeouts: {request: '${RESILLM_TEST_TIMEOUT:-90s}'}\n",
        )
    )
    assert config.resilience.stream_recovery is False
    assert config.resilience.timeouts.request == 90.0


def test_two_adjacent_variables_both_expand(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RESILLM_TEST_A", "sk-part1")
    monkeypatch.setenv("RESILLM_TEST_B", "part2")
    config = load_config(
        write(
            tmp_path,
            """\
            providers:
              openai: {type: openai, api_key: "${RESILLM_TEST_A}${RESILLM_TEST_B}"}
            models:
              gpt: {targets: [{provider: openai, model: gpt-4o}]}
            """,
        )
    )
    provider = config.providers["openai"]
    assert isinstance(provider, OpenAIProviderConfig)
    assert provider.api_key == "sk-part1part2"


def test_default_used_when_variable_is_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RESILLM_TEST_PORT", "")
    config = load_config(write(tmp_path, MINIMAL + "server:\n  port: ${RESILLM_TEST_PORT:-9001}\n"))
    assert config.server.port == 9001


def test_missing_variable_is_an_error_naming_it_and_its_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RESILLM_TEST_MISSING", raising=False)
    path = write(
        tmp_path,
        """\
        providers:
          m: {type: mock}
          openai: {type: openai, api_key: ${RESILLM_TEST_MISSING}}
        models:
          chat: {targets: [{provider: m, model: mock-1}]}
        """,
    )
    issue = issue_at(issues_of(path), "providers.openai.api_key")
    assert "RESILLM_TEST_MISSING" in issue.message
    assert issue.file == str(path)
    assert issue.line == 3
    assert issue.column is not None and issue.column > 1


def test_missing_variable_in_block_mapping_has_its_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RESILLM_TEST_MISSING", raising=False)
    path = write(tmp_path, MINIMAL + "auth:\n  admin_key: ${RESILLM_TEST_MISSING}\n")
    issue = only_issue(path)
    assert issue.path == "auth.admin_key"
    assert "RESILLM_TEST_MISSING" in issue.message
    assert (issue.line, issue.column) == (8, 3)
    assert str(issue).startswith(f"{path}:8:3:")


# -- unknown keys --------------------------------------------------------------------------


def test_unknown_top_level_section_is_rejected_with_its_line(tmp_path: Path) -> None:
    issue = only_issue(write(tmp_path, MINIMAL + "srever:\n  port: 1\n"))
    assert issue.path == "srever"
    assert "srever" in issue.message
    assert (issue.line, issue.column) == (7, 1)


def test_unknown_server_key_is_rejected_with_path_and_line(tmp_path: Path) -> None:
    issue = only_issue(write(tmp_path, "server:\n  host: 0.0.0.0\n  prot: 9000\n" + MINIMAL))
    assert issue.path == "server.prot"
    assert "prot" in issue.message
    assert (issue.line, issue.column) == (3, 3)


def test_unknown_target_key_is_rejected_with_path_and_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        providers:
          m: {type: mock}
        models:
          chat:
            targets:
              - {provider: m, model: a}
              - {provider: m, model: b, wieght: 2}
        """,
    )
    issue = only_issue(path)
    assert issue.path == "models.chat.targets[1].wieght"
    assert "wieght" in issue.message
    assert issue.line == 7


def test_unknown_nested_resilience_key(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "resilience:\n  retry:\n    max_attemps: 2\n")
    issue = only_issue(path)
    assert issue.path == "resilience.retry.max_attemps"
    assert issue.line == 9


@pytest.mark.parametrize(
    ("section", "value", "key_path"),
    [
        ("server", {"wokers": 2}, "server.wokers"),
        ("auth", {"admin": "x"}, "auth.admin"),
        ("auth", {"keys": [{"name": "a", "key": "k", "modles": []}]}, "auth.keys[0].modles"),
        ("resilience", {"circuit_breaker": {"treshold": 1}}, "resilience.circuit_breaker.treshold"),
        ("resilience", {"timeouts": {"total": "1s"}}, "resilience.timeouts.total"),
        ("resilience", {"stream_recovry": True}, "resilience.stream_recovry"),
        ("logging", {"levle": "debug"}, "logging.levle"),
    ],
)
def test_unknown_keys_rejected_in_every_section(
    section: str, value: dict[str, Any], key_path: str
) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict(minimal_dict(**{section: value}))
    issues = info.value.issues
    assert [issue.path for issue in issues] == [key_path]
    assert key_path.rsplit(".", 1)[-1] in issues[0].message
    assert str(issues[0]).startswith(f"<config>: {key_path}:")


def test_unknown_model_key() -> None:
    data = minimal_dict()
    data["models"]["chat"]["stratgy"] = "priority"
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    assert [issue.path for issue in info.value.issues] == ["models.chat.stratgy"]


def test_unknown_provider_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        providers:
          openai: {type: openai, apikey: sk-x}
        models:
          gpt: {targets: [{provider: openai, model: gpt-4o}]}
        """,
    )
    issue = only_issue(path)
    assert issue.path == "providers.openai.apikey"
    assert issue.line == 2


# -- required fields and references ----------------------------------------------------------


def test_missing_providers_section(tmp_path: Path) -> None:
    path = write(tmp_path, "models:\n  chat: {targets: [{provider: m, model: x}]}\n")
    issue = issue_at(issues_of(path), "providers")
    assert "providers" in issue.message
    assert "required" in issue.message


def test_missing_models_section(tmp_path: Path) -> None:
    issue = only_issue(write(tmp_path, "providers:\n  m: {type: mock}\n"))
    assert issue.path == "models"
    assert "required" in issue.message


def test_empty_models_mapping_is_rejected(tmp_path: Path) -> None:
    issue = only_issue(write(tmp_path, "providers:\n  m: {type: mock}\nmodels: {}\n"))
    assert issue.path == "models"


def test_target_without_model(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        providers:
          m: {type: mock}
        models:
          chat:
            targets:
              - provider: m
        """,
    )
    issue = only_issue(path)
    assert issue.path.startswith("models.chat.targets[0]")
    assert "model" in issue.message
    assert issue.line == 6


def test_model_without_targets(tmp_path: Path) -> None:
    path = write(tmp_path, "providers:\n  m: {type: mock}\nmodels:\n  chat:\n    targets: []\n")
    issue = only_issue(path)
    assert issue.path == "models.chat.targets"
    assert issue.line == 5


def test_unknown_provider_type(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        providers:
          p: {type: openia}
        models:
          chat: {targets: [{provider: p, model: x}]}
        """,
    )
    issue = only_issue(path)
    assert issue.path == "providers.p.type"
    assert "openia" in issue.message
    assert "openai" in issue.message.replace("openia", "")  # lists the valid types
    assert issue.line == 2


def test_provider_without_type(tmp_path: Path) -> None:
    path = write(tmp_path, "providers:\n  p: {api_key: x}\nmodels:\n  c: {targets: []}\n")
    issue = issue_at(issues_of(path), "providers.p")
    assert "type" in issue.message


def test_target_naming_unknown_provider(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        providers:
          m: {type: mock}
        models:
          chat:
            targets:
              - {provider: m, model: a}
              - {provider: opneai, model: b}
        """,
    )
    issue = only_issue(path)
    assert issue.path == "models.chat.targets[1].provider"
    assert "opneai" in issue.message
    assert issue.line == 7


def test_fallback_naming_unknown_alias(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "    fallbacks: [chta]\n")
    issue = only_issue(path)
    assert issue.path == "models.chat.fallbacks[0]"
    assert "chta" in issue.message
    assert issue.line == 7


def test_fallback_to_itself_is_rejected() -> None:
    data = minimal_dict()
    data["models"]["chat"]["fallbacks"] = ["chat"]
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    assert [issue.path for issue in info.value.issues] == ["models.chat.fallbacks[0]"]


def test_fallback_to_another_alias_is_accepted() -> None:
    data = minimal_dict()
    data["models"]["other"] = {"targets": [{"provider": "m", "model": "x"}], "fallbacks": ["chat"]}
    assert config_from_dict(data).models["other"].fallbacks == ["chat"]


def test_invalid_strategy_and_range(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "    strategy: fastest\nlogging:\n  sample_rate: 2\n")
    issues = issues_of(path)
    assert {issue.path for issue in issues} == {"models.chat.strategy", "logging.sample_rate"}


def test_duplicate_client_keys(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        MINIMAL
        + """\
auth:
  keys:
    - {name: team-a, key: same-key}
    - {name: team-b, key: same-key}
""",
    )
    issue = only_issue(path)
    assert issue.path == "auth.keys[1].key"
    assert "duplicate" in issue.message
    assert issue.line == 10
    assert "same-key" not in str(issue)  # a client key is a secret


def test_duplicate_client_key_names(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        MINIMAL + "auth:\n  keys:\n    - {name: a, key: k1}\n    - {name: a, key: k2}\n",
    )
    issue = only_issue(path)
    assert issue.path == "auth.keys[1].name"


def test_client_key_allow_list_naming_unknown_alias(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        MINIMAL + "auth:\n  keys:\n    - {name: a, key: k1, models: [chat, gtp-4o]}\n",
    )
    issue = only_issue(path)
    assert issue.path == "auth.keys[0].models[1]"
    assert "gtp-4o" in issue.message
    assert issue.line == 9


# -- durations -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("2.5", 2.5),
        ("1.5h", 5400.0),
        (2.5, 2.5),
        (7, 7.0),
        (0, 0.0),
    ],
)
def test_duration_accepted(text: object, seconds: float) -> None:
    parsed = parse_duration(text)
    assert isinstance(parsed, Duration)
    assert parsed == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["3 weeks", "-1s", True, False, "", "1d", "ms", -1, None, "1e3"])
def test_duration_rejected(text: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("yaml_value", "seconds"),
    [("250ms", 0.25), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("2.5", 2.5), ("12", 12.0)],
)
def test_duration_in_config(tmp_path: Path, yaml_value: str, seconds: float) -> None:
    path = write(tmp_path, MINIMAL + f"resilience:\n  timeouts:\n    first_token: {yaml_value}\n")
    assert load_config(path).resilience.timeouts.first_token == pytest.approx(seconds)


@pytest.mark.parametrize("yaml_value", ["3 weeks", "-1s", "true", "-5"])
def test_bad_duration_in_config_is_located(tmp_path: Path, yaml_value: str) -> None:
    path = write(tmp_path, MINIMAL + f"resilience:\n  timeouts:\n    stream_idle: {yaml_value}\n")
    issue = only_issue(path)
    assert issue.path == "resilience.timeouts.stream_idle"
    assert "duration" in issue.message
    assert (issue.line, issue.column) == (9, 5)


# -- YAML syntax and several errors at once --------------------------------------------------


def test_invalid_yaml_reports_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  port: 80\n  host: [a, b\nproviders: {}\n")
    issue = only_issue(path)
    assert "YAML" in issue.message
    assert issue.file == str(path)
    assert issue.line is not None and issue.line >= 3
    assert issue.column is not None


def test_tab_indentation_is_reported_where_it_is(tmp_path: Path) -> None:
    issue = only_issue(write(tmp_path, "server:\n\tport: 80\n"))
    assert "YAML" in issue.message
    assert (issue.line, issue.column) == (2, 1)


@pytest.mark.parametrize("scalar", ["+_", "-_", "0x_"])
def test_a_scalar_ruamel_slips_on_is_a_clean_error(tmp_path: Path, scalar: str) -> None:
    # ruamel resolves "+_" as an int, then fails with IndexError converting it (fuzzing).
    issue = only_issue(write(tmp_path, f"providers: {scalar}\n"))
    assert "invalid YAML" in issue.message


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    issue = only_issue(write(tmp_path, MINIMAL + "server: {port: 1}\nserver: {port: 2}\n"))
    assert "duplicate" in issue.message
    assert issue.line == 8


def test_document_that_is_not_a_mapping(tmp_path: Path) -> None:
    issue = only_issue(write(tmp_path, "- providers\n- models\n"))
    assert "mapping" in issue.message


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    issue = only_issue(tmp_path / "absent.yaml")
    assert issue.file == str(tmp_path / "absent.yaml")
    assert "cannot read" in issue.message


def test_several_errors_are_reported_at_once_in_line_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RESILLM_TEST_MISSING", raising=False)
    path = write(
        tmp_path,
        """\
        server:
          prot: 9000
        providers:
          openai: {type: openai, api_key: ${RESILLM_TEST_MISSING}}
          weird: {type: nope}
        models:
          gpt:
            targets:
              - {provider: openai, model: gpt-4o, wieght: 2}
        resilience:
          timeouts: {request: 3 weeks}
        logging:
          format: xml
        """,
    )
    issues = issues_of(path)
    assert len(issues) > 1
    by_path = {issue.path: issue.line for issue in issues}
    assert by_path == {
        "server.prot": 2,
        "providers.openai.api_key": 4,
        "providers.weird.type": 5,
        "models.gpt.targets[0].wieght": 9,
        "resilience.timeouts.request": 11,
        "logging.format": 13,
    }
    lines = [issue.line or 0 for issue in issues]
    assert lines == sorted(lines)
    assert all(issue.file == str(path) for issue in issues)
    assert str(path) in str(ConfigError(issues))


# -- resillm check -------------------------------------------------------------------------


def test_check_valid_config_prints_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        """\
        providers:
          primary: {type: mock}
          backup: {type: openai_compatible, base_url: "http://127.0.0.1:8000/v1"}
        models:
          chat:
            targets:
              - {provider: primary, model: mock-large}
              - {provider: backup, model: llama-3}
            fallbacks: [small]
          small:
            targets: [{provider: backup, model: llama-mini}]
        """,
    )
    assert main(["check", "-c", str(path)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    for word in ("chat", "small", "primary", "backup", "mock-large", "llama-3", "llama-mini"):
        assert word in out
    assert "8080" in out


def test_check_invalid_config_prints_every_error_located(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        """\
        server:
          prot: 9000
        providers:
          m: {type: mock}
        models:
          chat:
            targets:
              - {provider: m, model: x, wieght: 2}
        """,
    )
    assert main(["check", "-c", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert f"{path}:2:3:" in err
    assert "server.prot" in err
    assert f"{path}:8:" in err
    assert "wieght" in err


def test_check_uses_resillm_config_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, MINIMAL)
    monkeypatch.setenv("RESILLM_CONFIG", str(path))
    assert main(["check"]) == 0
    assert "chat" in capsys.readouterr().out


def test_check_missing_file_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "-c", str(tmp_path / "nope.yaml")]) == 1
    assert "nope.yaml" in capsys.readouterr().err


# -- ruamel is held only while a config is read ----------------------------------------------


def _without_ruamel(monkeypatch: pytest.MonkeyPatch) -> None:
    """As in a fresh `resillm serve`: ruamel not imported yet (restored after the test)."""
    import sys

    for name in [m for m in sys.modules if m == "ruamel" or m.startswith("ruamel.")]:
        monkeypatch.delitem(sys.modules, name)


@pytest.mark.parametrize("text", [MINIMAL, "providers: [unclosed\n", MINIMAL + "bogus: 1\n"])
def test_reading_a_config_lets_go_of_ruamel_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str
) -> None:
    import sys

    _without_ruamel(monkeypatch)
    path = write(tmp_path, text)
    try:
        load_config(path)
    except ConfigError as exc:
        assert exc.issues[0].line is not None  # errors are still located
    assert not [m for m in sys.modules if m.startswith("ruamel")]
    assert load_config(write(tmp_path, MINIMAL, "again.yaml")).models  # a reload reads again


def test_ruamel_imported_by_others_stays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    _without_ruamel(monkeypatch)
    import ruamel.yaml  # e.g. the admin page's config view

    load_config(write(tmp_path, MINIMAL))
    assert sys.modules["ruamel.yaml"] is ruamel.yaml
