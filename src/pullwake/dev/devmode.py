"""``pullwake dev``: embedded Postgres/Redis, migrations, the API and a live demonstration."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from pullwake.config import Settings, redact_url
from pullwake.errors import ConfigError
from pullwake.http import create_app
from pullwake.http.auth import DEV_LOCAL
from pullwake.http.plugin import DrainingServer
from pullwake.logs import logging_config
from pullwake.model import Principal
from pullwake.store.migrate import apply_migrations
from pullwake.streams.client import check_redis_mode

__all__ = ["run_dev"]

log = logging.getLogger(__name__)
DEV_PRINCIPAL = DEV_LOCAL.key
"""The dev token's principal: the one a request without credentials is in dev mode, so the
API, the dev token and the dashboard (no login) all see the demo's runner and entities."""


def _say(text: str = "") -> None:
    print(text, flush=True)


@contextlib.contextmanager
def _services(data_dir: Path) -> Iterator[tuple[str, str]]:
    """Configured URLs when set, otherwise embedded Postgres and Redis under ``data_dir``."""
    database_url = os.environ.get("PULLWAKE_DATABASE_URL") or None
    redis_url = os.environ.get("PULLWAKE_REDIS_URL") or None
    if database_url and redis_url:
        yield database_url, redis_url
        return
    from pullwake.dev.embedded import EmbeddedServices

    missing = [n for n, u in (("Postgres", database_url), ("Redis", redis_url)) if not u]
    _say(f"• starting embedded {' and '.join(missing)} in {data_dir}/ ...")
    started = time.monotonic()
    with EmbeddedServices(
        data_dir, postgres=database_url is None, redis=redis_url is None
    ) as embedded:
        _say(f"  ready in {time.monotonic() - started:.1f} s")
        yield (database_url or str(embedded.database_url), redis_url or str(embedded.redis_url))


def run_dev(args: argparse.Namespace) -> int:
    """Run everything on one machine until Ctrl-C."""
    data_dir = Path(args.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        with _services(data_dir) as (database_url, redis_url):
            settings = Settings.from_env(
                database_url=database_url,
                redis_url=redis_url,
                dev_asserted_auth=True,
                public_url=f"http://{args.host}:{args.port}",
            )
            if settings.dashboard_path is None:  # on in dev mode (PULLWAKE_DASHBOARD_PATH moves it)
                settings = settings.with_(dashboard_path="/ui")
            return asyncio.run(_dev(settings, args))
    except KeyboardInterrupt:
        return 0
    except ConfigError as exc:
        print(f"pullwake dev: {exc.detail}", file=sys.stderr)
        return 2


async def _dev(settings: Settings, args: argparse.Namespace) -> int:
    if not args.verbose:  # the narration is the interesting part; errors still show
        for name in ("pullwake", "arq", "uvicorn"):
            logging.getLogger(name).setLevel(logging.WARNING)
    assert settings.database_url is not None
    await check_redis_mode(settings, arq=True)  # a mismatch is one line, not a lifespan traceback
    applied = await apply_migrations(settings.database_url)
    _say(
        f"• database {redact_url(settings.database_url)}: "
        f"{'applied ' + ', '.join(applied) if applied else 'schema up to date'}"
    )
    _say(f"• redis    {redact_url(settings.redis_url)}")
    app = create_app(settings)
    root_level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        log_config=logging_config(settings.log_format, root_level),  # PULLWAKE_LOG_FORMAT
        timeout_graceful_shutdown=2,
    )
    server = DrainingServer(config)
    serving = asyncio.create_task(server.serve())
    while not server.started:
        if serving.done():
            serving.result()
            return 1
        await asyncio.sleep(0.02)
    base = f"http://{args.host}:{args.port}"
    worker = _start_worker(settings)
    app.state["pullwake"].worker_health = worker[0].ctx["pullwake_health"]  # for /readyz
    _say(f"• worker running (recovery every {settings.recovery_interval_ms} ms)")
    token, _ = await app.state["pullwake"].tokens.create(
        Principal.parse(DEV_PRINCIPAL), "pullwake dev"
    )
    _say(f"• API on {base}  (OpenAPI: {base}/schema, Swagger UI: {base}/schema/swagger)")
    if not args.no_demo:
        try:
            await _demo(base, token)
        except (httpx.HTTPError, TimeoutError, AssertionError) as exc:
            _say(f"✗ demo failed: {exc!r}")
            server.drain_and_exit()
            await serving
            await _stop_worker(worker)
            return 1
    from pullwake.dev.demo import start_demo_runner

    log_path = Path(args.data_dir, "dev-runner.log")
    demo_runner = await start_demo_runner(base, token, log_path, live=not args.no_demo)
    _print_usage(base, token, settings.dashboard_path)
    if args.exit_after_demo:
        await demo_runner.stop()  # before the server, so its wake stream closes first
        server.drain_and_exit()
    await _wait_for_exit(server, serving)
    await demo_runner.stop()
    await _stop_worker(worker)
    return 0


def _start_worker(settings: Settings) -> tuple[Any, asyncio.Task[None]]:
    """The arq worker in this event loop (the same code `pullwake worker` runs)."""
    from pullwake.tasks import create_worker

    worker = create_worker(settings, handle_signals=False)
    return worker, asyncio.create_task(worker.main())


async def _stop_worker(handle: tuple[Any, asyncio.Task[None]]) -> None:
    worker, task = handle
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await worker.close()


