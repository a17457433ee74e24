"""``PullWakePlugin``: mounts the ``/v1`` API, owns the pool and Redis client in a lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import logging
import re
import socket
import typing
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

import msgspec
import uvicorn
from litestar import Litestar, Request, Response, Router, get, route
from litestar.config.app import AppConfig
from litestar.di import Provide
from litestar.exceptions import HTTPException
from litestar.handlers import HTTPRouteHandler
from litestar.openapi.config import OpenAPIConfig
from litestar.plugins import InitPluginProtocol
from litestar.plugins.prometheus import PrometheusConfig
from litestar.utils.scope.state import ScopeState

from pullwake.authcache import listening
from pullwake.config import Settings
from pullwake.errors import InvalidRequest
from pullwake.http.auth import Authenticate
from pullwake.http.claims import claim_routes
from pullwake.http.deps import (
    STATE_KEY,
    ServicesDep,
    provide_principal,
    provide_services,
)
from pullwake.http.docs import install_strict_struct_schema, problems
from pullwake.http.entities import entity_routes
from pullwake.http.problems import exception_handlers, problem_response
from pullwake.http.runners import runner_routes
from pullwake.metrics import CONTENT_TYPE, render, workers_by_state
from pullwake.publish import WebhookEnqueuer
from pullwake.services import Services, open_services
from pullwake.text import clean_json, find_unstorable, loads_lenient, may_hold_unstorable
from pullwake.wire import MAX_JSON_DEPTH, Base, json_encoder, json_too_deep

__all__ = ["DrainingServer", "PullWakePlugin", "create_app"]

log = logging.getLogger(__name__)


# The plugins whose lifespan runs under the current DrainingServer: the server sets a list before
# it starts, and the lifespan task it creates inherits the context. This finds the plugins however
# uvicorn got the app (an object, an import string or a factory in a worker process).
_SERVED_PLUGINS: contextvars.ContextVar[list[PullWakePlugin] | None] = contextvars.ContextVar(
    "pullwake_served_plugins", default=None
)

_AT_PATH = re.compile(r" - at `\$\.?([^`]*)`$")


async def strict_json_body(request: Request[Any, Any, Any]) -> None:
    """Refuse non-JSON bodies (415), malformed or too deeply nested JSON (400), and validate
    JSON bodies strictly (no ``"1"`` for ``1``).

    Litestar converts bodies leniently; the strict decode here runs first so a string never
    passes for a number or a boolean. Requiring a JSON content type also keeps browsers from
    sending "simple" cross-origin requests (which matters in dev mode, where no credentials is
    a principal). The depth check keeps a hostile body from recursing the decoder out of the
    stack (a 500) or storing a message no reader could decode. Text Postgres cannot store
    (NUL, lone surrogates) is refused here too, naming the field, instead of failing the write.
    """
    field = request.route_handler.parsed_data_field
    if field is None:
        return
    body = await request.body()
    if not body:
        return
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise HTTPException(
            status_code=415,
            detail=f"the body must be JSON (Content-Type: application/json), got {media_type!r}",
        )
    if json_too_deep(body):
        raise InvalidRequest(f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels")
    if may_hold_unstorable(body):
        body = _screen_text(request, body, _runner_text(field.annotation))
    try:
        msgspec.json.decode(body, type=field.annotation)
    except msgspec.ValidationError as exc:
        match = _AT_PATH.search(str(exc))
        key = match.group(1) if match else ""
        raise InvalidRequest(
            f"invalid body: {exc}",
            errors=[{"message": str(exc), "key": key, "source": "body"}],
        ) from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"malformed JSON body: {exc}") from None


def _has_unstorable(value: Any, name: str) -> bool:
    return isinstance(value, dict) and next(find_unstorable(value.get(name)), None) is not None


def _runner_text(annotation: Any) -> tuple[str, ...]:
    """The body struct's runner free-text fields (``X | None`` bodies included)."""
    for kind in (annotation, *typing.get_args(annotation)):
        if isinstance(kind, type) and issubclass(kind, Base):
            return kind.runner_text
    return ()


