"""The ``budget`` section (SPEC section 2): defaults, the whole shape, errors with lines."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from resillm.cli import summary
from resillm.config import BudgetConfig
from resillm.config_loader import ConfigError, ConfigIssue, config_from_dict, load_config
from resillm.durations import Duration

BASE = """\
providers:
  m: {type: mock}
models:
  chat:
    targets:
      - {provider: m, model: mock-1}
"""


def load(tmp_path: Path, budget: str) -> BudgetConfig:
    path = tmp_path / "resillm.yaml"
    path.write_text(BASE + textwrap.dedent(budget), encoding="utf-8")
    return load_config(path).budget


def issues(tmp_path: Path, budget: str) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, budget)
    return caught.value.issues


def test_defaults_enforce_nothing() -> None:
    budget = config_from_dict(
        {
            "providers": {"m": {"type": "mock"}},
            "models": {"c": {"targets": [{"provider": "m", "model": "x"}]}},
        }
    ).budget
    assert budget == BudgetConfig()
    assert (budget.hourly_limit, budget.daily_limit, budget.action) == (None, None, "reject")
    assert (budget.store, budget.snapshot_path) == ("memory", "resillm-budget.json")
    assert budget.snapshot_interval == Duration(10.0)
    assert (budget.redis_failure, budget.default_max_tokens) == ("closed", 1024)
    assert budget.alerts.thresholds == [0.8, 1.0]


def test_the_whole_section_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMTP_PASSWORD", "pw")
    budget = load(
        tmp_path,
        """\
        budget:
          hourly_limit: 10.0
          daily_limit: 100
          action: warn
          store: redis
          snapshot_path: spend.json
          snapshot_interval: 500ms
          redis_url: redis://cache:6379/2
          redis_timeout: 1s
          redis_failure: open
          default_max_tokens: 256
          alerts:
            thresholds: [0.5, 0.9, 1.0]
            webhook_url: https://hooks.example.com/budget
            slack_webhook_url: https://hooks.slack.com/services/T/B/X
            email: {smtp_host: smtp.example.com, smtp_port: 465, ssl: true, username: u,
                    password: "${SMTP_PASSWORD}", from: gw@example.com, to: [ops@example.com]}
        """,
    )
    assert (budget.hourly_limit, budget.daily_limit, budget.action) == (10.0, 100.0, "warn")
    assert (budget.store, budget.redis_url, budget.redis_failure) == (
        "redis",
        "redis://cache:6379/2",
        "open",
    )
    assert (budget.snapshot_interval, budget.redis_timeout) == (0.5, 1.0)
    email = budget.alerts.email
    assert email is not None
    assert (email.from_, email.to, email.password, email.ssl) == (
        "gw@example.com",
        ["ops@example.com"],
        "pw",
        True,
    )


def test_mistakes_are_reported_with_their_lines(tmp_path: Path) -> None:
    found = issues(
        tmp_path,
        """\
        budget:
          hourly_limt: 1.0
          daily_limit: -1
          action: block
        """,
    )
    assert [str(i) for i in found] == [
        f"{tmp_path / 'resillm.yaml'}:8:3: budget.hourly_limt: unknown key 'hourly_limt' "
        "(check the spelling)"
    ]


def test_each_value_is_checked(tmp_path: Path) -> None:
    for budget, key in [
        ("budget: {daily_limit: -1}\n", "budget.daily_limit"),
        ("budget: {action: block}\n", "budget.action"),
        ("budget: {store: sqlite}\n", "budget.store"),
        ("budget: {redis_failure: maybe}\n", "budget.redis_failure"),
        ("budget: {snapshot_interval: 0s}\n", "budget.snapshot_interval"),
        ("budget: {alerts: {thresholds: [0]}}\n", "budget.alerts.thresholds[0]"),
        ("budget: {alerts: {email: {smtp_host: h, from: f, to: []}}}\n", "budget.alerts.email.to"),
        ("budget: {alerts: {email: {smtp_host: h, to: [x]}}}\n", "budget.alerts.email"),
    ]:
        (issue,) = issues(tmp_path, budget)
        assert issue.path == key, (budget, issue)
        assert issue.line == 7, (budget, issue)


def test_key_budgets_are_validated_too(tmp_path: Path) -> None:
    found = issues(
        tmp_path,
        """\
        auth:
          keys:
            - {name: a, key: k, budget: {hourly_limit: -2}}
        """,
    )
    assert [i.path for i in found] == ["auth.keys[0].budget.hourly_limit"]


def test_check_summarises_the_budget_and_unpriced_models(tmp_path: Path) -> None:
    path = tmp_path / "resillm.yaml"
    path.write_text(
        BASE
        + textwrap.dedent(
            """\
            budget:
              daily_limit: 25
              action: warn
              alerts: {webhook_url: "http://127.0.0.1:9/hook"}
            """
        ),
        encoding="utf-8",
    )
    text = summary(str(path), load_config(path))
    assert "budget: daily $25 (warn); 0 key budget(s); store memory; alerts via webhook" in text
    assert "no price known (cost 0, set models.*.pricing): mock-1" in text
