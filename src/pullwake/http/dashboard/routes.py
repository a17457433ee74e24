"""The dashboard's routes: pages, the fragments their live regions poll, actions, static files."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import urlencode

import jinja2
from litestar import Request, Response, Router, get, post
from litestar.datastructures import Cookie
from litestar.di import Provide
from litestar.params import FromPath
from litestar.response import Redirect

from pullwake import __version__
from pullwake.config import DASHBOARD_PATH
from pullwake.errors import ConfigError, InvalidRequest, NotFound, PullwakeError
from pullwake.http.auth import ASSERTED_EMAIL, DEV_LOCAL, request_since
from pullwake.http.dashboard import views
from pullwake.http.dashboard.session import (
    COOKIE,
    CSRF_FIELD,
    CSRF_HEADER,
    LOGIN_COOKIE,
    SESSION_TTL_S,
    Session,
    Sessions,
    csrf_ok,
)
from pullwake.http.deps import ServicesDep, provide_services
from pullwake.inspect import STUCK_LIMIT, human_age
from pullwake.model import AdminStatus, Principal, Signal, hash_token
from pullwake.services import Services

__all__ = ["dashboard_router"]

_PACKAGE = "pullwake.http.dashboard"

# A private environment rather than the app's Litestar ``TemplateConfig``: the host app's own
# template engine, directories and settings stay untouched (an app has one TemplateConfig).
_templates = jinja2.Environment(
    loader=jinja2.PackageLoader(_PACKAGE, "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_templates.filters["age"] = human_age

_STATIC = {
    "htmx.min.js": "text/javascript; charset=utf-8",
    "htmx.LICENSE": "text/plain; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}


def _asset_version() -> str:
    """A digest of the static files: asset URLs change when they do (cached for a year)."""
    digest = hashlib.sha256(__version__.encode())
    for name in sorted(_STATIC):
        digest.update(resources.files(_PACKAGE).joinpath("static", name).read_bytes())
    return digest.hexdigest()[:12]


_ASSETS = _asset_version()
_HTML = "text/html; charset=utf-8"
_SECURITY_HEADERS = {
    # No inline script or style anywhere: htmx is configured (meta htmx-config) not to add its
    # indicator styles nor to eval.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
_ALLOWED_SIGNALS = {s.value for s in Signal}


class _NoViewer(Exception):
    """No session and no other way in: the login page (``ended``: the session was ended, the
    page says why)."""

    def __init__(self, why: str, *, ended: bool = False) -> None:
        super().__init__(why)
        self.ended = ended


@dataclass(frozen=True, slots=True)
class Viewer:
    """Who looks at the dashboard, and their session (``new``: its cookie must be set)."""

    principal: Principal
    session_id: str
    session: Session
    new: bool = False


@dataclass(frozen=True, slots=True)
class Dashboard:
    """The dashboard mounted at ``base`` (no trailing slash; "" at the root)."""

    base: str

    @property
    def cookie_path(self) -> str:
        return self.base or "/"

    def url(self, path: str, **query: str) -> str:
        return self.base + path + (f"?{urlencode(query)}" if query else "")

    # --- who is looking ------------------------------------------------------------------

    async def viewer(self, request: Request[Any, Any, Any], services: Services) -> Viewer:
        """The session's principal, the host hook's or dev mode's; _NoViewer otherwise. A
        session's API token is checked again on every request: revoked, the session ends."""
        sessions = Sessions(services)
        loaded = await sessions.load(request)
        if services.authenticate is not None:
            hooked = await services.authenticate(request)
            if hooked is not None:
                return await self._bound(sessions, loaded, "hook", hooked)
        if loaded is not None and loaded[1].kind == "token":
            session_id, session = loaded
            assert session.token_hash is not None
            principal = await services.tokens.authenticate_hash(
                session.token_hash, since=request_since(request)
            )
            if principal is None or principal.key != session.principal:
                await sessions.end(session_id)
                raise _NoViewer("the API token was revoked", ended=True)
            return Viewer(principal, session_id, session)
        if services.settings.dev_asserted_auth:
            email = request.headers.get(ASSERTED_EMAIL, "").strip()
            principal = DEV_LOCAL
            if email:
                try:
                    principal = Principal.parse(f"user:{email}")
                except ValueError:
                    raise _NoViewer(f"bad {ASSERTED_EMAIL} header") from None
            return await self._bound(sessions, loaded, "dev", principal)
        raise _NoViewer("log in with an API token")

    async def _bound(
        self,
        sessions: Sessions,
        loaded: tuple[str, Session] | None,
        kind: str,
        principal: Principal,
    ) -> Viewer:
        """The session of a principal that needs no login (host hook, dev mode): the loaded
        one when it is that principal's, else a new one (its CSRF token with it)."""
        if loaded is not None and loaded[1].kind == kind and loaded[1].principal == principal.key:
            return Viewer(principal, *loaded)
        session_id, session = await sessions.create(kind, principal=principal.key)
        return Viewer(principal, session_id, session, new=True)

    def cookie(
        self,
        request: Request[Any, Any, Any],
        session_id: str,
        *,
        end: bool = False,
        key: str = COOKIE,
    ) -> Cookie:
        return Cookie(
            key=key,
            value="" if end else session_id,
            path=self.cookie_path,
            max_age=0 if end else SESSION_TTL_S,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )

    # --- responses -----------------------------------------------------------------------

    def render(
        self,
        request: Request[Any, Any, Any],
        template: str,
        *,
        viewer: Viewer | None = None,
        csrf: str = "",
        status: int = 200,
        headers: dict[str, str] | None = None,
        **context: Any,
    ) -> Response[str]:
        context.setdefault("page", "")
        body = _templates.get_template(template).render(
            base=self.base,
            assets=_ASSETS,
            version=__version__,
            principal=None if viewer is None else viewer.principal.key,
            login=viewer is not None and viewer.session.kind == "token",
            csrf=viewer.session.csrf if viewer is not None else csrf,
            csrf_field=CSRF_FIELD,
            csrf_header=CSRF_HEADER,
            **context,
        )
        response = Response(
            body,
            status_code=status,
            media_type=_HTML,
            headers={**_SECURITY_HEADERS, **(headers or {})},
        )
        if viewer is not None and viewer.new:
            response.set_cookie(self.cookie(request, viewer.session_id))
        return response

    def login_redirect(self, request: Request[Any, Any, Any], why: _NoViewer) -> Response[Any]:
        """To the login page: a redirect, or for an htmx request (a live region's poll) a 204
        whose ``HX-Redirect`` sends the page there (a 401 would be an error in the console of
        every tab left open when a token is revoked).

        A browser arriving from a link on another site sends no ``SameSite=Strict`` cookie:
        such a request without one gets a page that reloads itself from here (a same-site
        navigation, which carries the cookie) instead of a login form."""
        target = self.url("/login", ended="revoked") if why.ended else self.url("/login")
        if request.headers.get("hx-request"):
            return Response(None, status_code=204, headers={"HX-Redirect": target})
        cross_site = request.headers.get("sec-fetch-site") == "cross-site"
        if cross_site and request.method == "GET" and COOKIE not in request.cookies:
            here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            if here.startswith("//"):  # never another host's URL
                here = self.url("/")
            return self.render(request, "bounce.html", here=here)
        return Redirect(target, status_code=303)

    async def page(
        self,
        request: Request[Any, Any, Any],
        services: Services,
        template: str,
        data: Callable[[Viewer], Awaitable[dict[str, Any]]],
    ) -> Response[Any]:
        """A page or a fragment: its data read for the viewer; not found is a 404 page."""
        try:
            viewer = await self.viewer(request, services)
        except _NoViewer as exc:
            return self.login_redirect(request, exc)
        try:
            context = await data(viewer)
        except NotFound as exc:
            fragment = bool(request.headers.get("hx-request"))  # a region, not a whole page
            return self.render(
                request,
                "_flash.html" if fragment else "error.html",
                ok=False,
                viewer=viewer,
                status=404,
                title="Not found",
                detail=exc.detail,
            )
        return self.render(request, template, viewer=viewer, **context)

    async def act(
        self,
        request: Request[Any, Any, Any],
        services: Services,
        work: Callable[[Principal, dict[str, str]], Awaitable[str]],
        back: str,
    ) -> Response[Any]:
        """A state-changing request: the session's CSRF token or a 403 (nothing changes), then
        the use case; its problem's detail is shown in the page, never a 500."""
        try:
            viewer = await self.viewer(request, services)
        except _NoViewer as exc:
            return self.login_redirect(request, exc)
        form = await _form(request)
        if not csrf_ok(viewer.session, request.headers.get(CSRF_HEADER) or form.get(CSRF_FIELD)):
            return self.forbidden(request, viewer)
        htmx = bool(request.headers.get("hx-request"))
        try:
            message = await work(viewer.principal, form)
        except PullwakeError as exc:
            template = "_flash.html" if htmx else "error.html"
            return self.render(
                request,
                template,
                viewer=viewer,
                status=exc.status,
                ok=False,
                title="The action failed",
                detail=exc.detail,
            )
        if not htmx:
            return Redirect(back, status_code=303)
        return self.render(
            request,
            "_flash.html",
            viewer=viewer,
            ok=True,
            detail=message,
            headers={"HX-Trigger": "pullwake-refresh"},
        )

    def forbidden(self, request: Request[Any, Any, Any], viewer: Viewer | None) -> Response[str]:
        template = "_flash.html" if request.headers.get("hx-request") else "error.html"
        return self.render(
            request,
            template,
            viewer=viewer,
            status=403,
            ok=False,
            title="Forbidden",
            detail="the CSRF token is missing or wrong: reload the page and try again",
        )


