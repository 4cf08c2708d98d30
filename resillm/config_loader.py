"""Load and validate a config: YAML (ruamel), ``${VAR}`` expansion, every error located.

The YAML is read with ruamel's round-trip loader only to learn where each key and value
sits; it is then turned into plain data, environment variables expanded, and each section
converted to its Struct separately so one run reports every mistake, each with its key path
and ``file:line:column``.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from resillm.config import (
    PROVIDER_TYPES,
    AdminConfig,
    AuthConfig,
    BudgetConfig,
    CacheConfig,
    Config,
    CorsConfig,
    LoggingConfig,
    ModelConfig,
    ProviderConfig,
    ResilienceConfig,
    ServerConfig,
    TracingConfig,
)
from resillm.config_env import expand, hide_env_tokens, unhide
from resillm.config_yaml import ConfigPath, YamlProblem, yaml_document
from resillm.durations import Duration, parse_duration

_AT_RE = re.compile(r"^(.*) - at `\$(.*)`$", re.S)
_PATH_TOKEN_RE = re.compile(r"\.([^.\[]+)|\[(\d+|\.\.\.)\]")
_SECTIONS: dict[str, type[Any]] = {
    "server": ServerConfig,
    "auth": AuthConfig,
    "resilience": ResilienceConfig,
    "budget": BudgetConfig,
    "cache": CacheConfig,
    "logging": LoggingConfig,
    "tracing": TracingConfig,
    "admin": AdminConfig,
    "cors": CorsConfig,
}
_TOP_KEYS = ("providers", "models", *_SECTIONS)
_NOT_YET: tuple[str, ...] = ()  # SPEC sections still being built


@dataclass(frozen=True)
class ConfigIssue:
    """One validation error: where it is and what is wrong."""

    path: str
    message: str
    file: str | None = None
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        where = self.file or "<config>"
        if self.line is not None:
            where += f":{self.line}:{self.column or 1}"
        key = f" {self.path}:" if self.path else ""
        return f"{where}:{key} {self.message}"


class ConfigError(Exception):
    """The config is invalid; ``issues`` holds every error found."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


