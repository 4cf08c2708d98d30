"""``${VAR}`` and ``${VAR:-default}`` in config strings, and getting them past YAML.

``{key: ${VAR}}`` is not valid YAML (``{`` cannot start a plain scalar inside a flow
mapping), yet it is how everyone writes it. So before parsing, each ``${...}`` is swapped
for a same-width placeholder YAML reads as plain text (keeping every column right for
error messages), and put back and expanded afterwards, string by string.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

# Private-use characters: printable for YAML, absent from real configs. A placeholder is
# MARK index MARK, padded with PAD to the width of the ``${...}`` it stands for.
_MARK, _PAD = "\ue000", "\ue001"
_HIDDEN_RE = re.compile(f"{_MARK}(\\d+){_MARK}{_PAD}*")
_ENV_RE = re.compile(r"\$(\$)?\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def hide_env_tokens(text: str) -> tuple[str, list[str]]:
    """The text with each ``${...}`` replaced by a placeholder, and the tokens hidden."""
    tokens: list[str] = []

    def hide(match: re.Match[str]) -> str:
        tokens.append(match.group(0))
        mark = f"{_MARK}{len(tokens) - 1}{_MARK}"
        return mark.ljust(len(match.group(0)), _PAD)

    return _ENV_RE.sub(hide, text), tokens


def unhide(value: str, hidden: list[str]) -> str:
    """Put the hidden ``${...}`` tokens back into ``value``."""
    if _MARK not in value:
        return value
    return _HIDDEN_RE.sub(lambda m: hidden[int(m.group(1))], value)


def expand(value: str, missing: Callable[[str], None]) -> str:
    """Expand ``${VAR}`` and ``${VAR:-default}`` (``$${`` is a literal ``${``). As in shells,
    an unset or empty variable takes the default; ``missing(name)`` is told of a variable
    with neither a value nor a default (it then expands to nothing)."""
    if "$" not in value:
        return value

    def substitute(match: re.Match[str]) -> str:
        escaped, name, default = match.groups()
        if escaped:
            return match.group(0)[1:]
        found = os.environ.get(name)
        if found:
            return found
        if default is not None:
            return default
        if found is not None:
            return found
        missing(name)
        return ""

    return _ENV_RE.sub(substitute, value)
