"""Services shared by the routes, and their Litestar dependency providers."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Request
from litestar.di import NamedDependency
from litestar.params import Parameter

from pullwake.errors import Unavailable
from pullwake.http.auth import resolve_principal
from pullwake.http.host import PullWake
from pullwake.model import ID_PATTERN, Principal
from pullwake.services import Services

__all__ = [
    "NO_HTTP_METRICS",
    "IdParam",
    "PrincipalDep",
    "PullWakeDep",
    "Services",
    "ServicesDep",
    "provide_principal",
    "provide_pullwake",
    "provide_services",
]

IdParam = Annotated[str, Parameter(pattern=ID_PATTERN, max_length=128)]
STATE_KEY = "pullwake"


def provide_services(request: Request[Any, Any, Any]) -> Services:
    """The app's services (503 while the app is starting or stopping)."""
    services: Services | None = request.app.state.get(STATE_KEY)
    if services is None:
        raise Unavailable("pullwake is not started")
    return services


def provide_pullwake(request: Request[Any, Any, Any]) -> PullWake:
    """The host app's in-process access to pullwake (503 while not started)."""
    return PullWake(provide_services(request))


async def provide_principal(
    request: Request[Any, Any, Any], services: NamedDependency[Services]
) -> Principal:
    """The authenticated caller."""
    return await resolve_principal(
        request, services.tokens, services.settings, services.authenticate
    )


ServicesDep = NamedDependency[Services]
PullWakeDep = NamedDependency[PullWake]
"""A host handler's parameter ``pullwake: PullWakeDep`` (the default dependency key)."""
PrincipalDep = NamedDependency[Principal]


NO_HTTP_METRICS = "pullwake_no_http_metrics"
"""A route handler ``opt`` key: the HTTP request metrics (Litestar's Prometheus middleware)
and the OpenTelemetry server spans leave the route out."""
