"""The worker claims webhook wakes on their targets' behalf, counts attempts, dead-letters."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from pullwake.core.claims import ClaimOutcome, StepRunner, answer_of
from pullwake.core.steps import record
from pullwake.model import hash_token, new_claim_token

__all__ = ["WebhookClaims"]


class WebhookClaims(StepRunner):
    """Claims for webhook targets: the same state machine as runner claims, by push."""

    async def claim(self, wake_id: str, lease_ms: int) -> ClaimOutcome:
        """Claim a webhook wake; a retry of the same wake re-issues the claim with a new token
        (the previous attempt's token stops working)."""
        token = new_claim_token()
        limits = replace(self.limits, lease_ms=lease_ms)
        step = await self.store.claim_webhook(wake_id, hash_token(token), limits)
        await self._finish(step)
        return answer_of(step) or self._notification(step, token)

    async def target(self, wake_id: str) -> dict[str, Any] | None:
        """The webhook target of a wake (its URL and secret)."""
        return await self.store.wake_target(wake_id)

    async def record_attempt(self, wake_id: str, error: str | None) -> None:
        """Count a delivery attempt; a success marks the wake delivered."""
        await self.store.record_webhook_attempt(wake_id, error)

    async def fail(self, wake_id: str, error: str, attempts: int) -> None:
        """Dead letter: the wake failed, its claim failed, the entity is parked until resume."""
        step = await self.store.fail_webhook(wake_id, error, attempts, self.limits)
        record(step)
