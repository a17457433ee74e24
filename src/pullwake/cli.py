"""The composition root: ``pullwake serve | migrate | tokens | inspect | send | dev | ...``."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pullwake import __version__, preflight, tracing
from pullwake.config import Settings, redact_url
from pullwake.errors import ConfigError, PullwakeError

if TYPE_CHECKING:
    from pullwake.core.tokens import Tokens
    from pullwake.store import Store
    from pullwake.store.tokens import TokenRow

__all__ = ["build_parser", "main"]

log = logging.getLogger("pullwake")


def build_parser() -> argparse.ArgumentParser:
    """The ``pullwake`` argument parser (one subcommand per process or tool)."""
    parser = argparse.ArgumentParser(
        prog="pullwake",
        description="pullwake: a pull-based wake broker. Runners behind NAT pull wakes over an "
        "outbound connection; Postgres keeps every decision, Redis Streams deliver.",
        epilog="Server-side commands read PULLWAKE_DATABASE_URL and PULLWAKE_REDIS_URL (migrate, "
        "prune and tokens only the first); `runner` talks HTTP only: PULLWAKE_SERVER_URL and "
        "PULLWAKE_TOKEN. `dev` starts embedded Postgres/Redis when those URLs are unset. "
        "`pip install pullwake` brings `runner` and `send`; the other commands need "
        "`pip install 'pullwake[server]'`.",
    )
    parser.add_argument("--version", action="version", version=f"pullwake {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the HTTP API (Litestar on uvicorn)")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=_port, default=8000, help="port (default 8000)")
    serve.add_argument(
        "--no-migrate",
        action="store_true",
        help="do not apply migrations first (default: apply them, once, before serving)",
    )
    serve.add_argument(
        "--access-log",
        action="store_true",
        help="log one line per request (default off: it costs a few %% of the server's CPU; "
        "/metrics counts sends, claims and their outcomes)",
    )
    serve.add_argument(
        "--workers",
        type=_positive,
        default=1,
        metavar="N",
        help="server processes sharing the port, under uvicorn's supervisor (default 1: this "
        "process serves); migrations run once, before they start",
    )
    limits = serve.add_argument_group(
        "connection limits",
        "uvicorn's own limits. A public API belongs behind a reverse proxy (nginx, Caddy, a "
        "cloud load balancer) that times out slow clients: these only bound the damage.",
    )
    limits.add_argument(
        "--limit-concurrency",
        type=_positive,
        default=None,
        metavar="N",
        help="answer 503 once N connections and requests are open (default: no limit); count "
        "one per open wake stream",
    )
    limits.add_argument(
        "--timeout-keep-alive",
        type=_positive,
        default=5,
        metavar="S",
        help="close an idle keep-alive connection after S seconds (default 5)",
    )
    limits.add_argument(
        "--max-header-bytes",
        type=_positive,
        default=None,
        metavar="BYTES",
        help="most bytes buffered for a request line + headers not yet complete, which bounds "
        "a slow client's memory. Only uvicorn's h11 parser takes this limit, so it replaces "
        "httptools (the default when installed; its own limit is fixed) with h11 (default: the "
        "parser's own limit, 16384 with h11)",
    )

    sub.add_parser("migrate", help="apply database migrations (idempotent, advisory-locked)")

    prune = sub.add_parser(
        "prune",
        help="delete finished history older than PULLWAKE_RETENTION_MS (one pass)",
        description="One retention pass, as the worker runs every PULLWAKE_RETENTION_INTERVAL_MS: "
        "deletes finished wakes and claims, acked inbox messages and events older than "
        "PULLWAKE_RETENTION_MS (0 keeps everything), PULLWAKE_RETENTION_BATCH rows per "
        "transaction. Offsets, outstanding wakes, active claims and unacked messages are kept. "
        "Prints one line per table and a total. Needs PULLWAKE_DATABASE_URL only.",
    )
    prune.add_argument(
        "--dry-run",
        action="store_true",
        help="count what would be removed, delete nothing (default: delete)",
    )

    worker = sub.add_parser(
        "worker",
        help="run the arq worker: lease expiry, re-delivery, Redis repair, webhook delivery",
        description="Runs pullwake.tasks.WorkerSettings (as `arq pullwake.tasks.WorkerSettings`"
        " would). Several workers may run at once: recovery batches use SKIP LOCKED.",
    )
    worker.add_argument(
        "--once",
        action="store_true",
        help="run one recovery pass, print what it did, and exit (default: run until stopped)",
    )
    worker.add_argument(
        "--metrics-port",
        type=_positive,
        default=None,
        metavar="PORT",
        help="serve this worker's Prometheus metrics (Redis/Postgres reachability, last pass of "
        "each periodic job, pass errors, expired claims, re-deliveries, webhook attempts, pruned "
        "rows) on http://HOST:PORT/metrics (default PULLWAKE_WORKER_METRICS_PORT, else off)",
    )
    worker.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        help="bind address of --metrics-port (default 127.0.0.1)",
    )

    tokens = sub.add_parser(
        "tokens",
        help="create, list and revoke API tokens",
        description="API tokens, stored as hashes. Needs PULLWAKE_DATABASE_URL only.",
    )
    tsub = tokens.add_subparsers(dest="tokens_command", required=True, metavar="ACTION")
    create = tsub.add_parser("create", help="mint a pwk_ token (printed once, stored hashed)")
    create.add_argument(
        "--principal", required=True, help="whose token: user:NAME, service:NAME or system:NAME"
    )
    create.add_argument("--label", default="", help="what the token is for (default: none)")
    tlist = tsub.add_parser(
        "list",
        help="list tokens, oldest first, never their secrets",
        description="One row per token under a header; times are ISO 8601 UTC.",
    )
    tlist.add_argument(
        "--principal", default=None, help="only this principal's tokens (default: everyone's)"
    )
    revoke = tsub.add_parser(
        "revoke",
        help="revoke a token (effective on the next request)",
        description="Revoke by id, or by the token itself: a pwk_ token is looked up by its hash "
        "and only its id is printed.",
    )
    revoke.add_argument(
        "token", metavar="TOKEN", help="the token's id (tok_...) or the token (pwk_...)"
    )

    inspect = sub.add_parser(
        "inspect",
        help="show runner, entity or wake state, or what is stuck (Postgres+Redis)",
        description="Readable pages with human ages; --json gives the same as one JSON "
        "document (ages in seconds). `inspect stuck` lists what waits too long, each line "
        "with the redis-cli command that shows its raw data.",
    )
    isub = inspect.add_subparsers(dest="inspect_command", required=True, metavar="WHAT")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument(
        "--json", action="store_true", help="one JSON document instead of text (default text)"
    )
    irunner = isub.add_parser(
        "runner", parents=[as_json], help="a runner: liveness, backlog, its Redis stream"
    )
    irunner.add_argument("runner_id", help="the runner's id")
    ientity = isub.add_parser(
        "entity", parents=[as_json], help="an entity: status, offsets, claim, last wakes"
    )
    ientity.add_argument("url", help="/type/id")
    iwake = isub.add_parser("wake", parents=[as_json], help="one wake row")
    iwake.add_argument("wake_id", help="the wake's id (wk_...)")
    istuck = isub.add_parser(
        "stuck",
        parents=[as_json],
        help="wakes unclaimed too long, claims at or past their lease, parked entities, "
        "runners not online with work waiting",
        description="Four sections, one query each (at most 50 lines per section): live wakes "
        "unclaimed for longer than --older-than; active claims whose lease passed or passes "
        "within --lease-margin; entities whose dispatch is parked; runners whose liveness "
        "lease passed (or never seen, or disabled) while wakes wait for them. Each line is "
        "followed by the redis-cli command that shows its raw data (it reads the server from "
        "$PULLWAKE_REDIS_URL). Durations: 90 (seconds), 500ms, 30s, 5m, 2h, 1d.",
    )
    istuck.add_argument(
        "--older-than",
        type=_duration,
        default="60s",
        metavar="DURATION",
        help="a wake unclaimed for longer than this is stuck (default 60s: past the worker's "
        "re-delivery, PULLWAKE_REDELIVER_AFTER_MS, 15 s by default)",
    )
    istuck.add_argument(
        "--lease-margin",
        type=_duration,
        default="5s",
        metavar="DURATION",
        help="list active claims whose lease ends within this, or has passed (default 5s)",
    )

    from pullwake.client._calls import DEFAULT_SERVER

    send = sub.add_parser(
        "send",
        help="send a message to an entity (wakes it), or a file of messages, over HTTP",
        description="Send one message (ENTITY and PAYLOAD), or with --file a JSON Lines file of "
        '{"entity": "/type/id", "payload": ..., "idempotency_key"?: ...} objects, in batches '
        "of at most --batch-size through POST /v1/messages, in the file's order. It goes "
        "through the API as the token's principal, under the server's limits. --direct instead "
        "writes through Postgres and Redis, as an operator: needs PULLWAKE_DATABASE_URL and "
        "PULLWAKE_REDIS_URL, skips membership checks and the send rate, and works while the API "
        "is down.",
        epilog="Environment defaults: PULLWAKE_SERVER_URL, PULLWAKE_TOKEN.",
    )
    send.add_argument("url", nargs="?", metavar="ENTITY", help="the entity, /type/id")
    send.add_argument("payload", nargs="?", help='JSON payload, e.g. \'{"text": "hi"}\'')
    send.add_argument(
        "--file",
        default=None,
        help="a JSON Lines file of messages, '-' for stdin (default: send ENTITY PAYLOAD)",
    )
    send.add_argument(
        "--idempotency-key",
        default=None,
        help="a key that makes sending the same message again a no-op (default: none)",
    )
    send.add_argument(
        "--server",
        default=os.environ.get("PULLWAKE_SERVER_URL") or DEFAULT_SERVER,
        help=f"server base URL (PULLWAKE_SERVER_URL, default {DEFAULT_SERVER})",
    )
    send.add_argument(
        "--token",
        default=os.environ.get("PULLWAKE_TOKEN") or None,
        help="API token (default PULLWAKE_TOKEN; prefer the variable: arguments are visible to "
        "other users)",
    )
    send.add_argument(
        "--batch-size",
        type=_positive,
        default=None,
        metavar="N",
        help="messages per batch of --file (default PULLWAKE_MAX_BATCH, 1000; halved while "
        "the server refuses a batch as too large)",
    )
    send.add_argument(
        "--direct",
        action="store_true",
        help="operators: send through Postgres and Redis instead of the API (default: the API)",
    )
    send.add_argument(
        "--as",
        dest="principal",
        default=None,
        help="sender principal with --direct (default system:cli); over HTTP the token's",
    )

    from pullwake.runner.cli import add_parser as add_runner_parser

    add_runner_parser(sub)

    dev = sub.add_parser("dev", help="everything on one machine, with embedded Postgres/Redis")
    dev.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    dev.add_argument("--port", type=_port, default=8000, help="port (default 8000)")
    dev.add_argument("--data-dir", default=".pullwake", help="embedded data (default .pullwake)")
    dev.add_argument(
        "--no-demo",
        action="store_true",
        help="skip the narrated demo and the live view (default: show them)",
    )
    dev.add_argument(
        "--exit-after-demo",
        action="store_true",
        help="stop after the demo (default: keep serving until Ctrl-C)",
    )
    _add_to_every_subcommand(parser, _add_verbose)
    return parser


VERBOSE_HELP = (
    "debug logging (else PULLWAKE_LOG_LEVEL, default INFO; PULLWAKE_LOG_FORMAT=json for one JSON "
    "object per line); also accepted after the command"
)


def _add_verbose(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: unless given here, the value parsed before the command (or its False) stays.
    if "-v" not in parser._option_string_actions:
        parser.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP
        )


def _add_to_every_subcommand(
    parser: argparse.ArgumentParser, add: Callable[[argparse.ArgumentParser], None]
) -> None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                add(child)
                _add_to_every_subcommand(child, add)


def _duration(raw: str) -> Any:
    from pullwake.inspect import parse_duration

    try:
        return parse_duration(raw)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {raw}")
    return value


def _port(raw: str) -> int:
    value = int(raw)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number (0-65535), got {raw}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pullwake`` console script."""
    from pullwake import logs

    args = build_parser().parse_args(argv)
    try:
        logs.configure(*logs.from_env(verbose=args.verbose))
        return _dispatch(args)
    except preflight.PreflightError as exc:
        print(f"pullwake: {exc.line}", file=sys.stderr)
        return exc.exit_code
    except ConfigError as exc:
        print(f"pullwake: configuration error: {exc.detail}", file=sys.stderr)
        return 2
    except PullwakeError as exc:
        print(f"pullwake: {exc.code}: {exc.detail}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    command = args.command
    missing = _missing_extra(args)
    if missing is not None:
        raise missing
    if command in ("runner", "worker", "dev"):  # serve: in each serving process
        tracing.configure(f"pullwake-{command}", enabled=Settings.from_env().otel)
    if command == "runner":
        from pullwake.runner.cli import main as run_runner

        return run_runner(args)
    if command == "dev":
        return _dev(args)
    settings = Settings.from_env()
    if command == "serve":
        return _serve(settings, args)
    if command == "worker" and not args.once:
        return _worker(settings, args)
    handlers = {
        "migrate": _migrate,
        "tokens": _tokens,
        "inspect": _inspect,
        "send": _send,
        "worker": _recover_once,
        "prune": _prune,
    }
    return asyncio.run(handlers[command](settings, args))


def _missing_extra(args: argparse.Namespace) -> preflight.PreflightError | None:
    """Every command but ``runner`` and ``send`` over HTTP needs the server extra; ``dev``
    without Postgres and Redis URLs the embedded one."""
    command = args.command
    if command == "runner" or (command == "send" and not args.direct):
        return None
    if command == "send":
        return preflight.missing_extra("send --direct")
    if command == "dev" and not _configured_urls():
        hint = "(or the server extra, with PULLWAKE_DATABASE_URL and PULLWAKE_REDIS_URL set)"
        return preflight.missing_extra("dev", "embedded", hint)
    return preflight.missing_extra(command)


def _configured_urls() -> bool:
    return all(os.environ.get(f"PULLWAKE_{name}_URL") for name in ("DATABASE", "REDIS"))


def _dev(args: argparse.Namespace) -> int:
    from pullwake.dev.devmode import run_dev

    preflight.check_port("dev", args.host, args.port)  # before embedded servers start
    database_url = os.environ.get("PULLWAKE_DATABASE_URL")
    if database_url:
        preflight.check_postgres(database_url)
    return run_dev(args)


_UNSET = {
    "PULLWAKE_DATABASE_URL": "the Postgres URL, e.g. postgresql://user:password@host:5432/db",
    "PULLWAKE_REDIS_URL": "the Redis URL, e.g. redis://host:6379/0",
}


def _unset(variable: str) -> ConfigError:
    return ConfigError(f"{variable} is not set ({_UNSET[variable]})")


def _database_url(settings: Settings) -> str:
    if not settings.database_url:
        raise _unset("PULLWAKE_DATABASE_URL")
    return settings.database_url


def _require(settings: Settings) -> tuple[str, str]:
    database_url = _database_url(settings)
    if not settings.redis_url:
        raise _unset("PULLWAKE_REDIS_URL")
    return database_url, settings.redis_url


def _check_redis(settings: Settings) -> None:
    """Cluster mode against the servers, before uvicorn or arq start (a mismatch is one line
    here; inside their start-up it would be a traceback)."""
    from pullwake.streams.client import check_redis_mode_sync

    check_redis_mode_sync(settings, arq=True)


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    from pullwake.http.server import serve, server_stack
    from pullwake.store.migrate import apply_migrations

    database_url, _ = _require(settings)
    preflight.check_port("serve", args.host, args.port)
    preflight.check_postgres(database_url, schema=args.no_migrate)
    _check_redis(settings)
    _raise_open_files_limit()
    if not args.no_migrate:  # once, here, before any worker process starts
        applied = asyncio.run(apply_migrations(database_url))
        log.info("migrations: %s", ", ".join(applied) or "up to date")
    loop, http = server_stack(h11=args.max_header_bytes is not None)
    log.info(
        "serving on http://%s:%d (database %s; %d %s, event loop %s, HTTP parser %s)",
        args.host,
        args.port,
        redact_url(settings.database_url),
        args.workers,
        "process" if args.workers == 1 else "worker processes",
        loop,
        http,
    )
    options: dict[str, Any] = {
        "host": args.host,
        "port": args.port,
        "loop": loop,
        "http": http,
        # uvicorn's own loggers at PULLWAKE_LOG_LEVEL too (-v: debug)
        "log_level": logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower(),
        "access_log": args.access_log,
        "timeout_graceful_shutdown": 5,
        "limit_concurrency": args.limit_concurrency,
        "timeout_keep_alive": args.timeout_keep_alive,
    }
    if args.max_header_bytes:  # only the h11 parser takes this limit
        options["h11_max_incomplete_event_size"] = args.max_header_bytes
    return serve(settings, options, workers=args.workers)


def _raise_open_files_limit() -> None:
    """Every open wake stream is a socket: lift the soft limit on open files to the hard one
    (worker processes inherit it)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft >= hard:
        return
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1_048_576)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("open files limit stays %d: %s", soft, exc)
        return
    log.info("open files limit raised from %d to %d (one per open wake stream)", soft, target)


def _worker(settings: Settings, args: argparse.Namespace) -> int:
    from pullwake.tasks import create_worker

    _require(settings)
    _check_redis(settings)
    metrics_port = args.metrics_port or settings.worker_metrics_port
    if metrics_port is not None:
        from prometheus_client import start_http_server

        from pullwake.metrics import WorkerMetrics

        start_http_server(metrics_port, args.metrics_host, registry=WorkerMetrics())
        log.info("worker metrics on http://%s:%d/metrics", args.metrics_host, metrics_port)
    log.info(
        "worker: recovery every %d ms, hygiene every %d ms",
        settings.recovery_interval_ms,
        settings.hygiene_interval_ms,
    )
    create_worker(settings).run()
    return 0


async def _recover_once(settings: Settings, args: argparse.Namespace) -> int:
    from pullwake.core.recovery import summary

    async with _open(settings) as services:
        report = await services.recovery.run_all()
    print(json.dumps(summary(report) or {"changes": 0}))
    return 1 if report.errors else 0


@asynccontextmanager
async def _store(settings: Settings) -> AsyncIterator[Store]:
    """A one-connection store for commands that need Postgres only (no Redis)."""
    from pullwake.store import Store

    database_url = _database_url(settings)
    await preflight.probe_postgres(database_url, schema=True)
    store = await Store.connect(
        database_url, min_size=1, max_size=1, transaction_pooling=settings.pg_transaction_pooling
    )
    try:
        yield store
    finally:
        await store.close()


async def _prune(settings: Settings, args: argparse.Namespace) -> int:
    from pullwake.core.retention import Retention

    async with _store(settings) as store:
        retention = Retention(store, settings)
        print(_prune_heading(settings.retention_ms, args.dry_run), flush=True)
        report = await retention.prune(dry_run=args.dry_run, progress=_prune_progress)
    for table, count in report.rows.items():
        print(f"  {table:<16}{count:>12}")
    print(f"  {'total':<16}{report.total:>12}")
    return 0


def _prune_heading(retention_ms: int, dry_run: bool) -> str:
    if retention_ms == 0:
        return "retention is off (PULLWAKE_RETENTION_MS=0): nothing is pruned"
    window = f"older than {retention_ms} ms ({_human_ms(retention_ms)})"
    if dry_run:
        return f"dry run, nothing deleted; rows {window} that a prune would remove:"
    return f"rows {window} removed:"


def _human_ms(ms: int) -> str:
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("min", 60_000)):
        if ms >= size:
            return f"{ms / size:.3g} {unit}"
    return f"{ms / 1000:.3g} s"


def _prune_progress(table: str, removed: int) -> None:
    print(f"  ... {table}: {removed} so far", file=sys.stderr, flush=True)


async def _migrate(settings: Settings, args: argparse.Namespace) -> int:
    from pullwake.store.migrate import apply_migrations

    database_url = _database_url(settings)
    await preflight.probe_postgres(database_url)
    applied = await apply_migrations(database_url)
    print("applied: " + ", ".join(applied) if applied else "database is up to date")
    return 0


@asynccontextmanager
async def _open(settings: Settings) -> AsyncIterator[Any]:
    """Postgres and Redis: the services (``inspect``, ``send --direct``, ``worker --once``)."""
    from pullwake.services import open_services

    database_url, _ = _require(settings)
    await preflight.probe_postgres(database_url, schema=True)
    async with open_services(settings, pool_max=2) as services:
        yield services


async def _tokens(settings: Settings, args: argparse.Namespace) -> int:
    from pullwake.authcache import AuthCache
    from pullwake.core.tokens import Tokens
    from pullwake.model import Principal

    principal = None
    if args.tokens_command == "create":
        try:
            principal = Principal.parse(args.principal)
        except ValueError as exc:
            print(f"pullwake: {exc}", file=sys.stderr)
            return 2
    elif args.tokens_command == "revoke" and not args.token.startswith(("tok_", "pwk_")):
        # Never echoed: it might be a secret of another kind, or a token pasted with a typo.
        print(
            "pullwake: TOKEN must be a token id (tok_...) or an API token (pwk_...)",
            file=sys.stderr,
        )
        return 2
    async with _store(settings) as store:
        tokens = Tokens(store, AuthCache.from_settings(settings))
        if principal is not None:
            raw, row = await tokens.create(principal, args.label)
            print(raw)
            print(
                f"# token id {row.id} for {principal.key}; shown once, stored as a hash",
                file=sys.stderr,
            )
        elif args.tokens_command == "list":
            for line in token_table(await tokens.list_tokens(args.principal)):
                print(line)
        else:
            return await _revoke(tokens, args.token)
    return 0


async def _revoke(tokens: Tokens, token: str) -> int:
    token_id = token
    if token.startswith("pwk_"):
        found = await tokens.id_of(token)
        if found is None:
            print("pullwake: NOT_FOUND: no token has this secret", file=sys.stderr)
            return 1
        token_id = found
    row = await tokens.revoke(token_id)
    print(f"revoked {row.id} ({row.principal})")
    return 0


def iso_utc(moment: datetime | None) -> str:
    """The one time format of the CLI's tables: ISO 8601 in UTC to the second, ``-`` for none."""
    if moment is None:
        return "-"
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def token_table(rows: Sequence[TokenRow]) -> list[str]:
    """``tokens list``: a header, then one aligned row per token (the label last, as it is,
    or quoted when it holds anything unprintable)."""
    header = ("ID", "PRINCIPAL", "STATE", "CREATED", "LAST USED", "REVOKED", "LABEL")
    table = [header] + [
        (
            row.id,
            row.principal,
            "revoked" if row.revoked_at else "active",
            iso_utc(row.created_at),
            iso_utc(row.last_used_at),
            iso_utc(row.revoked_at),
            row.label if row.label.isprintable() else repr(row.label),
        )
        for row in rows
    ]
    widths = [max(len(cells[i]) for cells in table) for i in range(len(header) - 1)] + [0]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()
        for cells in table
    ]