def _screen_text(
    request: Request[Any, Any, Any], body: bytes, runner_text: tuple[str, ...]
) -> bytes:
    """Refuse text Postgres cannot store (400 naming each field), except in the runner's own
    free text, which is cleaned; returns the body the handler will decode."""
    try:
        value = loads_lenient(body)
    except ValueError:
        return body  # malformed: the strict decode reports it
    dirty = [name for name in runner_text if _has_unstorable(value, name)]
    for name in dirty:
        value[name] = clean_json(value[name])
    errors = [
        {"key": key, "message": message, "source": "body"}
        for key, message in itertools.islice(find_unstorable(value), 10)
    ]
    if errors:
        detail = "; ".join(f"{e['key'] or 'the body'} {e['message']}" for e in errors)
        raise InvalidRequest(f"invalid body: {detail}", errors=errors)
    if not dirty:
        return body
    # The handler decodes the cleaned value, not the body as sent.
    ScopeState.from_scope(request.scope).json = value
    return json_encoder.encode(value)


@get("/healthz", summary="Liveness", include_in_schema=True)
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@get(
    "/readyz",
    summary="Readiness: Postgres and Redis reachable (and the in-process worker able to work)",
    responses={503: problems()[503]},
)
async def readyz(services: ServicesDep) -> Any:
    postgres = await services.store.ping()
    redis = await services.streams.ping()
    body: dict[str, Any] = {
        "postgres": "ok" if postgres else "down",
        "redis": "ok" if redis else "down",
    }
    worker = services.worker_health
    if worker is not None:  # the in-process worker of ``pullwake dev`` must be able to work
        body["worker"] = "ok" if worker.ready() else "down"
    if postgres:  # workers deployed on their own, from their status rows: informational
        body["workers"] = await workers_by_state(services.store)
    if postgres and redis and body.get("worker", "ok") == "ok":
        return {"status": "ready", **body}
    return problem_response(503, "UNAVAILABLE", "Service unavailable", f"not ready: {body}")


@get("/metrics", summary="Prometheus metrics", media_type=CONTENT_TYPE)
async def metrics(services: ServicesDep) -> Response[bytes]:
    text = await render(
        services.store,
        wake_streams=services.wake_reader.sessions,
        top_runners=services.settings.metrics_top_runners,
    )
    return Response(text, media_type=CONTENT_TYPE)


def http_metrics() -> PrometheusConfig:
    """Litestar's Prometheus middleware: ``pullwake_http_requests_total`` and
    ``pullwake_http_request_duration_seconds`` by method, route template (``group_path``: never
    the raw path, whose ids would make a series per entity) and status code; ``/metrics``
    renders them with pullwake's own series."""
    return PrometheusConfig(app_name="pullwake", prefix="pullwake_http", group_path=True)


def options_handlers(handlers: list[HTTPRouteHandler]) -> list[HTTPRouteHandler]:
    """Explicit OPTIONS handlers whose ``Allow`` lists every method of the path.

    Litestar's automatic OPTIONS handler only lists the methods of the first handler registered
    for a path (``OPTIONS /v1/runners`` said ``OPTIONS, POST`` and left out ``GET``).
    """
    methods: dict[str, set[str]] = defaultdict(set)
    for handler in handlers:
        for path in handler.paths:
            methods[path] |= set(handler.http_methods)
    return [_options(path, ", ".join(sorted(m | {"OPTIONS"}))) for path, m in methods.items()]


def _options(path: str, allow: str) -> HTTPRouteHandler:
    @route(path, http_method="OPTIONS", include_in_schema=False, name=f"options {path}")
    async def options() -> Response[None]:
        return Response(None, status_code=204, headers={"Allow": allow})

    return options