async def _form(request: Request[Any, Any, Any]) -> dict[str, str]:
    """The urlencoded or multipart form of a POST (anything else: empty)."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type not in ("application/x-www-form-urlencoded", "multipart/form-data"):
        return {}
    form = await request.form()
    return {k: v for k, v in form.items() if isinstance(v, str)}


def _dashboard(request: Request[Any, Any, Any]) -> Dashboard:
    dashboard: Dashboard = request.route_handler.opt["pullwake_dashboard"]
    return dashboard


# --- login -----------------------------------------------------------------------------------


@get("/login")
async def login_form(request: Request[Any, Any, Any], services: ServicesDep) -> Response[Any]:
    ui = _dashboard(request)
    sessions = Sessions(services)
    loaded = await sessions.load(request, LOGIN_COOKIE)
    notice = None
    if request.query_params.get("ended") == "revoked":
        notice = "Your session ended: its API token was revoked."
    if loaded is None:
        session_id, session = await sessions.create("anonymous")
        response = ui.render(request, "login.html", csrf=session.csrf, error=None, notice=notice)
        response.set_cookie(ui.cookie(request, session_id, key=LOGIN_COOKIE))
        return response
    return ui.render(request, "login.html", csrf=loaded[1].csrf, error=None, notice=notice)


@post("/login", status_code=200)
async def login(request: Request[Any, Any, Any], services: ServicesDep) -> Response[Any]:
    """An API token in, a new session out (never the old id: no session fixation)."""
    ui = _dashboard(request)
    sessions = Sessions(services)
    loaded = await sessions.load(request, LOGIN_COOKIE)
    form = await _form(request)
    session = None if loaded is None or loaded[1].kind != "anonymous" else loaded[1]
    if not csrf_ok(session, request.headers.get(CSRF_HEADER) or form.get(CSRF_FIELD)):
        return ui.forbidden(request, None)
    assert loaded is not None
    assert session is not None
    token = form.get("token", "").strip()
    principal = None
    if token.startswith("pwk_"):
        principal = await services.tokens.authenticate(token, since=request_since(request))
    if principal is None:
        error = (
            "a claim token (pwc_) cannot log in; use an API token (pwk_...)"
            if token.startswith("pwc_")
            else "the API token is unknown or revoked"
        )
        return ui.render(request, "login.html", csrf=session.csrf, error=error, notice=None)
    await sessions.end(loaded[0])
    previous = await sessions.load(request)
    if previous is not None:  # logging in again, maybe as another principal
        await sessions.end(previous[0])
    session_id, _ = await sessions.create(
        "token", principal=principal.key, token_hash=hash_token(token)
    )
    response: Response[Any] = Redirect(ui.url("/"), status_code=303)
    response.set_cookie(ui.cookie(request, session_id))
    response.set_cookie(ui.cookie(request, loaded[0], end=True, key=LOGIN_COOKIE))
    return response


@post("/logout", status_code=200)
async def logout(request: Request[Any, Any, Any], services: ServicesDep) -> Response[Any]:
    ui = _dashboard(request)
    sessions = Sessions(services)
    loaded = await sessions.load(request)
    form = await _form(request)
    if not csrf_ok(
        None if loaded is None else loaded[1],
        request.headers.get(CSRF_HEADER) or form.get(CSRF_FIELD),
    ):
        return ui.forbidden(request, None)
    assert loaded is not None
    await sessions.end(loaded[0])
    response: Response[Any] = Redirect(ui.url("/login"), status_code=303)
    response.set_cookie(ui.cookie(request, loaded[0], end=True))
    if request.headers.get("hx-request"):
        response.headers["HX-Redirect"] = ui.url("/login")
    return response


# --- overview --------------------------------------------------------------------------------


async def _overview(services: Services, viewer: Viewer) -> dict[str, Any]:
    data = await views.overview(services, viewer.principal)
    return {"o": data, "chart": views.chart_svg(data), "page": "overview"}


@get("/")
async def overview_page(request: Request[Any, Any, Any], services: ServicesDep) -> Response[Any]:
    return await _dashboard(request).page(
        request, services, "overview.html", lambda v: _overview(services, v)
    )


@get("/fragments/overview")
async def overview_fragment(
    request: Request[Any, Any, Any], services: ServicesDep
) -> Response[Any]:
    return await _dashboard(request).page(
        request, services, "_overview.html", lambda v: _overview(services, v)
    )


# --- runners ---------------------------------------------------------------------------------


async def _runners(
    services: Services, viewer: Viewer, request: Request[Any, Any, Any]
) -> dict[str, Any]:
    """``?sort=<column>&dir=asc|desc`` (anything else: by id, ascending)."""
    sort = request.query_params.get("sort", "id")
    sort = sort if sort in views.RUNNER_SORTS else "id"
    direction = "desc" if request.query_params.get("dir") == "desc" else "asc"
    rows = await views.runner_rows(services, viewer.principal, sort, direction == "desc")
    shown = rows[: views.MAX_RUNNER_ROWS]
    return {"rows": shown, "total": len(rows), "sort": sort, "dir": direction, "page": "runners"}


@get("/runners")
async def runners_page(request: Request[Any, Any, Any], services: ServicesDep) -> Response[Any]:
    return await _dashboard(request).page(
        request, services, "runners.html", lambda v: _runners(services, v, request)
    )


@get("/fragments/runners")
async def runners_fragment(request: Request[Any, Any, Any], services: ServicesDep) -> Response[Any]:
    return await _dashboard(request).page(
        request, services, "_runners.html", lambda v: _runners(services, v, request)
    )


async def _runner(services: Services, viewer: Viewer, runner_id: str) -> dict[str, Any]:
    page = await views.runner_page(services, viewer.principal, runner_id)
    return {"r": page, "page": "runners"}


@get("/runners/{runner_id:str}")
async def runner_page(
    request: Request[Any, Any, Any], services: ServicesDep, runner_id: FromPath[str]
) -> Response[Any]:
    return await _dashboard(request).page(
        request, services, "runner.html", lambda v: _runner(services, v, runner_id)
    )


@get("/runners/{runner_id:str}/fragment")
async def runner_fragment(
    request: Request[Any, Any, Any], services: ServicesDep, runner_id: FromPath[str]
) -> Response[Any]:
    return await _dashboard(request).page(
        request, services, "_runner.html", lambda v: _runner(services, v, runner_id)
    )


def _admin(services: Services, runner_id: str, status: AdminStatus) -> Any:
    async def work(principal: Principal, form: dict[str, str]) -> str:
        if not views.valid_id(runner_id):
            raise NotFound(f"runner {runner_id!r} does not exist")
        view = await services.runners.set_admin_status(principal, runner_id, status)
        return f"runner {view.id} is {view.admin_status} ({view.liveness})"

    return work


@post("/runners/{runner_id:str}/enable", status_code=200)
async def enable_runner(
    request: Request[Any, Any, Any], services: ServicesDep, runner_id: FromPath[str]
) -> Response[Any]:
    ui = _dashboard(request)
    work = _admin(services, runner_id, AdminStatus.ENABLED)
    return await ui.act(request, services, work, ui.url(f"/runners/{runner_id}"))


@post("/runners/{runner_id:str}/disable", status_code=200)
async def disable_runner(
    request: Request[Any, Any, Any], services: ServicesDep, runner_id: FromPath[str]
) -> Response[Any]:
    ui = _dashboard(request)
    work = _admin(services, runner_id, AdminStatus.DISABLED)
    return await ui.act(request, services, work, ui.url(f"/runners/{runner_id}"))


# --- entities --------------------------------------------------------------------------------


async def _entity(
    services: Services, viewer: Viewer, type_name: str, entity_id: str
) -> dict[str, Any]:
    page = await views.entity_page(services, viewer.principal, type_name, entity_id)
    return {"e": page, "page": "entity"}


@get("/entities/{type_name:str}/{entity_id:str}")
async def entity_page(
    request: Request[Any, Any, Any],
    services: ServicesDep,
    type_name: FromPath[str],
    entity_id: FromPath[str],
) -> Response[Any]:
    return await _dashboard(request).page(
        request, services, "entity.html", lambda v: _entity(services, v, type_name, entity_id)
    )


@get("/entities/{type_name:str}/{entity_id:str}/fragment")
async def entity_fragment(
    request: Request[Any, Any, Any],
    services: ServicesDep,
    type_name: FromPath[str],
    entity_id: FromPath[str],
) -> Response[Any]:
    return await _dashboard(request).page(
        request, services, "_entity.html", lambda v: _entity(services, v, type_name, entity_id)
    )


@post("/entities/{type_name:str}/{entity_id:str}/signal", status_code=200)
async def signal_entity(
    request: Request[Any, Any, Any],
    services: ServicesDep,
    type_name: FromPath[str],
    entity_id: FromPath[str],
) -> Response[Any]:
    ui = _dashboard(request)
    url = f"/{type_name}/{entity_id}"

    async def work(principal: Principal, form: dict[str, str]) -> str:
        name = form.get("signal", "")
        if name not in _ALLOWED_SIGNALS:
            raise InvalidRequest(f"signal must be one of {', '.join(sorted(_ALLOWED_SIGNALS))}")
        if not (views.valid_id(type_name) and views.valid_id(entity_id)):
            raise NotFound(f"entity {url} does not exist")
        view = await services.dispatcher.signal(principal, url, Signal(name))
        return f"{name}: {view.url} is {view.status}"

    return await ui.act(request, services, work, ui.url(f"/entities/{type_name}/{entity_id}"))


# --- stuck -----------------------------------------------------------------------------------


async def _stuck(services: Services, viewer: Viewer) -> dict[str, Any]:
    report = await views.stuck(services, viewer.principal)
    return {"s": report, "page": "stuck", "limit": STUCK_LIMIT}


@get("/stuck")
async def stuck_page(request: Request[Any, Any, Any], services: ServicesDep) -> Response[Any]:
    return await _dashboard(request).page(
        request, services, "stuck.html", lambda v: _stuck(services, v)
    )


@get("/fragments/stuck")
async def stuck_fragment(request: Request[Any, Any, Any], services: ServicesDep) -> Response[Any]:
    return await _dashboard(request).page(
        request, services, "_stuck.html", lambda v: _stuck(services, v)
    )


# --- static files ----------------------------------------------------------------------------


@get("/static/{name:str}")
async def static_file(name: FromPath[str]) -> Response[bytes]:
    """The dashboard's own assets (shipped in the wheel), cached for a year: their URLs carry
    a digest of their content (``?v=``)."""
    media_type = _STATIC.get(name)
    if media_type is None:
        raise NotFound(f"no static file {name!r}")
    body = resources.files(_PACKAGE).joinpath("static", name).read_bytes()
    return Response(
        body,
        media_type=media_type,
        headers={
            "Cache-Control": "public, max-age=31536000, immutable",
            "X-Content-Type-Options": "nosniff",
        },
    )


_HANDLERS = [
    login_form,
    login,
    logout,
    overview_page,
    overview_fragment,
    runners_page,
    runners_fragment,
    runner_page,
    runner_fragment,
    enable_runner,
    disable_runner,
    entity_page,
    entity_fragment,
    signal_entity,
    stuck_page,
    stuck_fragment,
    static_file,
]


def dashboard_router(path: str) -> Router:
    """The dashboard at ``path`` (its pages, fragments, actions and static files), left out of
    the OpenAPI document."""
    if not DASHBOARD_PATH.fullmatch(path):
        raise ConfigError(f"dashboard_path must be a path such as /ui, got {path!r}")
    base = path.rstrip("/")
    return Router(
        path=base or "/",
        route_handlers=_HANDLERS,
        dependencies={"services": Provide(provide_services, sync_to_thread=False)},
        include_in_schema=False,
        opt={"pullwake_dashboard": Dashboard(base)},
        request_max_body_size=65_536,
    )
