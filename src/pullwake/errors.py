"""One exception tree; every class carries a stable ``code`` and its HTTP status."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from pullwake.wire import FieldError

__all__ = [
    "AlreadyClaimed",
    "ConfigError",
    "EntityNotRunnable",
    "Fenced",
    "Forbidden",
    "IdempotencyMismatch",
    "InvalidOffset",
    "InvalidRequest",
    "LeaseExpired",
    "NotFound",
    "OwnerMismatch",
    "PayloadTooLarge",
    "PullwakeError",
    "RateLimited",
    "RunnerDisabled",
    "Unauthorized",
    "Unavailable",
]


class PullwakeError(Exception):
    """Base of every error pullwake reports to a caller."""

    code: ClassVar[str] = "INTERNAL"
    status: ClassVar[int] = 500
    title: ClassVar[str] = "Internal server error"

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
    """Invalid configuration (raised at start-up, never over HTTP)."""

    code = "CONFIG_ERROR"


class InvalidRequest(PullwakeError):
    code = "INVALID_REQUEST"
    status = 400
    title = "Invalid request"


class Unauthorized(PullwakeError):
    code = "UNAUTHORIZED"
    status = 401
    title = "Unauthorized"


class Forbidden(PullwakeError):
    """The caller may not act on this resource: not its owner, creator or member, a claim
    token for another claim, or over a per-principal quota (``detail`` says which)."""

    code = "FORBIDDEN"
    status = 403
    title = "Forbidden"


OwnerMismatch = Forbidden
"""In 0.1.0 "owned by another principal" had a code of its own, ``OWNER_MISMATCH``; it is
``FORBIDDEN`` now, like every other refusal on ownership. The name stays for old imports."""


class NotFound(PullwakeError):
    code = "NOT_FOUND"
    status = 404
    title = "Not found"


class AlreadyClaimed(PullwakeError):
    code = "ALREADY_CLAIMED"
    status = 409
    title = "Already claimed"


class RunnerDisabled(PullwakeError):
    code = "RUNNER_DISABLED"
    status = 409
    title = "Runner disabled"


class Fenced(PullwakeError):
    code = "FENCED"
    status = 409
    title = "Claim fenced"


class LeaseExpired(PullwakeError):
    code = "LEASE_EXPIRED"
    status = 409
    title = "Claim lease expired"


class InvalidOffset(PullwakeError):
    code = "INVALID_OFFSET"
    status = 409
    title = "Invalid offset"


class EntityNotRunnable(PullwakeError):
    code = "ENTITY_NOT_RUNNABLE"
    status = 409
    title = "Entity not runnable"


class IdempotencyMismatch(PullwakeError):
    code = "IDEMPOTENCY_MISMATCH"
    status = 409
    title = "Idempotency key reused"


class PayloadTooLarge(PullwakeError):
    code = "PAYLOAD_TOO_LARGE"
    status = 413
    title = "Payload too large"


class RateLimited(PullwakeError):
    code = "RATE_LIMITED"
    status = 429
    title = "Rate limited"

    def __init__(self, detail: str, *, retry_after_s: int = 1, **extra: Any) -> None:
        super().__init__(detail, retry_after_s=retry_after_s, **extra)
        self.retry_after_s = retry_after_s


class Unavailable(PullwakeError):
    code = "UNAVAILABLE"
    status = 503
    title = "Service unavailable"
