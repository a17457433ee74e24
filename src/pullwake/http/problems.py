"""The one place errors become RFC 9457 problem+json responses."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from redis.exceptions import RedisError

from pullwake.errors import PullwakeError, error_for_status
from pullwake.wire import FieldError, Problem

__all__ = ["exception_handlers", "problem_response"]

log = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"


def problem_response(
    status: int,
    code: str,
    title: str,
    detail: str,
    *,
    errors: Sequence[FieldError] | None = None,
    extra: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> Response[Problem]:
    """Build a problem+json response with pullwake's stable ``code``."""
    body = Problem(
        type=f"https://pullwake.dev/problems/{code.lower().replace('_', '-')}",
        title=title,
        status=status,
        detail=detail,
        code=code,
        errors=list(errors) if errors else None,
        extra=extra or None,
    )
    return Response(body, status_code=status, media_type=PROBLEM_MEDIA_TYPE, headers=headers)


def _pullwake_error(request: Request[Any, Any, Any], exc: PullwakeError) -> Response[Problem]:
    if exc.status >= 500 and exc.code != "UNAVAILABLE":
        log.error("internal error on %s %s: %s", request.method, request.url.path, exc.detail)
    headers = None
    if exc.status in (429, 503):
        headers = {"Retry-After": str(exc.extra.get("retry_after_s", 1))}
    return problem_response(
        exc.status,
        exc.code,
        exc.title,
        exc.detail,
        errors=exc.errors,
        extra=dict(exc.extra),
        headers=headers,
    )


def _validation_errors(exc: ValidationException) -> list[FieldError]:
    """Litestar's validation details as :class:`FieldError` items."""
    extra = exc.extra
    if not isinstance(extra, list):
        return []
    out = []
    for item in extra:
        if not isinstance(item, dict):
            continue
        message, key = str(item.get("message", "invalid")), str(item.get("key") or "")
        source = item.get("source") or "body"
        source = str(getattr(source, "value", source))  # Litestar's ParamType is an Enum
        if key == "data" and message == "'data'":
            # Litestar reports a missing body as the bare KeyError text "'data'".
            message, key, source = "a JSON request body is required", "", "body"
        out.append(FieldError(message=message, key=key, source=_source(source)))
    return out


def _source(raw: str) -> Any:
    """Litestar's parameter location as a FieldError source (``body`` when unknown)."""
    return raw if raw in ("body", "query", "path", "header", "cookie") else "body"


def _http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Problem]:
    status = exc.status_code
    known = error_for_status(status if status < 500 else 500)
    code, title = (known.code, known.title) if known else ("HTTP_ERROR", "HTTP error")
    if status >= 500:
        log.error("HTTP %d on %s %s: %s", status, request.method, request.url.path, exc.detail)
    detail = str(exc.detail) if exc.detail else title
    errors = None
    if isinstance(exc, ValidationException):
        errors = _validation_errors(exc)
        if errors:
            detail = "; ".join(e.message + (f" (at {e.key})" if e.key else "") for e in errors)
    headers = dict(exc.headers or {}) or None
    return problem_response(status, code, title, detail, errors=errors or None, headers=headers)


def _unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[Problem]:
    log.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem_response(
        500, "INTERNAL", "Internal server error", "an unexpected error occurred; it was logged"
    )


def _redis_down(request: Request[Any, Any, Any], exc: RedisError) -> Response[Problem]:
    log.warning("Redis unavailable on %s %s: %s", request.method, request.url.path, exc)
    return problem_response(
        503,
        "UNAVAILABLE",
        "Service unavailable",
        f"Redis unavailable: {type(exc).__name__}; retry shortly",
        headers={"Retry-After": "1"},
    )


exception_handlers: dict[type[Exception] | int, Any] = {
    PullwakeError: _pullwake_error,
    HTTPException: _http_error,
    RedisError: _redis_down,
    Exception: _unexpected,
}
