"""Postgres storage: named queries behind typed methods, migrations and the connection pool."""

from pullwake.store.pg import Conn, RawJson, Store, q

__all__ = ["Conn", "RawJson", "Store", "q"]