class PullWakePlugin(InitPluginProtocol):
    """Litestar plugin: ``Litestar(plugins=[PullWakePlugin()])`` serves the pullwake API."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        authenticate: Authenticate | None = None,
        webhooks: WebhookEnqueuer | None = None,
        path: str = "/v1",
    ) -> None:
        self.settings = settings or Settings.from_env()
        self.authenticate = authenticate
        self.webhooks = webhooks
        self.path = path
        self._services: Services | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        """Register routes, dependencies, error handlers and the lifespan."""
        handlers = [*runner_routes, *entity_routes, *claim_routes]
        router = Router(
            path=self.path,
            # OPTIONS first: a path's first handler decides whether Litestar adds its own.
            route_handlers=[*options_handlers(handlers), *handlers],
            dependencies={"principal": Provide(provide_principal)},
            tags=["pullwake"],
            request_max_body_size=self.settings.max_body_bytes,
            before_request=strict_json_body,
        )
        app_config.route_handlers.extend([router, healthz, readyz, metrics])
        app_config.middleware.append(http_metrics().middleware)
        app_config.dependencies.setdefault(
            "services", Provide(provide_services, sync_to_thread=False)
        )
        for key, handler in exception_handlers.items():
            app_config.exception_handlers.setdefault(key, handler)
        app_config.lifespan.append(self.lifespan)
        install_strict_struct_schema(app_config.plugins)
        if app_config.openapi_config is None:
            app_config.openapi_config = OpenAPIConfig(title="pullwake", version="0.1.0")
        return app_config

    @asynccontextmanager
    async def lifespan(self, app: Litestar) -> AsyncIterator[None]:
        """Open the Postgres pool, the Redis client and the auth cache's listener; close them
        on shutdown."""
        async with contextlib.AsyncExitStack() as stack:
            webhooks = self.webhooks
            if webhooks is None:
                from pullwake.tasks import ArqEnqueuer

                webhooks = await stack.enter_async_context(ArqEnqueuer.open(self.settings))
            services = await stack.enter_async_context(
                open_services(self.settings, webhooks=webhooks, authenticate=self.authenticate)
            )
            # Cached tokens and runners, dropped as Postgres announces changes (one connection).
            await stack.enter_async_context(listening(services.auth_cache, self.settings))
            app.state[STATE_KEY] = services
            self._services, self._loop = services, asyncio.get_running_loop()
            served = _SERVED_PLUGINS.get()
            if served is not None:
                served.append(self)
            try:
                yield
            finally:
                if served is not None:
                    served.remove(self)
                app.state.pop(STATE_KEY, None)
                services.draining.set()
                self._services = None

    def begin_drain(self) -> None:
        """Shutdown is starting: end open wake streams now (thread- and signal-safe), so
        runners reconnect to another replica at once instead of after the server's grace."""
        if self._services is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._services.draining.set)


class DrainingServer(uvicorn.Server):
    """``uvicorn.Server`` that tells :class:`PullWakePlugin` when a shutdown signal arrives."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.plugins: list[PullWakePlugin] = []  # filled by their lifespans, see _SERVED_PLUGINS

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        """Serve; the app's plugins register themselves here when their lifespan starts."""
        _SERVED_PLUGINS.set(self.plugins)
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        for plugin in self.plugins:
            plugin.begin_drain()
        super().handle_exit(sig, frame)

    def drain_and_exit(self) -> None:
        """Programmatic shutdown (tests, ``pullwake dev``): drain, then stop."""
        for plugin in self.plugins:
            plugin.begin_drain()
        self.should_exit = True


def create_app(settings: Settings | None = None, **plugin_kwargs: Any) -> Litestar:
    """The standalone app: a thin wrapper around :class:`PullWakePlugin`."""
    # logging_config=None: the process (CLI, host app) owns logging; Litestar would install its own.
    return Litestar(plugins=[PullWakePlugin(settings, **plugin_kwargs)], logging_config=None)