async def _wait_for_exit(server: DrainingServer, serving: asyncio.Task[None]) -> None:
    loop = asyncio.get_running_loop()
    if sys.platform != "win32":  # Windows event loops have no add_signal_handler
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, server.drain_and_exit)
    await serving
    _say("• stopped")


async def _demo(base: str, token: str) -> None:
    """Register a runner, create an entity, send, receive over SSE, claim, done: narrated."""
    headers = {"Authorization": f"Bearer {token}"}
    runner_id = "dev-runner"
    entity = f"hello-{int(time.time())}"
    _say("\n── demonstration ─────────────────────────────────────────────")
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=10) as http:
        r = await http.post("/v1/runners", json={"id": runner_id, "label": "pullwake dev demo"})
        r.raise_for_status()
        _say(f"1. registered runner {runner_id!r} (owner {DEV_PRINCIPAL})")
        r = await http.put(
            f"/v1/entities/demo/{entity}",
            json={"dispatch_policy": {"targets": [{"type": "runner", "runner_id": runner_id}]}},
        )
        r.raise_for_status()
        _say(f"2. created entity /demo/{entity} targeting the runner")
        async with _sse(http, runner_id) as wakes:
            _say("3. runner connected: GET /v1/runners/dev-runner/wakes (Server-Sent Events)")
            sent_at = time.perf_counter()
            for n, text in enumerate(("hello", "from", "pullwake"), start=1):
                r = await http.post(
                    f"/v1/entities/demo/{entity}/messages", json={"payload": {"text": text}}
                )
                r.raise_for_status()
                body = r.json()
                _say(
                    f"4. sent message {n} → offset {body['offset']}, wake {body['wake']['status']}"
                )
            entry_id, wake = await asyncio.wait_for(anext(wakes), timeout=10)
            latency_ms = (time.perf_counter() - sent_at) * 1000
        _say(
            f"5. wake received over SSE after {latency_ms:.1f} ms: entry {entry_id}, "
            f"epoch {wake['epoch']}"
        )
        r = await http.post(
            f"/v1/runners/{runner_id}/claim",
            json={"wake_id": wake["wake_id"], "entry_id": entry_id},
        )
        r.raise_for_status()
        claim = r.json()
        texts = [m["payload"]["text"] for m in claim["messages"]]
        _say(
            f"6. claimed: claim {claim['claim_id']} epoch {claim['epoch']}, "
            f"lease {claim['lease_ms']} ms, messages {texts} (coalesced into one wake)"
        )
        r = await http.post(
            claim["callbacks"]["done"],
            json={"epoch": claim["epoch"], "acked_offset": claim["tail_offset"]},
            headers={"Authorization": f"Bearer {claim['claim_token']}"},
        )
        r.raise_for_status()
        _say(f"7. done: acked offset {claim['tail_offset']}, next wake: {r.json()['next_wake']}")
        r = await http.get(f"/v1/entities/demo/{entity}")
        d = r.json()["dispatch"]
        _say(
            f"8. entity is {r.json()['status']}: acked {d['acked_offset']} / tail "
            f"{d['tail_offset']}, epoch {d['epoch']}"
        )
    _say("──────────────────────────────────────────────────────────────\n")


@contextlib.asynccontextmanager
async def _sse(http: httpx.AsyncClient, runner_id: str) -> AsyncIterator[Any]:
    """Open the runner's wake stream; yield an async iterator of (entry id, wake)."""
    async with http.stream(
        "GET", f"/v1/runners/{runner_id}/wakes", params={"session": "dev-demo"}
    ) as response:
        response.raise_for_status()
        lines = response.aiter_lines()
        first = await anext(lines)  # the ": connected" comment: the stream is live

        async def events() -> AsyncIterator[tuple[str, dict[str, Any]]]:
            entry_id = ""
            async for line in lines:
                if line.startswith("id:"):
                    entry_id = line[3:].strip()
                elif line.startswith("data:"):
                    yield entry_id, json.loads(line[5:])

        assert first.startswith(":"), first
        yield events()


def _print_usage(base: str, token: str, dashboard: str | None = None) -> None:
    auth = f"-H 'Authorization: Bearer {token}'"
    ui = (
        f"\n  dashboard     {base}{dashboard.rstrip('/')}/   (no login in dev mode)"
        if dashboard
        else ""
    )
    _say(f"""pullwake dev is serving {base} — Ctrl-C to stop.{ui}
  API docs      {base}/schema/swagger   (OpenAPI JSON: {base}/schema/openapi.json)
  dev token     {token}   (principal {DEV_PRINCIPAL})
  dev mode also accepts X-Pullwake-Asserted-Email, or no credentials at all (system:dev-local).

Try it:
  curl -s {auth} -X POST {base}/v1/runners -H 'content-type: application/json' \\
       -d '{{"id": "my-laptop", "label": "my laptop"}}'
  curl -s {auth} -X PUT {base}/v1/entities/demo/first -H 'content-type: application/json' \\
       -d '{{"dispatch_policy": {{"targets": [{{"type": "runner", "runner_id": "my-laptop"}}]}}}}'
  curl -sN {auth} '{base}/v1/runners/my-laptop/wakes?session=terminal-1'   # in a 2nd terminal
  curl -s {auth} -X POST {base}/v1/entities/demo/first/messages \\
       -H 'content-type: application/json' -d '{{"payload": {{"text": "hi"}}}}'
  curl -s {auth} {base}/v1/entities/demo/first
  curl -s {auth} {base}/v1/runners/my-laptop/health
""")
