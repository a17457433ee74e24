"""``PullWakePlugin``: mounts the ``/v1`` API, owns the pool and Redis client in a lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import copy
import dataclasses
import itertools
import logging
import re
import socket
import typing
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any

import msgspec
import uvicorn
from litestar import Litestar, Request, Response, Router, get, route
from litestar.app import DEFAULT_OPENAPI_CONFIG
from litestar.config.app import AppConfig
from litestar.di import Provide
from litestar.exceptions import HTTPException
from litestar.handlers import HTTPRouteHandler
from litestar.plugins import InitPlugin
from litestar.plugins.prometheus import PrometheusConfig
from litestar.utils.scope.state import ScopeState

from pullwake import __version__
from pullwake.authcache import listening
from pullwake.config import Settings
from pullwake.errors import ConfigError, InvalidRequest, Unavailable
from pullwake.http.auth import Authenticate
from pullwake.http.claims import claim_routes
from pullwake.http.deps import (
    NO_HTTP_METRICS,
    STATE_KEY,
    ServicesDep,
    provide_principal,
    provide_pullwake,
    provide_services,
)
from pullwake.http.docs import (
    PullwakeOperation,
    StrictStructSchema,
    add_security_components,
    openapi_config,
    unavailable,
)
from pullwake.http.entities import entity_routes
from pullwake.http.host import PullWake
from pullwake.http.problems import exception_handlers, problem_response
from pullwake.http.runners import runner_routes
from pullwake.metrics import CONTENT_TYPE, render, workers_by_state
from pullwake.publish import WebhookEnqueuer
from pullwake.services import Services, open_services
from pullwake.text import clean_json, find_unstorable, loads_lenient, may_hold_unstorable
from pullwake.wire import MAX_JSON_DEPTH, Base, FieldError, json_encoder, json_too_deep

__all__ = ["DrainingServer", "PullWakeConfig", "PullWakePlugin", "check_settings", "create_app"]

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
        message = str(exc)
        choices = _choices(field.annotation, key) if "enum value" in message else ()
        if choices:
            message += f": expected one of {', '.join(map(str, choices))}"
        raise InvalidRequest(
            f"invalid body: {message}",
            errors=[FieldError(message=message, key=key, source="body")],
        ) from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"malformed JSON body: {exc}") from None


def _choices(annotation: Any, key: str) -> tuple[Any, ...]:
    """The values the body field at ``key`` (``a.b[0].c``) allows, when it is a ``Literal``."""
    kind = msgspec.inspect.type_info(annotation)
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", key):
        kind = _unwrap(kind, msgspec.inspect.StructType, msgspec.inspect.ListType)
        if part.startswith("[") and isinstance(kind, msgspec.inspect.ListType):
            kind = kind.item_type
        elif isinstance(kind, msgspec.inspect.StructType):
            field = next((f for f in kind.fields if f.encode_name == part), None)
            if field is None:
                return ()
            kind = field.type
        else:
            return ()
    kind = _unwrap(kind, msgspec.inspect.LiteralType)
    return tuple(kind.values) if isinstance(kind, msgspec.inspect.LiteralType) else ()


def _unwrap(kind: msgspec.inspect.Type, *wanted: type[msgspec.inspect.Type]) -> Any:
    """``kind``, or the first of its union's members that is one of ``wanted``."""
    if isinstance(kind, msgspec.inspect.UnionType):
        return next((t for t in kind.types if isinstance(t, wanted)), kind)
    return kind


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
        FieldError(message=message, key=key, source="body")
        for key, message in itertools.islice(find_unstorable(value), 10)
    ]
    if errors:
        detail = "; ".join(f"{e.key or 'the body'} {e.message}" for e in errors)
        raise InvalidRequest(f"invalid body: {detail}", errors=errors)
    if not dirty:
        return body
    # The handler decodes the cleaned value, not the body as sent.
    ScopeState.from_scope(request.scope).json = value
    return json_encoder.encode(value)


