"""ARCHITECTURE.md section 2, enforced: which package may import which."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LEAVES = {
    "resillm.alerts",
    "resillm.asgi",
    "resillm.budget",
    "resillm.budget_redis",
    "resillm.budget_store",
    "resillm.cache",
    "resillm.cache_answer",
    "resillm.cache_store",
    "resillm.config",
    "resillm.config_diff",
    "resillm.config_env",
    "resillm.config_loader",
    "resillm.config_yaml",
    "resillm.context",
    "resillm.durations",
    "resillm.errors",
    "resillm.log",
    "resillm.metrics",
    "resillm.openapi",
    "resillm.pricing",
    "resillm.redact",
    "resillm.schema",
    "resillm.tracecontext",
    "resillm.usage",
}
ROUTING = {
    "resillm.router",
    "resillm.relay",
    "resillm.failover",
    "resillm.targets",
    "resillm.retry",
    "resillm.circuit",
    "resillm.balance",
}
OWN = ("resillm", "middleware", "providers")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def own_imports(path: Path) -> set[str]:
    """Project modules a file imports (``from resillm import x`` counts as resillm.x)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in OWN)
    return found


def modules() -> dict[str, set[str]]:
    table = {}
    for package in OWN:
        for path in (ROOT / package).rglob("*.py"):
            table[module_name(path)] = own_imports(path)
    return table


def is_module(name: str, table: dict[str, set[str]]) -> bool:
    return name in table


def violations() -> list[str]:
    table = modules()
    problems = []
    for module, imports in sorted(table.items()):
        targets = {i for i in imports if is_module(i, table)}
        for target in sorted(targets):
            rule = broken_rule(module, target)
            if rule:
                problems.append(f"{module} imports {target}: {rule}")
    return problems


def broken_rule(module: str, target: str) -> str | None:
    if target in {"resillm", "middleware", "providers"} or target == module:
        return None
    if module in LEAVES and target not in LEAVES:
        return "a leaf imports only other leaves"
    if module.startswith("middleware.") and not (
        target in LEAVES or target.startswith("middleware.")
    ):
        return "middleware import leaves only"
    if module.startswith("providers."):
        if target == "resillm.asgi":
            return "providers never see ASGI"
        if not (target in LEAVES or target.startswith("providers.")):
            return "providers import leaves and other providers only"
    if module in ROUTING and target.startswith("middleware."):
        return "the router never imports middleware"
    if target == "resillm.app" and module not in {
        "resillm",
        "resillm.server",
        "resillm.cli",
        "resillm.reload",
    }:
        return "only the process layer imports the app"
    if target == "resillm.runtime" and module != "resillm.app":
        return "only the app builds runtimes"
    if module.startswith("resillm.mock_upstream") and not target.startswith(
        "resillm.mock_upstream"
    ):
        return "the mock upstream stands alone"
    return None


def test_import_rules_hold() -> None:
    assert violations() == []


def test_the_checker_sees_a_broken_rule() -> None:
    assert broken_rule("providers.openai", "middleware.auth") is not None
    assert broken_rule("providers.openai", "resillm.asgi") is not None
    assert broken_rule("resillm.schema", "resillm.router") is not None
    assert broken_rule("middleware.auth", "providers.openai") is not None
    assert broken_rule("resillm.router", "middleware.errors") is not None
    assert broken_rule("resillm.app", "middleware.errors") is None
    assert broken_rule("resillm.app", "providers.openai") is None


def test_only_the_app_imports_both_middleware_and_providers() -> None:
    both = [
        m
        for m, imports in modules().items()
        if any(i.startswith("middleware.") for i in imports)
        and any(i.startswith("providers.") for i in imports)
    ]
    # The composition root: the gateway's lifecycle (app) and the assembly of one config
    # (runtime).
    assert sorted(both) == ["resillm.app", "resillm.runtime"]
