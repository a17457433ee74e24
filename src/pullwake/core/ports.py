"""What the use cases need of the store: one typed call per state change, and one per read
(a fake of these protocols unit-tests a use case without Postgres)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Protocol

from pullwake.store import RawJson
from pullwake.store.entities import EntityRow, EntityTypeRow, NewEntity, WakeRow
from pullwake.store.ops import RunnerBacklog, RunnerRow
from pullwake.store.recovery import OutstandingWake, StaleWake
from pullwake.store.retention import PrunedWakes
from pullwake.store.runners import Registration
from pullwake.store.steps import LiveClaim, Step, StepLimits
from pullwake.store.tokens import TokenLookup, TokenRow
from pullwake.wire import EventView, MessageView

__all__ = [
    "EntityReads",
    "EntityStore",
    "EntityTypeStore",
    "Pruning",
    "RecoveryReads",
    "RecoveryStore",
    "RunnerReads",
    "RunnerStore",
    "StateMachine",
    "TokenStore",
]


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
        traceparent: str | None = None,
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
        traces: list[str | None] | None = None,
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


class EntityReads(Protocol):
    """The entity use cases' reads, and their two small writes (create, members)."""

    async def insert_entity(self, entity: NewEntity) -> bool: ...

    async def get_entity_type(self, name: str) -> EntityTypeRow | None: ...

    async def get_runner(self, runner_id: str) -> RunnerRow | None: ...

    async def get_entity(self, url: str) -> EntityRow | None: ...

    async def set_members(self, url: str, created_by: str, members: list[str]) -> bool: ...

    async def messages_after(self, url: str, after: int, limit: int) -> list[MessageView]: ...

    async def events_after(self, url: str, after: int, limit: int) -> list[EventView]: ...

    async def get_wake(self, wake_id: str) -> WakeRow | None: ...


class EntityStore(StateMachine, EntityReads, Protocol):
    """What :class:`~pullwake.core.entities.Dispatcher` needs."""


class RecoveryReads(Protocol):
    """What recovery reads besides the lease sweep."""

    async def lock_stale_wakes(
        self, queued_after: timedelta, delivered_after: timedelta, limit: int
    ) -> list[StaleWake]: ...

    async def park_unread(self, wakes: list[tuple[str, str]]) -> None: ...

    async def unpark(self, wake_ids: list[str]) -> None: ...

    async def sweep_outstanding_wakes(
        self, after: str, runners: int
    ) -> dict[str, list[OutstandingWake]]: ...

    async def runners_outstanding_wakes(
        self, runner_ids: list[str]
    ) -> dict[str, list[OutstandingWake]]: ...

    async def count_runners_with_outstanding_wakes(self) -> int: ...

    async def wake_is_wanted(self, wake_id: str) -> bool: ...

    async def get_wake(self, wake_id: str) -> WakeRow | None: ...

    async def runner_ids_after(self, after: str, limit: int) -> list[str]: ...

    async def count_runners(self) -> int: ...


class RecoveryStore(StateMachine, RecoveryReads, Protocol):
    """What :class:`~pullwake.core.recovery.Recovery` needs."""


class Pruning(Protocol):
    """Retention's batches and dry-run counts."""

    async def prune_wakes(self, older_than: timedelta, limit: int) -> PrunedWakes: ...

    async def count_prunable_wakes(self, older_than: timedelta) -> PrunedWakes: ...

    async def prune_inbox_messages(self, older_than: timedelta, limit: int) -> int: ...

    async def count_prunable_inbox_messages(self, older_than: timedelta) -> int: ...

    async def prune_entity_events(self, older_than: timedelta, limit: int) -> int: ...

    async def count_prunable_entity_events(self, older_than: timedelta) -> int: ...


class TokenStore(Protocol):
    """What :class:`~pullwake.core.tokens.Tokens` needs: API tokens by id or hash."""

    async def insert_token(
        self, token_id: str, principal: str, token_hash: str, label: str
    ) -> TokenRow: ...

    async def lookup_token(self, token_hash: str) -> TokenLookup | None: ...

    async def touch_token(self, token_id: str) -> None: ...

    async def touch_tokens(self, token_ids: list[str]) -> None: ...

    async def list_tokens(self, principal: str | None) -> list[TokenRow]: ...

    async def revoke_token(self, token_id: str) -> TokenRow | None: ...


class RunnerReads(Protocol):
    """The runner registry's reads and small writes."""

    async def register_runner(
        self, runner_id: str, owner: str, label: str, kind: str, *, max_owned: int
    ) -> Registration: ...

    async def get_runner(self, runner_id: str) -> RunnerRow | None: ...

    async def list_runners(self, owner: str) -> list[RunnerRow]: ...

    async def extend_runner_lease(
        self, runner_id: str, lease: timedelta, diagnostics: dict[str, Any] | None
    ) -> datetime: ...

    async def set_runner_admin_status(self, runner_id: str, admin_status: str) -> bool: ...

    async def delete_runner(self, runner_id: str) -> bool: ...

    async def runner_backlog(self, runner_id: str) -> RunnerBacklog: ...

    async def outstanding_wakes(self, runner_id: str) -> list[OutstandingWake]: ...

    async def active_claim_entities(self, runner_id: str) -> list[str]: ...

    async def idle_pending_entities(self, runner_id: str) -> list[str]: ...


class RunnerStore(StateMachine, RunnerReads, Protocol):
    """What :class:`~pullwake.core.runners.Runners` needs (of the state machine: waking the
    entities a runner comes back to, and letting go of a deleted runner's work)."""


class EntityTypeStore(Protocol):
    """What :class:`~pullwake.core.entity_types.EntityTypes` needs."""

    async def put_entity_type(
        self, name: str, default_dispatch_policy: dict[str, Any] | None, owner: str
    ) -> tuple[EntityTypeRow, bool] | None: ...

    async def get_entity_type(self, name: str) -> EntityTypeRow | None: ...
