"""Ray Serve application graph: ingress -> query encoder -> 3 expert heads -> index shards (DESIGN.md section 3).

`serve run serve_config.yaml` calls `geoloc_ray.serve.app:build_app(args)`; `geoloc-ray serve` calls
`serve_locally(cfg)`. Importing this package is light: Ray Serve, FastAPI and torch load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"build_app": "app", "serve_locally": "app", "AppArgs": "settings", "APP_NAME": "settings"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
