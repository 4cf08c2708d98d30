"""Raw-ASGI middleware layers, one a module; composed in :mod:`resillm.app`."""
