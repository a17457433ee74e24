"""A Python client for senders and admins of a pullwake server, over HTTP.

    from pullwake.client import AsyncClient

    async with AsyncClient("https://pullwake.example.com", "pwk_...") as client:
        sent = await client.send("/job/42", {"text": "hi"}, idempotency_key="msg-1")

:class:`AsyncClient` and :class:`Client` (blocking) make the same calls and answer the server's
own types (:mod:`pullwake.wire`). A failed call raises a subclass of
:class:`PullwakeClientError` named after the problem's ``code`` (``NotFound``, ``Forbidden``,
``RateLimited``, ...). Runners use :mod:`pullwake.runner` instead.
"""

from __future__ import annotations

from pullwake.client._async import AsyncClient
from pullwake.client._calls import HealthVerdict, RunnerHealthView
from pullwake.client._sync import Client
from pullwake.client.errors import (
    AlreadyClaimed,
    Conflict,
    EntityNotRunnable,
    Fenced,
    Forbidden,
    IdempotencyMismatch,
    InternalError,
    InvalidOffset,
    InvalidRequest,
    InvalidResponse,
    LeaseExpired,
    MethodNotAllowed,
    NotAcceptable,
    NotFound,
    OwnerMismatch,
    PayloadTooLarge,
    PullwakeClientError,
    RateLimited,
    RunnerDisabled,
    Unauthorized,
    Unavailable,
    Unreachable,
    UnsupportedMediaType,
)
from pullwake.client.retry import NO_RETRY, RetryPolicy
from pullwake.wire import (
    BatchItem,
    BatchResult,
    DispatchPolicy,
    EntityTypeView,
    EntityView,
    EventPage,
    EventView,
    InitialMessage,
    ItemProblem,
    MessagePage,
    MessageView,
    RunnerTarget,
    RunnerView,
    SendResponse,
    WakeRef,
    WakeView,
    WebhookTarget,
)

__all__ = [
    "NO_RETRY",
    "AlreadyClaimed",
    "AsyncClient",
    "BatchItem",
    "BatchResult",
    "Client",
    "Conflict",
    "DispatchPolicy",
    "EntityNotRunnable",
    "EntityTypeView",
    "EntityView",
    "EventPage",
    "EventView",
    "Fenced",
    "Forbidden",
    "HealthVerdict",
    "IdempotencyMismatch",
    "InitialMessage",
    "InternalError",
    "InvalidOffset",
    "InvalidRequest",
    "InvalidResponse",
    "ItemProblem",
    "LeaseExpired",
    "MessagePage",
    "MessageView",
    "MethodNotAllowed",
    "NotAcceptable",
    "NotFound",
    "OwnerMismatch",
    "PayloadTooLarge",
    "PullwakeClientError",
    "RateLimited",
    "RetryPolicy",
    "RunnerDisabled",
    "RunnerHealthView",
    "RunnerTarget",
    "RunnerView",
    "SendResponse",
    "Unauthorized",
    "Unavailable",
    "Unreachable",
    "UnsupportedMediaType",
    "WakeRef",
    "WakeView",
    "WebhookTarget",
]
