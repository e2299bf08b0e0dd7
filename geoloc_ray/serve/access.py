"""The API key, checked in front of everything else: a request without the key learns nothing about the body
it sent (401 comes before 413 / 400 / 422) nor about the deployment.

With a key set: /search and /thumbnail need it; /healthz answers without it but with its status only (the
ingress trims it); the page `/` is public (it asks for the key); /docs and /openapi.json follow the `docs`
switch: off (404 for everyone), public, or key (need the key when one is set). With no key set, only `docs: off`
changes anything.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

from geoloc_ray.serve.errors import error_response

KEY_HEADER = "X-API-Key"
DOC_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
OPEN_PATHS = frozenset({"/", "/healthz"})


def key_ok(expected: str | None, given: str | None) -> bool:
    """True when no key is configured, or `given` is it (constant-time compare)."""
    return not expected or bool(given) and hmac.compare_digest(given.encode(), expected.encode())


def _app_path(scope: dict) -> str:
    """The path under the app's route prefix (Serve puts the prefix in root_path; the path may include it)."""
    path, root = scope.get("path", "/"), scope.get("root_path", "").rstrip("/")
    if root and path.startswith(root):
        path = path[len(root):]
    return path or "/"


def _header(scope: dict, name: str) -> str | None:
    wanted = name.lower().encode()
    for key, value in scope.get("headers") or []:
        if key.lower() == wanted:
            return value.decode("latin-1")
    return None


class KeyGate:
    """ASGI middleware, outermost: `policy()` gives the current (api_key, docs mode) of the replica, so a key
    rotated through reconfigure applies to the next request. `on_reject(path)` counts a refusal (metrics)."""

    def __init__(self, app: Any, policy: Callable[[], tuple[str | None, str]],
                 on_reject: Callable[[str], None] = lambda path: None):
        self.app, self.policy, self.on_reject = app, policy, on_reject

    def _refusal(self, path: str, key: str | None, docs: str, given: str | None) -> tuple[int, str, str] | None:
        if path in DOC_PATHS:
            if docs == "off":
                return 404, "not_found", "the API documentation is switched off on this server"
            if docs == "public":
                return None
        elif path in OPEN_PATHS:
            return None
        if key_ok(key, given):
            return None
        return 401, "unauthorized", f"missing or wrong {KEY_HEADER} header"

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        key, docs = self.policy()
        path = _app_path(scope)
        refusal = self._refusal(path, key, docs, _header(scope, KEY_HEADER))
        if refusal is None:
            await self.app(scope, receive, send)
            return
        status, code, detail = refusal
        if status == 401:
            self.on_reject(path)
        headers = {"WWW-Authenticate": "APIKey"} if status == 401 else None
        await error_response(status, code, detail, headers=headers)(scope, receive, send)