async def healthz() -> dict[str, str]:
    return {"status": "ok"}


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
    return problem_response(
        503,
        "UNAVAILABLE",
        "Service unavailable",
        f"not ready: {body}",
        headers={"Retry-After": "1"},
    )


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
    renders them with pullwake's own series. Wake streams are left out (``opt={NO_HTTP_METRICS:
    True}``): an hour-long request says nothing as a duration, ``pullwake_wake_streams`` counts
    them, and the middleware's per-request state cost every open stream about 3 KB and every
    keep-alive a wrapper call."""
    return PrometheusConfig(
        app_name="pullwake",
        prefix="pullwake_http",
        group_path=True,
        exclude_opt_key=NO_HTTP_METRICS,
    )


def ops_routes(config: PullWakeConfig) -> list[HTTPRouteHandler]:
    """``/healthz``, ``/readyz`` and ``/metrics`` at the paths ``config`` gives (None: off)."""
    handlers = []
    if config.health_path is not None:
        handlers.append(
            get(
                config.health_path,
                summary="Liveness",
                description="Always 200 while the process serves requests; checks nothing else.",
                operation_id="getLiveness",
            )(healthz)
        )
    if config.ready_path is not None:
        handlers.append(
            get(
                config.ready_path,
                summary="Readiness",
                description="200 when Postgres and Redis answer (and, under `pullwake dev`, the "
                "in-process worker can work), else 503 UNAVAILABLE naming what is down. "
                "`workers` counts the worker processes by state, from their status rows.",
                operation_id="getReadiness",
                responses=unavailable(),
                operation_class=PullwakeOperation,
            )(readyz)
        )
    if config.metrics_path is not None:
        handlers.append(
            get(
                config.metrics_path,
                summary="Prometheus metrics",
                description="Prometheus text exposition format; no authentication.",
                operation_id="getMetrics",
                media_type=CONTENT_TYPE,
            )(metrics)
        )
    return handlers


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


def check_settings(settings: Settings, *, needs_arq: bool) -> None:
    """ConfigError naming every setting the API cannot start without (one line)."""
    missing = [
        f"PULLWAKE_{name.upper()}"
        for name in ("database_url", "redis_url")
        if not getattr(settings, name)
    ]
    if needs_arq and settings.redis_cluster and not settings.arq_redis_url:
        missing.append("PULLWAKE_ARQ_REDIS_URL (arq's queue needs a standalone Redis)")
    if missing:
        raise ConfigError(
            f"pullwake cannot start: {' and '.join(missing)} not set (set it in the "
            "environment, or pass Settings(...) to PullWakePlugin)"
        )


@dataclass
class PullWakeConfig:
    """What :class:`PullWakePlugin` mounts and how (``PullWakePlugin(PullWakeConfig(...))``)."""

    settings: Settings | None = None
    """pullwake's settings; None reads them from the ``PULLWAKE_*`` environment variables when
    the plugin is created."""
    path: str = "/v1"
    """Where the API is mounted."""
    authenticate: Authenticate | None = None
    """A host hook mapping a request to a :class:`~pullwake.model.Principal` (None falls through
    to API tokens); see the README's Embedding section."""
    webhooks: WebhookEnqueuer | None = None
    """Where webhook wakes are enqueued; None opens an arq connection (``pullwake worker``
    delivers them)."""
    dependency_key: str | None = "pullwake"
    """The app-level dependency through which the host's own handlers get a
    :class:`~pullwake.http.host.PullWake`; None adds none. pullwake's own routes resolve their
    dependencies on their own routers, whatever the host app's dependencies are named."""
    health_path: str | None = "/healthz"
    """Where the liveness probe is served; None: not served."""
    ready_path: str | None = "/readyz"
    """Where the readiness probe is served; None: not served."""
    metrics_path: str | None = "/metrics"
    """Where the Prometheus metrics are served; None: not served."""
    docs_path: str = "/schema"
    """Where the docs (Swagger UI, ``openapi.json``) are served when the app has not configured
    OpenAPI itself."""
    dashboard_path: str | None = None
    """Where the operator dashboard is served (``"/ui"``); None (the default): not served. It
    uses the API's authentication (an API token entered once, then a session cookie; dev mode
    and the ``authenticate`` hook as for the API). See the README's Dashboard section."""

    def resolved(self) -> PullWakeConfig:
        """This config with its settings read from the environment when not given."""
        if self.settings is not None:
            return self
        return dataclasses.replace(self, settings=Settings.from_env())


