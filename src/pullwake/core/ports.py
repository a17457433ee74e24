"""What the use cases need of the store: one typed call per state change (a fake of this
protocol unit-tests a use case without Postgres)."""

from __future__ import annotations

from typing import Any, Protocol

from pullwake.store import RawJson
from pullwake.store.steps import LiveClaim, Step, StepLimits

__all__ = ["StateMachine"]


class StateMachine(Protocol):
    """The state machine's calls (``Store`` implements them over PL/pgSQL functions)."""

    async def send(
        self,
        url: str,
        payload: RawJson,
        size: int,
        idempotency_key: str | None,
        sender: str,
        *,
        check_members: bool,
        limits: StepLimits,
    ) -> Step: ...

    async def send_batch(
        self,
        urls: list[str],
        payloads: list[RawJson],
        sizes: list[int],
        idempotency_keys: list[str | None],
        sender: str,
        *,
        check_members: bool,
        limits: StepLimits,
    ) -> list[tuple[int, Step]]: ...

    async def claim(
        self,
        runner_id: str,
        wake_id: str,
        entry_id: str | None,
        owner: str | None,
        token_hash: str,
        limits: StepLimits,
    ) -> Step: ...

    async def heartbeat(
        self, claim_id: str, token_hash: str, epoch: int, limits: StepLimits
    ) -> Step: ...

    async def done(
        self,
        claim_id: str,
        token_hash: str,
        epoch: int,
        acked_offset: int,
        next_token_hash: str | None,
        limits: StepLimits,
    ) -> Step: ...

    async def release(
        self, claim_id: str, token_hash: str, epoch: int, error: str | None, limits: StepLimits
    ) -> Step: ...

    async def append_event(
        self, token_hash: str, url: str, payload: RawJson, epoch: int | None, limits: StepLimits
    ) -> Step: ...

    async def signal(
        self, url: str, principal: str | None, signal: str, limits: StepLimits
    ) -> Step: ...

    async def expire_leases(self, limit: int, limits: StepLimits) -> list[Step]: ...

    async def wake_entity(self, url: str, reason: str) -> Step: ...

    async def detach_runner(self, url: str, runner_id: str, limits: StepLimits) -> Step: ...

    async def claim_webhook(self, wake_id: str, token_hash: str, limits: StepLimits) -> Step: ...

    async def fail_webhook(
        self, wake_id: str, error: str, attempts: int, limits: StepLimits
    ) -> Step: ...

    async def record_webhook_attempt(self, wake_id: str, error: str | None) -> None: ...

    async def wake_target(self, wake_id: str) -> dict[str, Any] | None: ...

    async def live_claim(self, token_hash: str) -> LiveClaim | None: ...
