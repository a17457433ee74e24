"""Webhook targets: Standard Webhooks signatures, address checks and one delivery attempt."""

from __future__ import annotations

import asyncio
import base64
import functools
import ipaddress
import logging
import random
import re
import socket
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
import msgspec
from standardwebhooks import Webhook

from pullwake.config import Settings
from pullwake.core.callbacks import ClaimCallbacks
from pullwake.core.claims import NoWork
from pullwake.core.webhook_claims import WebhookClaims
from pullwake.errors import InvalidRequest
from pullwake.metrics import WEBHOOK_ATTEMPTS
from pullwake.tracing import HEADER as TRACE_HEADER
from pullwake.wire import ClaimDone, FieldError, WakeNotification, json_encoder

__all__ = [
    "DeliveryOutcome",
    "Resolver",
    "WebhookDelivery",
    "check_webhook_url",
    "resolve_addresses",
    "retry_delay_s",
    "sign",
]

log = logging.getLogger(__name__)
USER_AGENT = "pullwake-webhooks/0.1"
MAX_ANSWER_BYTES = 65_536
"""A 2xx answer larger than this is not read further (and counts as a plain 2xx)."""


def _secret_bytes(secret: str) -> bytes:
    """Standard Webhooks secrets look like ``whsec_<base64>``; anything else (an empty or invalid
    key after the prefix too) is used as is."""
    if secret.startswith("whsec_"):
        try:
            key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
        except ValueError:
            key = b""
        if key:
            return key
    return secret.encode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value, ``v1,<base64 HMAC-SHA256(id.timestamp.body)>``,
    by the Standard Webhooks reference library (what receivers verify with)."""
    when = datetime.fromtimestamp(timestamp, tz=UTC)
    return Webhook(_secret_bytes(secret)).sign(msg_id, when, body.decode())


def retry_delay_s(settings: Settings, attempt: int, rng: random.Random | None = None) -> float:
    """Backoff before attempt ``attempt + 1``: first delay doubling, capped at 60 s, ±20 %."""
    base_ms: int = min(settings.webhook_backoff_ms * 2 ** (attempt - 1), 60_000)
    jitter: float = (rng or random).uniform(0.8, 1.2)
    return base_ms * jitter / 1000


def _private(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return not ip.is_global or ip.is_multicast


def _literal_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address ``host`` spells out, in any form a resolver accepts (``127.1``,
    ``0x7f000001``, ``2130706433``, ``0177.0.0.1``), or None for a name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if re.fullmatch(r"[0-9a-fx.]+", host) and any(c.isdigit() for c in host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


class _Refused(Exception):
    def __init__(self, detail: str, message: str) -> None:
        super().__init__(detail)
        self.detail, self.message = detail, message


def _refuse(detail: str, message: str) -> _Refused:
    return _Refused(detail, message)


def check_webhook_url(url: str, *, allow_private: bool, key: str = "url") -> None:
    """Reject non-http(s) URLs and literal private/loopback/link-local hosts (checked again,
    after DNS resolution, at every delivery); ``key`` is where the body holds the URL."""
    try:
        _check_webhook_url(url, allow_private=allow_private)
    except _Refused as exc:
        error = FieldError(message=exc.message, key=key, source="body")
        raise InvalidRequest(exc.detail, errors=[error]) from None


def _check_webhook_url(url: str, *, allow_private: bool) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _refuse("webhook url must be an absolute http(s) URL", "bad scheme or host")
    if parts.username or parts.password:
        raise _refuse("webhook url must not carry credentials", "credentials in URL")
    try:
        parts.port  # noqa: B018 -- raises ValueError when out of range
    except ValueError:
        raise _refuse("webhook url has an invalid port", "bad port") from None
    if allow_private:
        return
    host = parts.hostname.strip("[]").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        raise _refuse(
            "webhook url points at localhost; set PULLWAKE_WEBHOOK_ALLOW_PRIVATE=1 to allow it",
            "private address",
        )
    address = _literal_address(host)
    if address is not None and _private(str(address)):
        raise _refuse(
            "webhook url points at a private, loopback or link-local address",
            "private address",
        )
    # Otherwise a name: resolved and checked at delivery time.


# Webhook hosts are resolved on threads of their own: a name whose DNS never answers holds a
# thread for the resolver's timeout, and must not take the default executor's few threads that
# the worker's own Postgres and Redis reconnects resolve on.
_DNS_THREADS = ThreadPoolExecutor(max_workers=16, thread_name_prefix="pullwake-webhook-dns")


async def resolve_addresses(host: str) -> list[str]:
    """The addresses ``host`` resolves to (OSError when it does not)."""
    loop = asyncio.get_running_loop()
    infos = await loop.run_in_executor(
        _DNS_THREADS, functools.partial(socket.getaddrinfo, host, None, type=socket.SOCK_STREAM)
    )
    return [str(info[4][0]) for info in infos]


Resolver = Callable[[str], Awaitable[list[str]]]


@dataclass(frozen=True, slots=True)
class DeliveryOutcome:
    """What one attempt did: ``delivered``, ``done``, ``skipped``, ``retry`` or ``failed``."""

    result: str
    detail: str = ""
    retry_in_s: float = 0.0


class WebhookDelivery:
    """Claims a webhook wake for its target and POSTs the signed notification."""

    def __init__(
        self,
        claims: WebhookClaims,
        callbacks: ClaimCallbacks,
        settings: Settings,
        http: httpx.AsyncClient,
        resolve: Resolver = resolve_addresses,
    ) -> None:
        self.claims = claims
        self.callbacks = callbacks
        self.settings = settings
        self.http = http
        self.resolve = resolve

    def _lease_ms(self) -> int:
        # The claim must outlive the request and the longest back-off before the next attempt
        # (the one before the last attempt, +20 % jitter), computed from the settings: a fixed
        # 72 s held a target that died after its 2xx for minutes even with short back-offs.
        s = self.settings
        longest_ms = min(s.webhook_backoff_ms * 2 ** max(0, s.webhook_max_attempts - 2), 60_000)
        return s.claim_lease_ms + s.webhook_timeout_ms + int(longest_ms * 1.2)

    async def deliver(self, wake_id: str, attempt: int) -> DeliveryOutcome:
        """One attempt; retries and the final failure are decided here, scheduled by arq."""
        try:
            result = await self._deliver(wake_id, attempt)
        except Exception:
            WEBHOOK_ATTEMPTS.labels("error").inc()  # Postgres or Redis failed: arq retries
            raise
        WEBHOOK_ATTEMPTS.labels(result.result).inc()
        return result

    async def _deliver(self, wake_id: str, attempt: int) -> DeliveryOutcome:
        outcome = await self.claims.claim(wake_id, self._lease_ms())
        if isinstance(outcome, NoWork | ClaimDone):
            return DeliveryOutcome("skipped", getattr(outcome, "reason", ""))
        target = await self._target(wake_id)
        error = await self._post(outcome, target)
        await self.claims.record_attempt(
            wake_id, None if error is None or error[1] == "done" else error[0]
        )
        if error is None:
            return DeliveryOutcome("delivered")
        if error[1] == "done":
            return await self._done(outcome)
        fields = {
            "entity": outcome.entity.url,
            "wake": wake_id,
            "claim": outcome.claim_id,
            "epoch": outcome.epoch,
            "attempt": attempt,
        }
        if attempt >= self.settings.webhook_max_attempts or error[1] == "fatal":
            log.warning(
                "webhook wake %s failed for good after %d attempts: %s",
                wake_id,
                attempt,
                error[0],
                extra=fields,
            )
            await self.claims.fail(wake_id, error[0], attempt)
            return DeliveryOutcome("failed", error[0])
        delay = retry_delay_s(self.settings, attempt)
        log.info(
            "webhook wake %s attempt %d failed (%s); retrying in %.1f s",
            wake_id,
            attempt,
            error[0],
            delay,
            extra=fields,
        )
        return DeliveryOutcome("retry", error[0], delay)

    async def _target(self, wake_id: str) -> dict[str, Any]:
        target = await self.claims.target(wake_id)
        assert target is not None
        return target

    async def _post(
        self, notification: WakeNotification, target: dict[str, Any]
    ) -> tuple[str, str] | None:
        """None on a plain 2xx; else (error, kind) with kind in retry|fatal|done."""
        url = str(target["url"])
        try:
            # One deadline for the whole attempt: DNS check, connect, send, answer.
            async with asyncio.timeout(self.settings.webhook_timeout_ms / 1000):
                if (refused := await self._check_address(url)) is not None:
                    return refused
                status, head = await self._send(url, *self._signed(notification, target))
        except TimeoutError:
            return f"no complete answer within {self.settings.webhook_timeout_ms} ms", "retry"
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"[:300], "retry"
        if not 200 <= status < 300:
            return f"HTTP {status}", "retry"
        return ("answered done", "done") if _answers_done(head) else None

    async def _check_address(self, url: str) -> tuple[str, str] | None:
        """An error when the target's host resolves to a private address (or not at all)."""
        if self.settings.webhook_allow_private:
            return None
        host = (urlsplit(url).hostname or "").strip("[]")
        try:
            addresses = await self.resolve(host)
        except OSError as exc:
            return f"DNS lookup failed: {exc}", "retry"
        if any(_private(address) for address in addresses):
            return "target resolves to a private address", "fatal"
        return None

    def _signed(
        self, notification: WakeNotification, target: dict[str, Any]
    ) -> tuple[bytes, dict[str, str]]:
        """The body and its Standard Webhooks headers."""
        body = json_encoder.encode(notification)
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "webhook-id": notification.wake_id,
            "webhook-timestamp": str(timestamp),
        }
        secret = target.get("secret") or self.settings.webhook_secret
        if secret:
            headers["webhook-signature"] = sign(secret, notification.wake_id, timestamp, body)
        trace = next((m.traceparent for m in notification.messages if m.traceparent), None)
        if trace is not None:  # the receiver's span joins the first traced message's trace
            headers[TRACE_HEADER] = trace
        return body, headers

    async def _send(self, url: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        """POST and read at most ``MAX_ANSWER_BYTES + 1`` of the answer (the caller bounds it
        all by ``webhook_timeout_ms``): a target that drips a byte at a time, or sends a body
        without end, cannot hold the worker longer or fill its memory."""
        async with self.http.stream(
            "POST",
            url,
            content=body,
            headers={**headers, "accept-encoding": "identity"},
            timeout=self.settings.webhook_timeout_ms / 1000,
            follow_redirects=False,
        ) as response:
            if not 200 <= response.status_code < 300:
                return response.status_code, b""
            return response.status_code, await _read_head(response, MAX_ANSWER_BYTES + 1)

    async def _done(self, notification: WakeNotification) -> DeliveryOutcome:
        acked = (
            notification.messages[-1].offset
            if notification.messages
            else (notification.acked_offset)
        )
        await self.callbacks.done(
            notification.claim_id, notification.claim_token, notification.epoch, acked
        )
        return DeliveryOutcome("done", f"acked {acked}")


class _DoneAnswer(msgspec.Struct):
    done: bool = False


_done_decoder = msgspec.json.Decoder(_DoneAnswer)


async def _read_head(response: httpx.Response, limit: int) -> bytes:
    """The first ``limit`` bytes of the body as sent (no decompression); the rest is never
    read (closing the stream drops the connection)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_raw():
        chunks.append(chunk[: limit - size])
        size += len(chunks[-1])
        if size >= limit:
            break
    return b"".join(chunks)


def _answers_done(body: bytes) -> bool:
    """True for a JSON object with ``"done": true``; anything else (other JSON, garbage, a
    hostile 10 000-deep nesting, more than 64 KiB) counts as a plain 2xx."""
    if len(body) > MAX_ANSWER_BYTES:
        return False
    try:
        return _done_decoder.decode(body).done
    except (msgspec.DecodeError, RecursionError):
        return False
