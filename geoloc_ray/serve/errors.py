"""Every error is a JSON body `{"error": code, "detail": message}`; bad input is always a 4xx.

FastAPI's own answers (422 validation, 400 unparsable body, 404/405 routing) are reshaped into the same body.
Only what is honestly the server's fault is a 5xx: 503 when no expert or no index shard answered, and 500 for
a bug (logged).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("ray.serve")
MAX_BODY_BYTES = 64 * 1024  # a query is at most a few KB of JSON


class ApiError(Exception):
    """An answer the ingress chose to give: status, machine-readable code and a message."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers


def error_response(status: int, code: str, detail: str, errors: list[dict] | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": code, "detail": detail}
    if errors is not None:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, headers=headers)


def _status_code_name(status: int) -> str:
    if status == 413:  # Python's phrase is the old "Request Entity Too Large" (RFC 9110: Content Too Large)
        return "content_too_large"
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "error"


def _field_errors(exc: RequestValidationError) -> list[dict]:
    # Only loc / msg / type: `input` may hold undecodable bytes or a huge string.
    return [{"loc": ".".join(str(p) for p in e.get("loc", ())), "msg": str(e.get("msg", "")),
             "type": str(e.get("type", ""))} for e in exc.errors()]


def install_error_handlers(api: FastAPI, on_invalid: Callable[[Request], None]) -> None:
    """Register the JSON error shapes on `api`; `on_invalid` counts rejected requests (metrics)."""

    @api.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        on_invalid(request)
        errors = _field_errors(exc)
        if any(e["type"] == "json_invalid" for e in errors):
            return error_response(400, "invalid_json", "the body is not valid JSON", errors)
        detail = "; ".join(f"{e['loc']}: {e['msg']}" for e in errors) or "invalid request"
        return error_response(422, "invalid_request", detail, errors)

    @api.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if 400 <= exc.status_code < 500:
            on_invalid(request)
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 400 and "parsing the body" in detail:
            detail = "the body could not be decoded (it must be UTF-8 JSON)"
        return error_response(exc.status_code, _status_code_name(exc.status_code), detail,
                              headers=getattr(exc, "headers", None))

    @api.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.detail, headers=exc.headers)

    @api.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error answering %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "unexpected server error (logged)")



class BodyLimit:
    """ASGI middleware: bodies over `max_bytes` get a JSON 413 (declared length up front, chunked ones as read).

    FastAPI's own `max_body_size` answers in plain text; this keeps the one error shape.
    """

    def __init__(self, app: Any, max_bytes: int = MAX_BODY_BYTES):
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self) -> StarletteHTTPException:
        return StarletteHTTPException(413, f"the body must be at most {self.max_bytes} bytes")

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            exc = self._too_large()
            await error_response(413, "content_too_large", exc.detail)(scope, receive, send)
            return
        seen = 0

        async def counting_receive() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:  # raised inside the endpoint's body read: the 413 handler answers
                raise self._too_large()
            return message

        await self.app(scope, counting_receive, send)
