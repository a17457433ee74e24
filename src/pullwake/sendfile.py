"""``pullwake send --file``: a JSON Lines file of messages, sent in batches, with progress."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable
from typing import Any

from pullwake.config import Settings
from pullwake.core.batch import read_batch_lines
from pullwake.model import Principal
from pullwake.wire import BatchResult

__all__ = ["send_file", "summary"]

_KINDS = ("queued", "coalesced", "held", "duplicate")


def summary(results: list[BatchResult], lines: list[int]) -> tuple[str, list[str]]:
    """One line for the whole file, and one per failed item (``line N: CODE detail``)."""
    outcomes: Counter[str] = Counter()
    failures = []
    for result, line in zip(results, lines, strict=True):
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


async def send_file(
    settings: Settings, path: str, sender: str, open_services: Callable[[Settings], Any]
) -> int:
    """Send every message of the file; 0 when all were accepted, 1 when some failed, 2 when
    the file (or the principal) is invalid and nothing was sent."""
    try:
        principal = Principal.parse(sender)
        lines = _read(path)
    except (OSError, ValueError) as exc:
        print(f"pullwake send: {exc}", file=sys.stderr)
        return 2
    items, errors = read_batch_lines(lines)
    for error in errors:
        print(f"pullwake send: {error}", file=sys.stderr)
    if errors:
        return 2
    numbers = [n for n, line in enumerate(lines, 1) if line.strip()]
    results: list[BatchResult] = []
    async with open_services(settings) as services:
        for start in range(0, len(items), settings.max_batch):
            chunk = items[start : start + settings.max_batch]
            results += await services.batch.send(principal, chunk, operator=True)
            print(f"sent {len(results)}/{len(items)}", file=sys.stderr, flush=True)
    line, failures = summary(results, numbers)
    for failure in failures:
        print(failure)
    print(line)
    return 1 if failures else 0
