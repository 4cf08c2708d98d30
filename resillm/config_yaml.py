"""A config file's YAML: the document and where each key stands in it.

ruamel's round-trip loader is used only to learn where each key and value is, so an error
names its line. ruamel is imported for each read and let go of afterwards unless it was
loaded before: its modules, about 1.5 MB, would otherwise stay in every gateway process
for the sake of a reload now and then (which imports it again, in some 10 ms).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

ConfigPath = tuple[str | int, ...]
Locations = dict[ConfigPath, tuple[int, int]]


class YamlProblem(Exception):
    """The text is not YAML ruamel can read; ``line``/``column`` are 1-based when known."""

    def __init__(self, message: str, line: int | None = None, column: int | None = None) -> None:
        super().__init__(message)
        self.message, self.line, self.column = message, line, column


@contextmanager
def yaml_document(text: str) -> Iterator[tuple[Any, Locations]]:
    """The document (ruamel's nodes, usable inside the block) and each key path's 1-based
    (line, column); raises :class:`YamlProblem`."""
    with _ruamel() as yaml:
        document = _parse(yaml, text)
        yield document, _locate(document)


@contextmanager
def _ruamel() -> Iterator[ModuleType]:
    loaded = "ruamel.yaml" in sys.modules
    import ruamel.yaml
    import ruamel.yaml.error

    try:
        yield ruamel.yaml
    finally:
        if not loaded:
            for module in [m for m in sys.modules if m == "ruamel" or m.startswith("ruamel.")]:
                del sys.modules[module]


def _parse(yaml: ModuleType, text: str) -> Any:
    try:
        return yaml.YAML(typ="rt", pure=True).load(text)
    except yaml.error.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        message = " ".join(str(p) for p in (exc.context, exc.problem) if p)
        line = mark.line + 1 if mark is not None else None
        column = mark.column + 1 if mark is not None else None
        raise YamlProblem(message, line, column) from None
    except yaml.error.YAMLError as exc:  # unmarked: a control character the reader refuses
        raise YamlProblem(str(exc)) from None
    except TypeError:  # ruamel cannot hash a mapping or list used as a key: "? {a: 1}"
        raise YamlProblem("a key must be a scalar") from None
    except (IndexError, ValueError):  # ruamel's own slips on odd scalars, such as "+_"
        raise YamlProblem("unreadable scalar") from None


def _locate(node: Any, path: ConfigPath = (), out: Locations | None = None) -> Locations:
    out = {} if out is None else out
    # ruamel's CommentedMap and CommentedSeq, told by their line and column records.
    if isinstance(node, dict) and hasattr(node, "lc"):
        for key in node:
            line, col = node.lc.key(key)
            out[(*path, str(key))] = (line + 1, col + 1)
            _locate(node[key], (*path, str(key)), out)
    elif isinstance(node, list) and hasattr(node, "lc"):
        for index, item in enumerate(node):
            line, col = node.lc.item(index)
            out[(*path, index)] = (line + 1, col + 1)
            _locate(item, (*path, index), out)
    return out
