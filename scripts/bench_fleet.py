"""The idle fleet's client: COUNT wake streams (``GET /v1/runners/<prefix><n>/wakes``) over raw
sockets from one asyncio process, cheap enough to hold ten thousand.

It prints JSON lines on stdout: ``{"connected": n, "seconds": s, "refused": r}`` once every
stream said ``connected`` (``r``: refusals retried), then
``{"wake": n, "entry": id, "wake_id": id, "t": monotonic}`` per wake event
(``time.monotonic()`` is the machine's CLOCK_MONOTONIC, comparable across processes), and
``{"closed": n}`` when the server ends a stream. It runs until terminated.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import resource
import sys
import time


def raise_open_files_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


def say(**fields: object) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


async def stream(args: argparse.Namespace, n: int, gate: asyncio.Semaphore) -> None:
    """Open stream ``n``; a refusal (503 while the server is swamped) is retried after a second,
    as a runner would."""
    attempts = 30
    for _ in range(attempts):
        async with gate:
            reader, writer = await asyncio.open_connection(args.host, args.port)
            writer.write(
                f"GET /v1/runners/{args.prefix}{n}/wakes?session=fleet-{n} HTTP/1.1\r\n"
                f"Host: {args.host}:{args.port}\r\nAuthorization: Bearer {args.token}\r\n"
                "Accept: text/event-stream\r\n\r\n".encode()
            )
            status = await reader.readline()
            if b" 200 " in status:
                while b"connected session=" not in await reader.readline():
                    pass
                listening.add(asyncio.create_task(listen(n, reader, writer)))
                return
            writer.close()
        refusals.append(status.decode(errors="replace").strip())
        await asyncio.sleep(1 + random.random())
    raise RuntimeError(f"stream {n}: {refusals[-1]} ({attempts} attempts)")


refusals: list[str] = []
listening: set[asyncio.Task[None]] = set()


async def listen(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Report the stream's wakes (``writer`` kept: a dropped StreamWriter closes its socket)."""
    entry = ""
    while line := await reader.readline():
        if line.startswith(b"id:"):
            entry = line[3:].strip().decode()
        elif line.startswith(b"data:"):
            at = time.monotonic()
            data = json.loads(line[5:])
            say(wake=n, entry=entry, wake_id=data.get("wake_id"), t=at)
    say(closed=n)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--prefix", default="fleet-")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--connect-concurrency", type=int, default=200)
    args = parser.parse_args()
    limit = raise_open_files_limit()
    if limit < args.count + 100:
        raise SystemExit(f"open files limit {limit} is too low for {args.count} streams")
    gate = asyncio.Semaphore(args.connect_concurrency)
    started = time.monotonic()
    await asyncio.gather(*(stream(args, n, gate) for n in range(args.count)))
    say(connected=args.count, seconds=time.monotonic() - started, refused=len(refusals))
    await asyncio.Event().wait()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