class PullWakePlugin(InitPlugin):
    """Litestar plugin: ``Litestar(plugins=[PullWakePlugin()])`` serves the pullwake API.

    ``PullWakePlugin(PullWakeConfig(...))``; the older ``PullWakePlugin(settings,
    authenticate=..., webhooks=..., path=...)`` still works (the keywords override the config).
    """

    __slots__ = ("_config", "_loop", "_services")

    def __init__(
        self,
        config: PullWakeConfig | Settings | None = None,
        *,
        authenticate: Authenticate | None = None,
        webhooks: WebhookEnqueuer | None = None,
        path: str | None = None,
    ) -> None:
        if config is None or isinstance(config, Settings):
            config = PullWakeConfig(settings=config)
        changes: dict[str, Any] = {"authenticate": authenticate, "webhooks": webhooks, "path": path}
        changes = {name: value for name, value in changes.items() if value is not None}
        self._config = dataclasses.replace(config, **changes).resolved()
        self._services: Services | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def config(self) -> PullWakeConfig:
        """The plugin's configuration (its settings resolved)."""
        return self._config

    @property
    def settings(self) -> Settings:
        """pullwake's settings."""
        assert self._config.settings is not None  # resolved() in __init__
        return self._config.settings

    @property
    def pullwake(self) -> PullWake:
        """In-process access for code outside a request (a background task of the host app);
        Unavailable while the app is not started."""
        if self._services is None:
            raise Unavailable("pullwake is not started")
        return PullWake(self._services)

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        """Register routes, dependencies, error handlers, OpenAPI and the lifespan."""
        check_settings(self.settings, needs_arq=self._config.webhooks is None)
        self._register_routes(app_config)
        self._register_dependencies(app_config)
        for key, handler in exception_handlers.items():
            app_config.exception_handlers.setdefault(key, handler)
        self._register_openapi(app_config)
        app_config.lifespan.append(self.lifespan)
        return app_config

    def _register_routes(self, app_config: AppConfig) -> None:
        """The API router, and the probes and metrics on a router of their own: both resolve
        ``services`` themselves, so a host dependency of that name never reaches them."""
        handlers = [*runner_routes, *entity_routes, *claim_routes]
        own = {"services": Provide(provide_services, sync_to_thread=False)}
        api = Router(
            path=self._config.path,
            # OPTIONS first: a path's first handler decides whether Litestar adds its own.
            route_handlers=[*options_handlers(handlers), *handlers],
            dependencies={**own, "principal": Provide(provide_principal)},
            tags=["pullwake"],
            request_max_body_size=self.settings.max_body_bytes,
            before_request=strict_json_body,
            middleware=[http_metrics().middleware],
        )
        app_config.route_handlers.append(api)
        if self._config.dashboard_path is not None:
            from pullwake.http.dashboard import dashboard_router  # jinja2 only when it is on

            app_config.route_handlers.append(dashboard_router(self._config.dashboard_path))
        ops = ops_routes(self._config)
        if ops:
            app_config.route_handlers.append(
                Router(
                    path="/",
                    route_handlers=ops,
                    dependencies=own,
                    tags=["operations"],
                    middleware=[http_metrics().middleware],
                )
            )

    def _register_dependencies(self, app_config: AppConfig) -> None:
        """The host's way in: ``<dependency_key>: NamedDependency[PullWake]``."""
        key = self._config.dependency_key
        if key is None:
            return
        if key in app_config.dependencies:
            raise ConfigError(
                f"the app already has a dependency named {key!r}: give pullwake's another name "
                "with PullWakePlugin(PullWakeConfig(dependency_key=...)), or None for none"
            )
        app_config.dependencies[key] = Provide(provide_pullwake, sync_to_thread=False)

    def _register_openapi(self, app_config: AppConfig) -> None:
        """pullwake's docs when the app has not configured OpenAPI; the Bearer schemes and the
        strict request schemas either way."""
        StrictStructSchema.install(app_config.plugins)
        current = app_config.openapi_config
        if current is None:  # the host turned OpenAPI off
            return
        if current is DEFAULT_OPENAPI_CONFIG:
            app_config.openapi_config = openapi_config(__version__, self._config.docs_path)
            return
        own = copy.copy(current)  # never change a config object the host may share
        add_security_components(own)
        app_config.openapi_config = own

    @asynccontextmanager
    async def lifespan(self, app: Litestar) -> AsyncIterator[None]:
        """Open the Postgres pool, the Redis client and the auth cache's listener; close them
        on shutdown."""
        async with contextlib.AsyncExitStack() as stack:
            webhooks = self._config.webhooks
            if webhooks is None:
                from pullwake.tasks import ArqEnqueuer

                webhooks = await stack.enter_async_context(ArqEnqueuer.open(self.settings))
            services = await stack.enter_async_context(
                open_services(
                    self.settings, webhooks=webhooks, authenticate=self._config.authenticate
                )
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


def create_app(settings: PullWakeConfig | Settings | None = None, **plugin_kwargs: Any) -> Litestar:
    """The standalone app: a thin wrapper around :class:`PullWakePlugin` (``settings`` is
    anything the plugin takes first; given settings, their ``dashboard_path`` decides whether
    the dashboard is served)."""
    if not isinstance(settings, PullWakeConfig):  # pullwake serve: PULLWAKE_DASHBOARD_PATH
        resolved = settings if settings is not None else Settings.from_env()
        settings = PullWakeConfig(settings=resolved, dashboard_path=resolved.dashboard_path)
    # logging_config=None: the process (CLI, host app) owns logging; Litestar would install its own.
    return Litestar(plugins=[PullWakePlugin(settings, **plugin_kwargs)], logging_config=None)