def default_config_path() -> str:
    return os.environ.get("RESILLM_CONFIG") or "resillm.yaml"


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, expand and validate a YAML config file; raise :class:`ConfigError`."""
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([ConfigIssue("", f"cannot read config: {exc.strerror}", name)]) from None
    except UnicodeDecodeError:
        raise ConfigError([ConfigIssue("", "config is not valid UTF-8", name)]) from None
    text, tokens = hide_env_tokens(text)
    try:
        return _load_document(name, text, tokens)
    except RecursionError:
        raise ConfigError([ConfigIssue("", "config is nested too deeply", name)]) from None


def _load_document(name: str, text: str, tokens: list[str]) -> Config:
    try:
        with yaml_document(text) as (document, locations):
            return _Validator(name, locations, tokens).run(document)
    except YamlProblem as exc:
        issue = ConfigIssue("", f"invalid YAML: {exc.message}", name, exc.line, exc.column)
        raise ConfigError([issue]) from None


def config_from_dict(data: Mapping[str, Any], source: str | None = None) -> Config:
    """Validate plain data (already parsed) with the same rules as a file."""
    return _Validator(source, {}, []).run(data)


def _dec_hook(tp: type[Any], obj: Any) -> Any:
    if tp is Duration:
        return parse_duration(obj)
    raise NotImplementedError(f"unsupported config type {tp!r}")


class _Validator:
    def __init__(
        self, source: str | None, positions: dict[ConfigPath, tuple[int, int]], hidden: list[str]
    ) -> None:
        self.source = source
        self.positions = positions
        self.hidden = hidden
        self.env_failed: set[ConfigPath] = set()
        self.issues: list[ConfigIssue] = []

    def add(self, path: ConfigPath, message: str) -> None:
        located = path
        while located and located not in self.positions:
            located = located[:-1]
        line, column = self.positions.get(located, (None, None))
        self.issues.append(ConfigIssue(_dotted(path), message, self.source, line, column))

    def run(self, document: Any) -> Config:
        data = self.plain(document, ())
        if not isinstance(data, dict):
            self.add((), "the config must be a mapping of sections (providers, models, ...)")
            raise ConfigError(self.issues)
        for key in data:
            if key in _NOT_YET:
                self.add((key,), f"the {key!r} section is not supported by this version yet")
            elif key not in _TOP_KEYS:
                self.add((key,), f"unknown section {key!r}; expected one of {', '.join(_TOP_KEYS)}")
        sections: dict[str, Any] = {}
        for key, tp in _SECTIONS.items():
            if key in data:
                sections[key] = self.convert(data[key] or {}, tp, (key,))
        providers = self.convert_entries(data, "providers", ProviderConfig)
        models = self.convert_entries(data, "models", ModelConfig)
        if not self.issues:
            self.check_references(providers, models, sections.get("auth"))
            self.check_server(sections.get("server"))
            self.check_budget(sections.get("budget"))
            self.check_cache(sections.get("cache"))
            self.check_tracing(sections.get("tracing"))
        if self.issues:
            self.issues.sort(key=lambda issue: (issue.line or 0, issue.column or 0))
            raise ConfigError(self.issues)
        return Config(providers=providers, models=models, **sections)

    def plain(self, node: Any, path: ConfigPath) -> Any:
        """ruamel nodes -> dict/list/str/int/float/bool/None, with ``${VAR}`` expanded."""
        if isinstance(node, Mapping):
            return {
                self.unhide(str(k)): self.plain(v, (*path, self.unhide(str(k))))
                for k, v in node.items()
            }
        if isinstance(node, list):
            return [self.plain(v, (*path, i)) for i, v in enumerate(node)]
        if isinstance(node, str):
            return self.expand(str(node), path)
        if isinstance(node, bool) or node is None:
            return node
        if isinstance(node, int):
            return int(node)
        if isinstance(node, float):
            return float(node)
        return node

    def unhide(self, value: str) -> str:
        return unhide(value, self.hidden)

    def expand(self, value: str, path: ConfigPath) -> str:
        def missing(name: str) -> None:
            self.env_failed.add(path)
            self.add(
                path,
                f"environment variable {name} is not set "
                f"(write ${{{name}:-default}} to give a default)",
            )

        return expand(unhide(value, self.hidden), missing)

    def convert(self, data: Any, tp: Any, path: ConfigPath) -> Any:
        try:
            return msgspec.convert(data, tp, strict=False, dec_hook=_dec_hook)
        except msgspec.ValidationError as exc:
            self.add_validation_error(str(exc), path)
            return None
        except UnicodeEncodeError:  # "\ud83d" escapes: ruamel does not pair surrogates
            self.add(path, "text holds a lone surrogate (\\ud800-\\udfff): not valid Unicode")
            return None

    def convert_entries(self, data: dict[str, Any], key: str, tp: Any) -> dict[str, Any]:
        entries = data.get(key)
        if entries is None:
            self.add((key,), f"the {key!r} section is required")
            return {}
        if not isinstance(entries, dict) or not entries:
            self.add((key,), f"{key!r} must be a non-empty mapping of names to settings")
            return {}
        return {name: self.convert(value, tp, (key, name)) for name, value in entries.items()}

    def add_validation_error(self, text: str, base: ConfigPath) -> None:
        match = _AT_RE.match(text)
        message, path = (match.group(1), _parse_path(match.group(2))) if match else (text, ())
        unknown = re.match(r"Object contains unknown field `(.*)`", message)
        if unknown:
            path = (*path, unknown.group(1))
            message = f"unknown key {unknown.group(1)!r} (check the spelling)"
        elif path[-1:] == ("type",) and base[:1] == ("providers",):
            message = f"{message}; provider type must be one of {', '.join(PROVIDER_TYPES)}"
        elif message == "Object missing required field `type`" and base[:1] == ("providers",):
            message = f"missing 'type'; one of {', '.join(PROVIDER_TYPES)}"
        if (*base, *path) in self.env_failed:
            return  # already reported: the variable that should have filled it is missing
        self.add((*base, *path), message)

    def check_tracing(self, tracing: TracingConfig | None) -> None:
        """Tracing needs the ``otel`` extra: say so at load (``resillm check``, serve), not
        with a crash at the first request."""
        if tracing is None:
            return
        endpoint = tracing.endpoint
        if endpoint is not None and not endpoint.startswith(("http://", "https://")):
            self.add(("tracing", "endpoint"), f"expected an http(s):// URL, got {endpoint!r}")
        if not tracing.enabled:
            return
        missing = [m for m in _TRACING_MODULES[tracing.exporter] if not _importable(m)]
        if missing:
            self.add(
                ("tracing", "enabled"),
                f"tracing needs OpenTelemetry ({', '.join(missing)} is not installed): "
                "pip install 'resillm[otel]'",
            )

    def check_references(
        self, providers: dict[str, Any], models: dict[str, ModelConfig], auth: AuthConfig | None
    ) -> None:
        for alias, model in models.items():
            for index, target in enumerate(model.targets):
                if target.provider not in providers:
                    self.add(
                        ("models", alias, "targets", index, "provider"),
                        f"unknown provider {target.provider!r}; defined: {', '.join(providers)}",
                    )
            for index, fallback in enumerate(model.fallbacks):
                if fallback not in models or fallback == alias:
                    self.add(
                        ("models", alias, "fallbacks", index),
                        f"fallback {fallback!r} is not another model alias",
                    )
        if auth is None:
            return
        self.check_unique(auth, "name", lambda k: k.name)
        self.check_unique(auth, "key", lambda k: k.key)
        for index, client_key in enumerate(auth.keys):
            for j, alias in enumerate(client_key.models or ()):
                if alias not in models:
                    self.add(
                        ("auth", "keys", index, "models", j),
                        f"model {alias!r} is not a configured alias",
                    )

    def check_server(self, server: ServerConfig | None) -> None:
        """A zero would cut every connection at once (or, for uvicorn, never)."""
        if server is None:
            return
        for field in ("keep_alive_timeout", "read_timeout", "body_timeout", "send_timeout"):
            value = getattr(server, field)
            if value is not None and value <= 0:
                off = "" if field == "keep_alive_timeout" else " (null turns it off)"
                self.add(("server", field), f"must be a duration greater than 0{off}")

    def check_cache(self, cache: CacheConfig | None) -> None:
        if cache is None:
            return
        for field in ("ttl", "redis_timeout", "coalesce_timeout"):
            if getattr(cache, field) <= 0:
                self.add(("cache", field), "must be a duration greater than 0")
        if cache.enabled and cache.backend == "redis" and importlib.util.find_spec("redis") is None:
            self.add(
                ("cache", "backend"),
                "the redis backend needs the redis client: pip install 'resillm[redis]'",
            )

    def check_budget(self, budget: BudgetConfig | None) -> None:
        if budget is None:
            return
        for field in ("snapshot_interval", "redis_timeout"):
            if getattr(budget, field) <= 0:
                self.add(("budget", field), "must be a duration greater than 0")
        if budget.store == "redis" and importlib.util.find_spec("redis") is None:
            self.add(
                ("budget", "store"),
                "the redis store needs the redis client: pip install 'resillm[redis]'",
            )

    def check_unique(self, auth: AuthConfig, field: str, get: Callable[[Any], str]) -> None:
        seen: set[str] = set()
        for index, client_key in enumerate(auth.keys):
            value = get(client_key)
            if value in seen:
                self.add(("auth", "keys", index, field), f"duplicate client key {field}")
            seen.add(value)


_OTEL_SDK = "opentelemetry.sdk.trace"
_TRACING_MODULES = {
    "otlp": (_OTEL_SDK, "opentelemetry.exporter.otlp.proto.http.trace_exporter"),
    "zipkin": (_OTEL_SDK, "opentelemetry.exporter.zipkin.json"),
    "console": (_OTEL_SDK,),
}


def _importable(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it (parents aside)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _parse_path(text: str) -> ConfigPath:
    tokens: list[str | int] = []
    for name, index in _PATH_TOKEN_RE.findall(text):
        if name:
            tokens.append(name)
        elif index != "...":
            tokens.append(int(index))
    return tuple(tokens)


def _dotted(path: ConfigPath) -> str:
    out = ""
    for token in path:
        out += f"[{token}]" if isinstance(token, int) else (f".{token}" if out else token)
    return out
