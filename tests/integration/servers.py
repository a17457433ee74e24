"""Extra live servers with their own settings, for tests that need more than the ``api`` fixture
(another configuration, or two replicas sharing Postgres and Redis)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
from litestar import Litestar

from pullwake.config import Settings
from pullwake.http import create_app
from pullwake.model import Principal
from pullwake.services import Services
from pullwake.testing import serve_in_background


@dataclass
class Server:
    """A running app, a client for it, and a way to mint API tokens."""

    app: Litestar
    http: httpx.AsyncClient

    @property
    def services(self) -> Services:
        services: Services = self.app.state["pullwake"]
        return services

    async def headers(self, principal: str) -> dict[str, str]:
        """Authorization headers with a fresh API token of ``principal``."""
        raw, _ = await self.services.tokens.create(Principal.parse(principal), "test")
        return {"Authorization": f"Bearer {raw}"}


@contextlib.asynccontextmanager
async def serve(settings: Settings, **app_kwargs: object) -> AsyncIterator[Server]:
    """Serve pullwake with ``settings`` on a free loopback port."""
    app = create_app(settings, **app_kwargs)
    async with (
        serve_in_background(app) as base_url,
        httpx.AsyncClient(base_url=base_url, timeout=10) as http,
    ):
        yield Server(app, http)
