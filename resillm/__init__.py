"""resillm: a resilient, OpenAI-compatible LLM gateway.

Nothing runs at import. ``create_app`` builds the ASGI gateway::

    from resillm import create_app
    gateway = create_app("resillm.yaml")     # a path, a dict or a Config
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from os import PathLike

    from resillm.app import Gateway
    from resillm.config import Config


def create_app(config: str | PathLike[str] | dict[str, Any] | Config | None = None) -> Gateway:
    """Build the gateway ASGI app from a config file path, a dict or a ``Config``.

    With no argument the file is ``$RESILLM_CONFIG``, else ``./resillm.yaml``.
    """
    from resillm.app import create_app as _create_app

    return _create_app(config)


__all__ = ["__version__", "create_app"]
