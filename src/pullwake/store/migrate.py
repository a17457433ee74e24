"""Forward-only SQL migrations applied under an advisory lock and recorded in a table."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from importlib import resources

import asyncpg

__all__ = ["Migration", "apply_migrations", "available_migrations"]

log = logging.getLogger(__name__)
_LOCK_KEY = 0x70756C6C77616B  # "pullwak": one advisory lock for every migrator

_BOOKKEEPING = """
CREATE TABLE IF NOT EXISTS pullwake_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


@dataclass(frozen=True, slots=True)
class Migration:
    """One numbered ``NNNN_name.sql`` file."""

    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def available_migrations() -> list[Migration]:
    """Every migration shipped with the package, in order."""
    folder = resources.files("pullwake.store").joinpath("migrations")
    found = []
    for item in folder.iterdir():
        if item.name.endswith(".sql"):
            number, _, rest = item.name.partition("_")
            found.append(Migration(int(number), rest.removesuffix(".sql"), item.read_text()))
    return sorted(found, key=lambda m: m.version)


async def apply_migrations(dsn: str) -> list[str]:
    """Apply what has not run yet; return the names applied. Safe to run concurrently.

    Works directly and through PgBouncer in transaction mode alike: everything happens in one
    transaction (so on one server connection, the lock is transaction-scoped), and without
    asyncpg's statement cache no named prepared statement is left on that server connection
    for the next migrator's same-named one to collide with."""
    conn = await asyncpg.connect(dsn, statement_cache_size=0)
    applied: list[str] = []
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
            await conn.execute(_BOOKKEEPING)
            done = {
                r["version"]: r["checksum"]
                for r in await conn.fetch("SELECT version, checksum FROM pullwake_migrations")
            }
            for migration in available_migrations():
                if migration.version in done:
                    if done[migration.version] != migration.checksum:
                        log.warning(
                            "migration %04d_%s changed after it was applied",
                            migration.version,
                            migration.name,
                        )
                    continue
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO pullwake_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
                applied.append(f"{migration.version:04d}_{migration.name}")
                log.info("applied migration %s", applied[-1])
    finally:
        await conn.close()
    return applied
