"""Fixtures shared by the integration tests (the live server comes from tests/conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest

from pullwake.config import Settings
from pullwake.services import Services, open_services

from .helpers import ALICE, BOB, Entity, create_entity, register_runner


@pytest.fixture
def http(api) -> httpx.AsyncClient:
    return api.http


@pytest.fixture
async def services(server_settings: Settings) -> AsyncIterator[Services]:
    """A service graph of the test's own on the live server's settings, as the worker has."""
    async with open_services(server_settings, pool_max=4) as services:
        yield services


@pytest.fixture
async def alice(api) -> dict[str, str]:
    """Auth headers of the main test principal (runner owner and entity creator)."""
    return await api.as_(ALICE)


@pytest.fixture
async def bob(api) -> dict[str, str]:
    """Auth headers of another principal."""
    return await api.as_(BOB)


@dataclass
class World:
    """Alice's runner and one entity dispatched to it."""

    runner_id: str
    entity: Entity


@pytest.fixture
async def world(http: httpx.AsyncClient, alice: dict[str, str]) -> World:
    runner_id = await register_runner(http, alice)
    entity = await create_entity(http, alice, runner_id)
    return World(runner_id, entity)
