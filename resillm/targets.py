"""An alias's targets, bound to their providers and circuits, and its fallback chain."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Literal

from providers.base import Provider, Upstream
from resillm.balance import StatsRegistry, TargetStats
from resillm.circuit import CircuitBreaker, CircuitRegistry
from resillm.config import Config, ModelConfig, TargetConfig

Verdict = Literal["success", "failure", "release"]


def target_id(target: TargetConfig) -> str:
    """provider/model, plus a short fingerprint when the target brings its own key or URL,
    so two keys of one provider are two targets with two circuits. Never the key itself."""
    name = f"{target.provider}/{target.model}"
    if target.api_key is None and target.base_url is None:
        return name
    digest = hashlib.sha256(f"{target.api_key}\0{target.base_url}".encode()).hexdigest()
    return f"{name}#{digest[:8]}"


class Target:
    """One entry of an alias's target list, bound to its provider and its circuit."""

    __slots__ = ("circuit", "id", "model", "prefill", "provider", "stats", "upstream", "weight")

    def __init__(
        self,
        id: str,
        upstream: Upstream,
        circuit: CircuitBreaker,
        weight: float = 1.0,
        prefill: bool = False,
        stats: TargetStats | None = None,
    ) -> None:
        self.id = id
        self.upstream = upstream
        self.provider = upstream.provider
        self.model = upstream.model
        self.circuit = circuit
        self.weight = weight
        self.prefill = prefill  # continues a trailing assistant message (stream recovery)
        self.stats = stats or TargetStats()

    def begin(self) -> None:
        """An attempt starts (after the circuit admitted it)."""
        self.stats.inflight += 1

    def settle(self, verdict: Verdict) -> None:
        """The attempt (or the stream it opened) ended: tell the circuit, once."""
        self.stats.inflight -= 1
        if verdict == "success":
            self.circuit.success()
        elif verdict == "failure":
            self.circuit.failure()
        else:
            self.circuit.release()


class Route:
    """An alias: its own targets, then (``chain``) the targets of its fallback aliases."""

    __slots__ = ("alias", "chain", "config", "targets")

    def __init__(self, alias: str, config: ModelConfig, targets: list[Target]) -> None:
        self.alias = alias
        self.config = config
        self.targets = targets
        self.chain: list[Target] = list(targets)


def build_routes(
    config: Config,
    providers: Mapping[str, Provider],
    circuits: CircuitRegistry,
    stats: StatsRegistry | None = None,
) -> dict[str, Route]:
    stats = stats or StatsRegistry()
    routes: dict[str, Route] = {}
    for alias, model in config.models.items():
        targets = []
        for t in model.targets:
            provider = providers[t.provider]
            upstream = provider.bind(t.model, api_key=t.api_key, base_url=t.base_url)
            tid = target_id(t)
            prefill = provider.prefill if t.prefill is None else t.prefill
            targets.append(
                Target(tid, upstream, circuits.get(tid), t.weight, prefill, stats.get(tid))
            )
        routes[alias] = Route(alias, model, targets)
    for route in routes.values():
        route.chain = _chain(route, routes)
    return routes


def _chain(route: Route, routes: Mapping[str, Route]) -> list[Target]:
    """The alias's targets, then its fallbacks' (depth first, each alias and target once)."""
    chain: list[Target] = []
    seen_ids: set[str] = set()
    seen_aliases: set[str] = set()

    def visit(alias: str) -> None:
        if alias in seen_aliases:
            return
        seen_aliases.add(alias)
        current = routes[alias]
        for target in current.targets:
            if target.id not in seen_ids:
                seen_ids.add(target.id)
                chain.append(target)
        for fallback in current.config.fallbacks:
            visit(fallback)

    visit(route.alias)
    return chain
