"""Batch send: many messages for any number of entities in one Postgres round trip."""

from __future__ import annotations

from collections.abc import Sequence

from pullwake.config import Settings
from pullwake.core.steps import NewWake, record, step_limits
from pullwake.errors import (
    EntityNotRunnable,
    Forbidden,
    IdempotencyMismatch,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    PullwakeError,
)
from pullwake.metrics import SENDS
from pullwake.model import Principal
from pullwake.publish import Publisher
from pullwake.store import RawJson, Store
from pullwake.store.steps import Step
from pullwake.tracing import parse_traceparent
from pullwake.wire import (
    BatchItem,
    BatchResult,
    FieldError,
    ItemProblem,
    WakeRef,
    encode_payload,
)

__all__ = ["BatchSender"]

_ERRORS: dict[str, type[PullwakeError]] = {
    "NOT_FOUND": NotFound,
    "FORBIDDEN": Forbidden,
    "ENTITY_NOT_RUNNABLE": EntityNotRunnable,
    "IDEMPOTENCY_MISMATCH": IdempotencyMismatch,
}


def _problem(error: type[PullwakeError], detail: str) -> ItemProblem:
    return ItemProblem(error.status, error.code, detail)


class BatchSender:
    """``POST /v1/messages`` and ``pullwake send --file``: each item is what a single send
    does (members only, idempotency per item, wake or coalesce), in the batch's order."""

    def __init__(self, store: Store, publisher: Publisher, settings: Settings) -> None:
        self.store = store
        self.publisher = publisher
        self.settings = settings
        self.limits = step_limits(settings)

    async def send(
        self,
        principal: Principal,
        items: Sequence[BatchItem],
        *,
        operator: bool = False,
        trace: str | None = None,
    ) -> list[BatchResult]:
        """One result per item; items that cannot be sent get a problem, the rest go in.
        ``trace`` is the W3C trace context of items that carry none of their own."""
        self.check_size(len(items))
        results: list[BatchResult] = [BatchResult(item.entity) for item in items]
        sendable: list[tuple[int, BatchItem, bytes]] = []
        for index, item in enumerate(items):
            try:
                encoded = encode_payload(item.payload, self.settings.max_payload_bytes)
            except PayloadTooLarge as exc:
                results[index].problem = _problem(PayloadTooLarge, exc.detail)
                continue
            sendable.append((index, item, encoded))
        if sendable:
            wakes = await self._write(principal, sendable, results, operator=operator, trace=trace)
            await self.publisher.publish(wakes)
        return results

    def check_size(self, count: int) -> None:
        """400 past ``PULLWAKE_MAX_BATCH`` items."""
        limit = self.settings.max_batch
        if count > limit:
            raise InvalidRequest(
                f"a batch holds at most {limit} messages (PULLWAKE_MAX_BATCH), got {count}",
                errors=[FieldError(message="too many", key="messages", source="body")],
            )

    async def _write(
        self,
        principal: Principal,
        sendable: list[tuple[int, BatchItem, bytes]],
        results: list[BatchResult],
        *,
        operator: bool,
        trace: str | None,
    ) -> list[NewWake]:
        traces = [parse_traceparent(item.traceparent) or trace for _, item, _ in sendable]
        steps = await self.store.send_batch(
            [item.entity for _, item, _ in sendable],
            [RawJson(encoded.decode()) for _, _, encoded in sendable],
            [len(encoded) for _, _, encoded in sendable],
            [item.idempotency_key for _, item, _ in sendable],
            principal.key,
            check_members=not operator,
            limits=self.limits,
            traces=traces,
        )
        wakes: list[NewWake] = []
        for position, step in steps:
            record(step)
            self._result(results[sendable[position][0]], step)
            if step.wake is not None:
                wakes.append(step.wake)
        return wakes

    @staticmethod
    def _result(result: BatchResult, step: Step) -> None:
        code = step.code
        if code is not None:
            result.problem = _problem(_ERRORS[code], step.detail or code)
            return
        assert step.msg_offset is not None
        assert step.wake_status is not None
        result.offset = step.msg_offset
        result.wake = WakeRef(step.wake_id, step.wake_status, step.wake_reason)  # type: ignore[arg-type]
        result.duplicate = bool(step.duplicate)
        SENDS.labels("duplicate" if result.duplicate else step.wake_status).inc()
