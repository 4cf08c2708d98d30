"""The ``admin`` config section (SPEC section 2): ``recent_requests``."""

from __future__ import annotations

from pathlib import Path

import pytest

from resillm.config import Config
from resillm.config_loader import ConfigError, load_config

MINIMAL = """\
providers:
  m: {type: mock}
models:
  chat:
    targets:
      - {provider: m, model: mock-1}
"""


def load(tmp_path: Path, extra: str = "") -> Config:
    path = tmp_path / "resillm.yaml"
    path.write_text(MINIMAL + extra, encoding="utf-8")
    return load_config(path)


def test_admin_keeps_200_recent_requests_by_default(tmp_path: Path) -> None:
    config = load(tmp_path)
    assert config.admin.recent_requests == 200


def test_admin_recent_requests_is_configurable(tmp_path: Path) -> None:
    config = load(tmp_path, "admin:\n  recent_requests: 50\n")
    assert config.admin.recent_requests == 50
    assert load(tmp_path, "admin:\n  recent_requests: 0\n").admin.recent_requests == 0


@pytest.mark.parametrize(
    ("extra", "path"),
    [
        ("admin:\n  recent_requests: -1\n", "admin.recent_requests"),
        ("admin:\n  recent_requests: many\n", "admin.recent_requests"),
        ("admin:\n  recent_request: 10\n", "admin.recent_request"),
    ],
)
def test_admin_section_errors_are_located(tmp_path: Path, extra: str, path: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, extra)
    (issue,) = info.value.issues
    assert issue.path == path
    assert issue.line == 8