async def _inspect(settings: Settings, args: argparse.Namespace) -> int:
    from pullwake.inspect import inspect_entity, inspect_runner, inspect_stuck, inspect_wake

    async with _open(settings) as services:
        if args.inspect_command == "runner":
            report = await inspect_runner(services, args.runner_id, as_json=args.json)
        elif args.inspect_command == "entity":
            report = await inspect_entity(services, args.url, as_json=args.json)
        elif args.inspect_command == "stuck":
            stuck = await inspect_stuck(
                services, older_than=args.older_than, lease_margin=args.lease_margin
            )
            report = stuck.json() if args.json else stuck.text()
        else:
            report = await inspect_wake(services, args.wake_id, as_json=args.json)
    print(report)
    return 0


async def _send(settings: Settings, args: argparse.Namespace) -> int:
    from pullwake import sendfile

    if args.principal is not None and not args.direct:
        print(
            "pullwake send: --as needs --direct: over HTTP the token decides the sender",
            file=sys.stderr,
        )
        return 2
    if args.file is not None:
        if args.url is not None:
            print("pullwake send: give ENTITY and PAYLOAD, or --file, not both", file=sys.stderr)
            return 2
        batch_size = args.batch_size or settings.max_batch
        if args.direct:
            principal = args.principal or "system:cli"
            return await sendfile.send_file_direct(
                settings, args.file, principal, _open, batch_size
            )
        return await sendfile.send_file(args.server, args.token, args.file, batch_size)
    if args.url is None or args.payload is None:
        print("pullwake send: give ENTITY and PAYLOAD, or --file", file=sys.stderr)
        return 2
    message = sendfile.parse_message(args.url, args.payload, args.idempotency_key)
    if isinstance(message, str):
        print(f"pullwake send: {message}", file=sys.stderr)
        return 2
    if args.direct:
        return await sendfile.send_direct(settings, message, args.principal or "system:cli", _open)
    return await sendfile.send_one(args.server, args.token, message)
