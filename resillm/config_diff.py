"""What a config reload changes, said without secrets, and the report of a reload."""

from __future__ import annotations

from typing import Any

import msgspec

from resillm.config import Config

# Sections a running gateway cannot change: the listening socket and workers, and the
# tracer provider (built once at start).
RESTART_SECTIONS = ("server", "tracing")
# Single keys likewise: the budget store the gateway opened at start stays until restart.
RESTART_KEYS = {"budget": ("store", "redis_url", "redis_timeout")}


class ConfigChanges(msgspec.Struct):
    """Names only — never values, so no key or password can leak into a log line."""

    sections: list[str] = msgspec.field(default_factory=list)
    aliases_added: list[str] = msgspec.field(default_factory=list)
    aliases_removed: list[str] = msgspec.field(default_factory=list)
    aliases_changed: list[str] = msgspec.field(default_factory=list)
    providers_added: list[str] = msgspec.field(default_factory=list)
    providers_removed: list[str] = msgspec.field(default_factory=list)
    providers_changed: list[str] = msgspec.field(default_factory=list)
    restart_needed: list[str] = msgspec.field(default_factory=list)

    def empty(self) -> bool:
        return not any(msgspec.structs.astuple(self))


class ReloadReport(msgspec.Struct):
    """The answer of ``POST /admin/reload`` and the content of the reload log line."""

    applied: bool
    errors: list[str] = msgspec.field(default_factory=list)
    restart_needed: list[str] = msgspec.field(default_factory=list)
    changes: ConfigChanges | None = None


def _builtins(value: Any) -> Any:
    return msgspec.to_builtins(value, enc_hook=_plain)


def _plain(value: Any) -> Any:
    if isinstance(value, float):  # Duration
        return float(value)
    raise NotImplementedError(f"cannot compare {type(value).__name__}")


def diff_configs(old: Config, new: Config) -> ConfigChanges:
    changes = ConfigChanges()
    for field in msgspec.structs.fields(Config):
        if _builtins(getattr(old, field.name)) != _builtins(getattr(new, field.name)):
            changes.sections.append(field.name)
    _named(old.models, new.models, changes.aliases_added, changes.aliases_removed,
           changes.aliases_changed)  # fmt: skip
    _named(old.providers, new.providers, changes.providers_added, changes.providers_removed,
           changes.providers_changed)  # fmt: skip
    for section in RESTART_SECTIONS:
        before, after = _builtins(getattr(old, section)), _builtins(getattr(new, section))
        changes.restart_needed.extend(
            sorted(f"{section}.{key}" for key in after if before.get(key) != after[key])
        )
    for section, keys in RESTART_KEYS.items():
        before, after = _builtins(getattr(old, section)), _builtins(getattr(new, section))
        changes.restart_needed.extend(
            f"{section}.{key}" for key in keys if before.get(key) != after.get(key)
        )
    return changes


def _named(
    old: dict[str, Any],
    new: dict[str, Any],
    added: list[str],
    removed: list[str],
    changed: list[str],
) -> None:
    added.extend(sorted(set(new) - set(old)))
    removed.extend(sorted(set(old) - set(new)))
    changed.extend(
        sorted(name for name in set(old) & set(new) if _builtins(old[name]) != _builtins(new[name]))
    )
