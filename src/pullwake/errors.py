"""One exception tree; every class carries a stable ``code`` and its HTTP status.

This module is the one source of the API's error codes: :data:`ERRORS` lists every class the API
answers with (one per code), :func:`error_for_status` names the class of an answer that has no
more specific code (a framework's 405, say), and the problem responses, the OpenAPI document's
response descriptions and the client's fallback codes are derived from them. Each class's
docstring says when it happens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from pullwake.wire import FieldError

__all__ = [
    "ERRORS",
    "AlreadyClaimed",
    "ConfigError",
    "Conflict",
    "EntityNotRunnable",
    "Fenced",
    "Forbidden",
    "IdempotencyMismatch",
    "InvalidOffset",
    "InvalidRequest",
    "LeaseExpired",
    "MethodNotAllowed",
    "NotAcceptable",
    "NotFound",
    "OwnerMismatch",
    "PayloadTooLarge",
    "PullwakeError",
    "RateLimited",
    "RunnerDisabled",
    "Unauthorized",
    "Unavailable",
    "UnsupportedMediaType",
    "error_for_code",
    "error_for_status",
    "summary",
]


class PullwakeError(Exception):
    """Base of every error pullwake reports to a caller; raised as itself (``INTERNAL``, 500),
    an unexpected fault on the server, which logs it."""

    code: ClassVar[str] = "INTERNAL"
    status: ClassVar[int] = 500
    title: ClassVar[str] = "Internal server error"
    answered: ClassVar[bool] = True
    """Whether the HTTP API answers with this class (False: raised at start-up only)."""
    status_default: ClassVar[bool] = True
    """Whether this class is the one for an answer of its ``status`` without a more specific
    code. Read from the class's own attributes only (:func:`error_for_status`), not inherited."""

    def __init__(
        self, detail: str, *, errors: Sequence[FieldError] | None = None, **extra: Any
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = list(errors) if errors else None
        """The invalid values, answered as the problem's ``errors[]``."""
        self.extra = extra
        """Context answered as the problem's ``extra``."""


class ConfigError(PullwakeError):
    """Invalid configuration: a setting that cannot be parsed or a combination that cannot
    work (raised at start-up, never over HTTP)."""

    code = "CONFIG_ERROR"
    answered = False


class InvalidRequest(PullwakeError):
    """A path, query or body value is malformed (named in ``detail`` and ``errors``): bad
    JSON, nesting too deep, a failed validation, an unknown field, a limit too large, no
    dispatch policy, a refused webhook URL."""

    code = "INVALID_REQUEST"
    status = 400
    title = "Invalid request"
    status_default = True


class Unauthorized(PullwakeError):
    """Missing, unknown or revoked credentials, or the wrong kind of token for the endpoint."""

    code = "UNAUTHORIZED"
    status = 401
    title = "Unauthorized"
    status_default = True


class Forbidden(PullwakeError):
    """The caller may not act on this resource: not its owner, creator or member, a claim
    token for another claim, or over a per-principal quota (``detail`` says which)."""

    code = "FORBIDDEN"
    status = 403
    title = "Forbidden"
    status_default = True


OwnerMismatch = Forbidden
"""In 0.1.0 "owned by another principal" had a code of its own, ``OWNER_MISMATCH``; it is
``FORBIDDEN`` now, like every other refusal on ownership. The name stays for old imports."""


class NotFound(PullwakeError):
    """An unknown runner, entity, entity type, wake, claim or route."""

    code = "NOT_FOUND"
    status = 404
    title = "Not found"
    status_default = True


class MethodNotAllowed(PullwakeError):
    """A method the path does not take (answered by the framework's router)."""

    code = "METHOD_NOT_ALLOWED"
    status = 405
    title = "Method not allowed"
    status_default = True


class NotAcceptable(PullwakeError):
    """The request's ``Accept`` rules out every media type the route answers with (answered
    by the framework)."""

    code = "NOT_ACCEPTABLE"
    status = 406
    title = "Not acceptable"
    status_default = True


class Conflict(PullwakeError):
    """A 409 that has no more specific code (answered by the framework)."""

    code = "CONFLICT"
    status = 409
    title = "Conflict"
    status_default = True


class AlreadyClaimed(PullwakeError):
    """The entity already has an active claim (``extra.claim_id``)."""

    code = "ALREADY_CLAIMED"
    status = 409
    title = "Already claimed"


class RunnerDisabled(PullwakeError):
    """A wake stream, claim or spawn on a runner an admin disabled."""

    code = "RUNNER_DISABLED"
    status = 409
    title = "Runner disabled"


class Fenced(PullwakeError):
    """A stale epoch, a claim that was released or failed, or a claim token that is no longer
    active: a newer holder owns the entity's work."""

    code = "FENCED"
    status = 409
    title = "Claim fenced"


class LeaseExpired(PullwakeError):
    """The claim's lease passed before a heartbeat renewed it; its work was handed on."""

    code = "LEASE_EXPIRED"
    status = 409
    title = "Claim lease expired"


class InvalidOffset(PullwakeError):
    """A done's ``acked_offset`` is behind the offset already acked or past the inbox tail
    (``extra.acked_offset``, ``extra.tail_offset``)."""

    code = "INVALID_OFFSET"
    status = 409
    title = "Invalid offset"


class EntityNotRunnable(PullwakeError):
    """A send or signal to an entity that is ``stopped`` or ``killed``."""

    code = "ENTITY_NOT_RUNNABLE"
    status = 409
    title = "Entity not runnable"


class IdempotencyMismatch(PullwakeError):
    """A send reuses an entity's idempotency key with another payload (the same JSON value,
    however spelled, is a duplicate, not a mismatch)."""

    code = "IDEMPOTENCY_MISMATCH"
    status = 409
    title = "Idempotency key reused"


class PayloadTooLarge(PullwakeError):
    """The request body, or a message or event payload, is over its size limit."""

    code = "PAYLOAD_TOO_LARGE"
    status = 413
    title = "Payload too large"
    status_default = True


class UnsupportedMediaType(PullwakeError):
    """A body whose ``Content-Type`` is not JSON (``application/json`` or ``...+json``)."""

    code = "UNSUPPORTED_MEDIA_TYPE"
    status = 415
    title = "Unsupported media type"
    status_default = True


class RateLimited(PullwakeError):
    """Over the send rate of the principal or the open wake streams of the runner; retry after
    the ``Retry-After`` header's seconds (``retry_after_s``)."""

    code = "RATE_LIMITED"
    status = 429
    title = "Rate limited"
    status_default = True

    def __init__(self, detail: str, *, retry_after_s: int = 1, **extra: Any) -> None:
        super().__init__(detail, retry_after_s=retry_after_s, **extra)
        self.retry_after_s = retry_after_s


class Unavailable(PullwakeError):
    """Postgres or Redis cannot be reached, or the app has not started yet; retry after the
    ``Retry-After`` header's seconds."""

    code = "UNAVAILABLE"
    status = 503
    title = "Service unavailable"
    status_default = True


def _classes(root: type[PullwakeError]) -> list[type[PullwakeError]]:
    """``root`` and its subclasses, depth first in definition order."""
    found = [root]
    for sub in root.__subclasses__():
        found += _classes(sub)
    return found


ERRORS: tuple[type[PullwakeError], ...] = tuple(
    cls for cls in _classes(PullwakeError) if cls.answered and cls.__module__ == __name__
)
"""Every error class the HTTP API answers with, one per ``code`` (tests check they are
unique), in definition order: the registry the problem responses, the OpenAPI document and the
client derive from."""

_BY_CODE = {cls.code: cls for cls in ERRORS}
_BY_STATUS = {cls.status: cls for cls in ERRORS if vars(cls).get("status_default", False)}


def error_for_code(code: str) -> type[PullwakeError] | None:
    """The class of a problem ``code``; None for a code the API does not answer with."""
    return _BY_CODE.get(code)


def error_for_status(status: int) -> type[PullwakeError] | None:
    """The class of an answer of ``status`` that has no more specific code (what the
    framework's own 404, 405 or 415 answers carry); None for a status the API has none for."""
    return _BY_STATUS.get(status)


def summary(cls: type[PullwakeError]) -> str:
    """The first paragraph of the class's docstring, on one line: when the error happens."""
    text = (cls.__doc__ or "").strip().split("\n\n")[0]
    return " ".join(text.split())
