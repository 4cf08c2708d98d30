"""The files under deploy/: the example config and the k8s ConfigMap pass ``resillm check``,
the manifests parse, and the unit and container file keep what the README promises."""

from __future__ import annotations

import configparser
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest
from ruamel.yaml import YAML

from resillm.cli import main
from resillm.config_loader import config_from_dict
from resillm.workers import per_worker_problems

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
EXAMPLE = DEPLOY / "resillm.example.yaml"
K8S = DEPLOY / "k8s"
_ENV_NAME = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")


def clear_referenced_env(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Validate as on a machine with none of the secrets set."""
    for name in set(_ENV_NAME.findall(text)):
        monkeypatch.delenv(name, raising=False)


def k8s_documents() -> dict[str, dict[str, Any]]:
    documents: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for document in YAML(typ="safe").load_all(path.read_text()):
            documents[document["kind"]] = document
    return documents


def test_the_example_config_passes_check_with_no_secrets_set(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clear_referenced_env(EXAMPLE.read_text(), monkeypatch)
    assert main(["check", "-c", str(EXAMPLE)]) == 0
    assert capsys.readouterr().out.startswith(f"{EXAMPLE}: OK")


def test_the_example_config_names_every_key_of_every_section() -> None:
    # Each field of each config Struct appears in the example (set, or in a comment).
    from resillm import config as c

    text = EXAMPLE.read_text()
    sections = [
        value
        for value in vars(c).values()
        if isinstance(value, type)
        and issubclass(value, msgspec.Struct)
        and value.__module__ == c.__name__
        and not value.__name__.startswith("_")
    ]
    assert len(sections) > 20
    missing = [
        f"{section.__name__}.{name}"
        for section in sections
        for name in section.__struct_encode_fields__
        if not re.search(rf"(^|[\s{{,/]){re.escape(name)}:", text, re.M)
    ]
    assert not missing, f"not in deploy/resillm.example.yaml: {missing}"


def test_the_k8s_manifests_parse_and_mount_the_config_as_a_directory() -> None:
    documents = k8s_documents()
    assert {"ConfigMap", "Secret", "Deployment", "Service", "Kustomization"} <= set(documents)
    pod = documents["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["resources"]["requests"] and container["resources"]["limits"]
    config_mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    assert config_mount["mountPath"] == "/etc/resillm" and "subPath" not in config_mount
    assert container["envFrom"] == [
        {"secretRef": {"name": documents["Secret"]["metadata"]["name"]}}
    ]
    assert pod["terminationGracePeriodSeconds"] > 30  # above server.graceful_timeout
    service = documents["Service"]["spec"]
    assert service["selector"] == documents["Deployment"]["spec"]["selector"]["matchLabels"]


def test_the_k8s_configmap_config_passes_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    embedded = k8s_documents()["ConfigMap"]["data"]["resillm.yaml"]
    clear_referenced_env(embedded, monkeypatch)
    monkeypatch.setenv("TEAM_A_KEY", "from-the-secret")  # required: the pod needs it set
    path = tmp_path / "resillm.yaml"
    path.write_text(embedded)
    assert main(["check", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    assert "store redis" in out and "cache: redis" in out
    monkeypatch.delenv("TEAM_A_KEY")
    assert main(["check", "-c", str(path)]) == 1  # without it, the pod does not start
    assert "TEAM_A_KEY" in capsys.readouterr().err


def test_the_systemd_unit_drains_reloads_and_is_hardened() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # keep the keys' case
    unit.read_string((DEPLOY / "resillm.service").read_text())
    service = unit["Service"]
    assert service["ExecReload"].endswith("-HUP $MAINPID")
    assert service["KillMode"] == "mixed" and service["TimeoutStopSec"] == "45s"
    for key, value in {
        "DynamicUser": "yes", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
        "PrivateTmp": "yes", "CapabilityBoundingSet": "", "StateDirectory": "resillm",
    }.items():  # fmt: skip
        assert service[key] == value, key
    assert service["EnvironmentFile"] and "serve -c" in service["ExecStart"]


def test_the_containerfile_copies_every_package_and_runs_unprivileged() -> None:
    text = (DEPLOY / "Containerfile").read_text()
    setup = configparser.ConfigParser()
    setup.read(DEPLOY.parent / "setup.cfg")
    packages = {
        line.strip()
        for line in setup["options.packages.find"]["include"].split()
        if "." not in line
    }
    copied = set(re.findall(r"^COPY (\w+) \1$", text, re.M))
    assert packages == copied  # a new top-level package must reach the image too
    assert re.search(r"^USER 10001", text, re.M)
    assert "HEALTHCHECK" in text and "/health" in text
    assert '".[redis]"' in text
    assert 'CMD ["serve", "-c", "/etc/resillm/resillm.yaml", "--host", "0.0.0.0"]' in text


# -- several workers ------------------------------------------------------------------------


def with_budget(**budget: Any) -> Any:
    return config_from_dict(
        {
            "providers": {"m": {"type": "mock"}},
            "models": {"x": {"targets": [{"provider": "m", "model": "m"}]}},
            "budget": budget,
            "cache": {"enabled": True},
        }
    )


def test_one_worker_has_nothing_to_share() -> None:
    problems = per_worker_problems(with_budget(hourly_limit=1.0), 1)
    assert (problems.errors, problems.warnings) == ([], [])


def test_several_workers_need_a_shared_store_for_budget_limits() -> None:
    memory = per_worker_problems(with_budget(daily_limit=5.0, snapshot_path="s.json"), 2)
    assert len(memory.errors) == 1 and "s.json" in memory.errors[0]
    assert "cache.backend: redis" in memory.warnings[0]  # per-worker cache: a warning only
    shared = per_worker_problems(with_budget(daily_limit=5.0, store="redis"), 4)
    assert shared.errors == []
    unlimited = per_worker_problems(with_budget(), 4)  # counted, not enforced: no fight
    assert unlimited.errors == []


def test_check_refuses_several_workers_with_a_memory_budget(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "resillm.yaml"
    path.write_text(
        "server: {workers: 3}\n"
        "providers: {m: {type: mock}}\n"
        "models: {x: {targets: [{provider: m, model: m}]}}\n"
        "budget: {hourly_limit: 2.0}\n"
    )
    assert main(["check", "-c", str(path)]) == 1
    err = capsys.readouterr().err
    assert "server.workers: 3 workers with budget limits and budget.store: memory" in err
