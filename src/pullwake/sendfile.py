"""``pullwake send``: one message, or a JSON Lines file sent in batches with progress.

Over HTTP by default, through :mod:`pullwake.client` as the token's principal and under the
server's limits; with ``--direct`` through Postgres and Redis, as an operator.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import msgspec

from pullwake.client import AsyncClient, BatchItem, BatchResult, SendResponse
from pullwake.client._calls import entity_path
from pullwake.client.errors import InvalidRequest, PullwakeClientError, RateLimited, Unauthorized
from pullwake.config import Settings
from pullwake.model import Principal
from pullwake.text import find_unstorable

__all__ = [
    "Message",
    "parse_message",
    "read_batch_lines",
    "send_direct",
    "send_file",
    "send_file_direct",
    "send_items",
    "send_one",
    "summary",
]

_KINDS = ("queued", "coalesced", "held", "duplicate")
MAX_RATE_LIMITED_WAITS = 60
"""Waits in a row for the send rate, with nothing sent in between, before ``--file`` gives up."""


@dataclass(frozen=True, slots=True)
class Message:
    entity: str
    payload: Any
    idempotency_key: str | None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_message(entity: str, payload: str, idempotency_key: str | None) -> Message | str:
    """The message of ``pullwake send ENTITY PAYLOAD``, or why it cannot be sent (one line)."""
    if not entity.startswith("/") and _is_entity(f"/{entity}"):
        return f"entity URL must start with '/': did you mean /{entity}?"
    try:
        entity_path(entity)
    except ValueError as exc:
        return str(exc)
    try:
        value = json.loads(payload, parse_constant=_no_constant)
    except ValueError as exc:
        return (
            f"PAYLOAD is not JSON ({exc}); quote it for the shell, e.g. "
            """'{"text": "hi"}' or '"just text"'"""
        )
    for field, problem in find_unstorable({"payload": value, "idempotency_key": idempotency_key}):
        return f"{field} {problem}"
    return Message(entity, value, idempotency_key)


def _is_entity(entity: str) -> bool:
    try:
        entity_path(entity)
    except ValueError:
        return False
    return True


def _sent_line(result: SendResponse) -> str:
    wake = result.wake
    return (
        f"offset {result.offset}: wake {wake.id or '-'} {wake.status}"
        + (f" ({wake.reason})" if wake.reason else "")
        + (" (duplicate)" if result.duplicate else "")
    )


def describe(error: PullwakeClientError, server: str) -> str:
    """One line for a failed call: its code, status and detail, and a hint when one helps."""
    where = f" ({error.status})" if error.status else ""
    line = f"{error.code}{where}: {' '.join(error.detail.split())}"
    if isinstance(error, Unauthorized):
        line += " (set PULLWAKE_TOKEN or --token to an API token)"
    elif error.status == 0:
        line += f" (is pullwake serving at {server}? set --server or PULLWAKE_SERVER_URL)"
    return line


async def send_one(server: str, token: str | None, message: Message) -> int:
    """``pullwake send ENTITY PAYLOAD`` over HTTP: 0 when sent, 1 when the server refused."""
    try:
        async with AsyncClient(server, token) as client:
            result = await client.send(
                message.entity, message.payload, idempotency_key=message.idempotency_key
            )
    except PullwakeClientError as exc:
        print(f"pullwake send: {describe(exc, server)}", file=sys.stderr)
        return 1
    except httpx.InvalidURL as exc:
        print(f"pullwake send: bad server URL {server!r}: {exc}", file=sys.stderr)
        return 2
    print(_sent_line(result))
    return 0


async def send_direct(
    settings: Settings, message: Message, sender: str, open_services: Callable[[Settings], Any]
) -> int:
    """``pullwake send --direct``: through Postgres and Redis as ``sender``, no member check."""
    try:
        principal = Principal.parse(sender)
    except ValueError as exc:
        print(f"pullwake send: {exc}", file=sys.stderr)
        return 2
    async with open_services(settings) as services:
        result = await services.dispatcher.send(
            principal, message.entity, message.payload, message.idempotency_key, operator=True
        )
    print(_sent_line(result))
    return 0


# --- files -------------------------------------------------------------------------------------


def summary(results: list[BatchResult], lines: list[int]) -> tuple[str, list[str]]:
    """One line for the whole file, and one per failed item (``line N: CODE detail``)."""
    outcomes: Counter[str] = Counter()
    failures = []
    for result, line in zip(results, lines, strict=False):
        if result.problem is not None:
            failures.append(f"line {line}: {result.problem.code} {result.problem.detail}")
        elif result.duplicate:
            outcomes["duplicate"] += 1
        elif result.wake is not None:
            outcomes[result.wake.status] += 1
    sent = sum(outcomes.values())
    kinds = ", ".join(f"{outcomes[k]} {k}" for k in _KINDS if outcomes[k]) or "none"
    return f"{len(results)} messages: {sent} accepted ({kinds}), {len(failures)} failed", failures


def _read(path: str) -> list[str]:
    # Lines end at "\n" only: str.splitlines() would also split inside JSON strings holding
    # U+2028, U+0085 and the like, which are valid there.
    if path == "-":
        return sys.stdin.read().split("\n")
    with open(path, encoding="utf-8") as file:
        return file.read().split("\n")


_item_decoder = msgspec.json.Decoder(BatchItem)


def read_batch_lines(lines: Iterable[str]) -> tuple[list[BatchItem], list[str]]:
    """Decode JSON Lines of ``{"entity", "payload", "idempotency_key"?}`` (blank lines skipped);
    returns the items and one error per bad line (``line N: why``)."""
    items: list[BatchItem] = []
    errors: list[str] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = _item_decoder.decode(line)
        except msgspec.DecodeError as exc:  # ValidationError included
            errors.append(f"line {number}: {exc}")
            continue
        bad = next(find_unstorable(msgspec.to_builtins(item)), None)
        if bad is not None:
            errors.append(f"line {number}: {bad[0]} {bad[1]}")
            continue
        items.append(item)
    return items, errors


def _load(path: str) -> tuple[list[BatchItem], list[int]] | None:
    """The file's messages and their line numbers, or None (reported) when any line is bad."""
    try:
        lines = _read(path)
    except (OSError, ValueError) as exc:
        print(f"pullwake send: {exc}", file=sys.stderr)
        return None
    items, errors = read_batch_lines(lines)
    for error in errors:
        print(f"pullwake send: {error}", file=sys.stderr)
    if errors:
        return None
    return items, [n for n, line in enumerate(lines, 1) if line.strip()]


