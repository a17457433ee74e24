"""The client's exceptions: one class per problem ``code`` the API answers with.

They mirror :mod:`pullwake.errors` by name and code, but are a tree of their own rooted at
:class:`PullwakeClientError`, for two reasons. The server's classes carry ``status`` as a class
constant while a client error must carry what the response said (status, title, field errors,
Retry-After). And the server's classes are what :class:`pullwake.http.PullWakePlugin` turns into
problem responses: a remote 404 raised as :class:`pullwake.errors.NotFound` inside a host app
that also mounts the plugin would silently become that app's own 404.
"""

from __future__ import annotations

import email.utils
import math
import time
from datetime import UTC
from typing import Any, ClassVar

import httpx
import msgspec

from pullwake import errors as server_errors
from pullwake.wire import Problem

__all__ = [
    "AlreadyClaimed",
    "Conflict",
    "EntityNotRunnable",
    "Fenced",
    "Forbidden",
    "IdempotencyMismatch",
    "InternalError",
    "InvalidOffset",
    "InvalidRequest",
    "InvalidResponse",
    "LeaseExpired",
    "MethodNotAllowed",
    "NotAcceptable",
    "NotFound",
    "OwnerMismatch",
    "PayloadTooLarge",
    "PullwakeClientError",
    "RateLimited",
    "RunnerDisabled",
    "Unauthorized",
    "Unavailable",
    "Unreachable",
    "UnsupportedMediaType",
    "error_for",
    "error_from_response",
    "parse_retry_after",
]


class PullwakeClientError(Exception):
    """A call that failed: the server's problem details, or why there were none.

    ``status`` is the HTTP status (0: no response, see :class:`Unreachable`), ``code`` the
    problem's stable code, ``errors`` its per-field errors, ``retry_after`` the seconds the
    server asked to wait (``Retry-After``), when it did.
    """

    code_name: ClassVar[str | None] = None
    """The problem ``code`` this class stands for (None: the base, for codes it doesn't know)."""

    def __init__(
        self,
        detail: str,
        *,
        status: int = 0,
        code: str | None = None,
        title: str = "",
        type: str = "",
        errors: list[dict[str, Any]] | None = None,
        retry_after: float | None = None,
        extra: dict[str, Any] | None = None,
        response: httpx.Response | None = None,
    ) -> None:
        self.status = status
        self.code = code or self.code_name or "HTTP_ERROR"
        self.detail = detail
        self.title = title
        self.type = type
        self.errors = errors
        self.retry_after = retry_after
        self.extra = extra or {}
        self.response = response
        super().__init__(
            f"{self.code} ({status}): {detail}" if status else f"{self.code}: {detail}"
        )


class InvalidRequest(PullwakeClientError):
    code_name = "INVALID_REQUEST"


class Unauthorized(PullwakeClientError):
    code_name = "UNAUTHORIZED"


class Forbidden(PullwakeClientError):
    code_name = "FORBIDDEN"


class NotFound(PullwakeClientError):
    code_name = "NOT_FOUND"


class MethodNotAllowed(PullwakeClientError):
    code_name = "METHOD_NOT_ALLOWED"


class NotAcceptable(PullwakeClientError):
    code_name = "NOT_ACCEPTABLE"


class Conflict(PullwakeClientError):
    """A 409 the server had no more specific code for."""

    code_name = "CONFLICT"


class AlreadyClaimed(PullwakeClientError):
    code_name = "ALREADY_CLAIMED"


class RunnerDisabled(PullwakeClientError):
    code_name = "RUNNER_DISABLED"


class Fenced(PullwakeClientError):
    code_name = "FENCED"


class LeaseExpired(PullwakeClientError):
    code_name = "LEASE_EXPIRED"


class InvalidOffset(PullwakeClientError):
    code_name = "INVALID_OFFSET"


class EntityNotRunnable(PullwakeClientError):
    code_name = "ENTITY_NOT_RUNNABLE"


class IdempotencyMismatch(PullwakeClientError):
    code_name = "IDEMPOTENCY_MISMATCH"


class PayloadTooLarge(PullwakeClientError):
    code_name = "PAYLOAD_TOO_LARGE"


class UnsupportedMediaType(PullwakeClientError):
    code_name = "UNSUPPORTED_MEDIA_TYPE"


class RateLimited(PullwakeClientError):
    code_name = "RATE_LIMITED"


class InternalError(PullwakeClientError):
    code_name = "INTERNAL"


class Unavailable(PullwakeClientError):
    code_name = "UNAVAILABLE"


class Unreachable(PullwakeClientError):
    """No HTTP answer: the connection failed or timed out (``status`` 0); the httpx error is
    the ``__cause__``."""

    code_name = "UNREACHABLE"


class InvalidResponse(PullwakeClientError):
    """A success status whose body is not what this client expects (another server, or a
    version that changed a type)."""

    code_name = "INVALID_RESPONSE"


_BY_CODE: dict[str, type[PullwakeClientError]] = {
    cls.code_name: cls
    for cls in PullwakeClientError.__subclasses__()
    if cls.code_name is not None and cls not in (Unreachable, InvalidResponse)
}
_BY_CODE["OWNER_MISMATCH"] = Forbidden  # what a 0.1.0 server answered for another's runner

OwnerMismatch = Forbidden
"""A 0.1.0 server answered ``OWNER_MISMATCH`` for another principal's runner or entity
type; servers since answer ``FORBIDDEN``. The name stays for old ``except`` clauses."""

_CODE_BY_STATUS = {
    cls.status: cls.code
    for cls in server_errors.ERRORS
    if server_errors.error_for_status(cls.status) is cls
}
"""The code of an answer without problem details (a proxy's 502 page, say): the one the
server itself gives that status when it has no more specific code
(:func:`pullwake.errors.error_for_status`)."""


def error_for(code: str) -> type[PullwakeClientError]:
    """The class of a problem ``code``; the base class for a code this client doesn't know."""
    return _BY_CODE.get(code, PullwakeClientError)


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date); None if absent or invalid."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:  # "-0000": UTC, with no claim about the local zone
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return max(seconds, 0.0)


_problem_decoder = msgspec.json.Decoder(Problem)


def error_from_response(response: httpx.Response) -> PullwakeClientError:
    """The exception for an error response: its problem details when it has them."""
    retry_after = parse_retry_after(response.headers.get("retry-after"))
    problem = None
    media_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type.endswith("json"):
        try:
            problem = _problem_decoder.decode(response.content)
        except msgspec.DecodeError:
            problem = None
    if problem is None:
        code = _CODE_BY_STATUS.get(response.status_code, "HTTP_ERROR")
        text = " ".join(response.text.split())[:200]
        reason = response.reason_phrase or "error"
        detail = f"HTTP {response.status_code} {reason}" + (f": {text}" if text else "")
        return error_for(code)(
            detail,
            status=response.status_code,
            code=code,
            retry_after=retry_after,
            response=response,
        )
    extra = dict(problem.extra or {})
    if retry_after is None and isinstance(extra.get("retry_after_s"), int | float):
        retry_after = float(extra["retry_after_s"])
    return error_for(problem.code)(
        problem.detail,
        status=response.status_code,
        code=problem.code,
        title=problem.title,
        type=problem.type,
        errors=[msgspec.structs.asdict(e) for e in problem.errors] if problem.errors else None,
        retry_after=retry_after,
        extra=extra,
        response=response,
    )