def _progress(sent: int, total: int) -> None:
    print(f"sent {sent}/{total}", file=sys.stderr, flush=True)


def _note(text: str) -> None:
    print(f"pullwake send: {text}", file=sys.stderr, flush=True)


def _too_many(error: InvalidRequest) -> bool:
    """The batch as a whole is too long (PULLWAKE_MAX_BATCH) or above the send burst."""
    return any(e.get("key") == "messages" for e in error.errors or ())


async def send_items(
    client: AsyncClient,
    items: Sequence[BatchItem],
    batch_size: int,
    *,
    progress: Callable[[int, int], None] = _progress,
    note: Callable[[str], None] = _note,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> tuple[list[BatchResult], PullwakeClientError | None]:
    """Send ``items`` in order, ``batch_size`` at a time: the results so far, and the error
    that stopped the sending, if one did (then the first item without a result was not sent).

    A batch the server refuses as a whole before sending any of it is sent again: halved
    while it is too long, and after the wait ``Retry-After`` asks for while over the rate.
    """
    results: list[BatchResult] = []
    size, waits = batch_size, 0
    while len(results) < len(items):
        chunk = items[len(results) : len(results) + size]
        try:
            results += await client.send_batch(chunk)
        except InvalidRequest as exc:
            if size == 1 or not _too_many(exc):
                return results, exc
            size = max(1, min(size, len(chunk)) // 2)
            note(f"the server refused {len(chunk)} messages at once; trying {size}")
            continue
        except RateLimited as exc:
            waits += 1
            if waits > MAX_RATE_LIMITED_WAITS:
                return results, exc
            delay = exc.retry_after if exc.retry_after is not None else 1.0
            note(f"over the send rate; waiting {delay:g} s")
            await sleep(delay)
            continue
        except PullwakeClientError as exc:
            return results, exc
        waits = 0
        progress(len(results), len(items))
    return results, None


def _report(results: list[BatchResult], numbers: list[int]) -> int:
    line, failures = summary(results, numbers)
    for failure in failures:
        print(failure)
    print(line)
    return 1 if failures else 0


async def send_file(server: str, token: str | None, path: str, batch_size: int) -> int:
    """``pullwake send --file`` over HTTP: 0 when every message was accepted, 1 when some
    failed or the sending stopped, 2 when the file is invalid and nothing was sent."""
    loaded = _load(path)
    if loaded is None:
        return 2
    items, numbers = loaded
    try:
        async with AsyncClient(server, token) as client:
            results, error = await send_items(client, items, batch_size)
    except httpx.InvalidURL as exc:
        print(f"pullwake send: bad server URL {server!r}: {exc}", file=sys.stderr)
        return 2
    status = _report(results, numbers)
    if error is None:
        return status
    where = f"line {numbers[len(results)]}"
    print(
        f"pullwake send: stopped before {where}, {len(items) - len(results)} of {len(items)} "
        f"messages not sent: {describe(error, server)}",
        file=sys.stderr,
    )
    return 1


async def send_file_direct(
    settings: Settings,
    path: str,
    sender: str,
    open_services: Callable[[Settings], Any],
    batch_size: int,
) -> int:
    """``pullwake send --direct --file``: through Postgres and Redis, as an operator, in
    batches of at most ``batch_size`` (and ``PULLWAKE_MAX_BATCH``)."""
    try:
        principal = Principal.parse(sender)
    except ValueError as exc:
        print(f"pullwake send: {exc}", file=sys.stderr)
        return 2
    loaded = _load(path)
    if loaded is None:
        return 2
    items, numbers = loaded
    results: list[BatchResult] = []
    async with open_services(settings) as services:
        size = min(batch_size, settings.max_batch)
        for start in range(0, len(items), size):
            chunk = items[start : start + size]
            results += await services.batch.send(principal, chunk, operator=True)
            _progress(len(results), len(items))
    return _report(results, numbers)
