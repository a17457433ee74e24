"""Frozen settings read once from ``PULLWAKE_*`` environment variables."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import msgspec

from pullwake.errors import ConfigError

__all__ = ["PAGE_LIMIT_CEILING", "Settings", "redact_url"]

PAGE_LIMIT_CEILING = 1_000
"""The largest page size the API documents; ``PULLWAKE_PAGE_LIMIT_MAX`` may only lower it."""


def redact_url(url: str | None) -> str | None:
    """Return ``url`` with any password replaced by ``***`` (safe to log)."""
    if not url:
        return url
    parts = urlsplit(url)
    if parts.password is not None:
        parts = parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@"))
    if parts.query:
        query = [
            f"{k}=***" if k.lower() in _SECRET_QUERY_KEYS else f"{k}={v}" if sep else k
            for k, sep, v in (item.partition("=") for item in parts.query.split("&"))
        ]
        parts = parts._replace(query="&".join(query))
    return urlunsplit(parts)


LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_SECRET_QUERY_KEYS = {"password", "passwd", "sslpassword", "token", "secret"}
# Numbers for which zero means something: an empty pool, retention off (keep everything), no
# auth cache.
_ZERO_ALLOWED = ("pg_pool_min", "retention_ms", "auth_cache_ttl_ms")


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"expected a boolean (1/0, true/false), got {raw!r}")


DASHBOARD_PATH = re.compile(r"/|(?:/(?!\.{1,2}(?:/|$))[A-Za-z0-9_.-]+)+/?")
"""What ``PULLWAKE_DASHBOARD_PATH`` (and ``PullWakeConfig.dashboard_path``) may be."""


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """Every tunable of pullwake; read from the environment by :meth:`from_env`."""

    database_url: str | None = None
    redis_url: str | None = None
    redis_cluster: bool = False  # PULLWAKE_REDIS_URL names a node of a Redis Cluster
    arq_redis_url: str | None = None  # arq's standalone Redis; default redis_url
    redis_key_prefix: str = "pullwake"
    dev_asserted_auth: bool = False
    claim_lease_ms: int = 30_000
    runner_lease_ms: int = 90_000
    max_runner_lease_ms: int = 3_600_000
    redeliver_after_ms: int = 15_000
    recovery_interval_ms: int = 1_000
    recovery_batch: int = 100
    stranded_after_ms: int = 15_000
    hygiene_interval_ms: int = 60_000
    sweep_interval_ms: int = 60_000
    consumer_idle_ms: int = 3_600_000
    stream_retention_ms: int = 3_600_000
    max_body_bytes: int = 1_048_576
    max_payload_bytes: int = 262_144
    public_url: str = "http://127.0.0.1:8000"
    max_attempts: int = 5
    claim_batch_messages: int = 100
    claim_batch_bytes: int = 262_144
    page_limit_max: int = 1_000
    max_sse_per_runner: int = 16
    send_rate_per_s: int | None = None
    send_burst: int | None = None
    stream_maxlen: int = 100_000
    sse_keepalive_ms: int = 15_000
    sse_block_ms: int = 5_000  # the wake reader polls every session's stream this often
    redis_max_connections: int = 16  # a process's Redis connections (callers wait for one)
    pg_pool_min: int = 1
    pg_pool_max: int = 10
    pg_transaction_pooling: bool = False  # the pool goes through PgBouncer in transaction mode
    webhook_secret: str | None = None
    webhook_max_attempts: int = 8
    webhook_backoff_ms: int = 1_000
    webhook_timeout_ms: int = 10_000
    webhook_allow_private: bool = False
    max_runners_per_principal: int = 1_000
    max_sse_per_principal: int = 256
    retention_ms: int = 604_800_000  # 7 days; 0 keeps everything
    retention_batch: int = 1_000
    retention_interval_ms: int = 60_000
    webhook_concurrency: int = 50
    max_batch: int = 1_000
    auth_cache_ttl_ms: int = 5_000  # 0: no cache, every request looks its token and runner up
    auth_cache_max_entries: int = 10_000
    auth_cache_strict: bool = True
    listen_database_url: str | None = None  # the auth cache's LISTEN; default database_url
    combine_sends: bool = True  # sends arriving while others are in flight share one call
    worker_metrics_port: int | None = None  # pullwake worker's /metrics; --metrics-port wins
    metrics_top_runners: int = 20  # runners with their own /metrics series; the rest: _other
    log_format: str = "text"  # text | json (one JSON object per line)
    log_level: str = "INFO"  # DEBUG | INFO | WARNING | ERROR; -v on the command line: DEBUG
    dashboard_path: str | None = None  # create_app's (pullwake serve's) dashboard; None: off

    def __repr__(self) -> str:
        shown = []
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if name == "webhook_secret" and value:
                value = "***"
            elif name in {"database_url", "redis_url", "arq_redis_url", "listen_database_url"}:
                value = redact_url(value)
            shown.append(f"{name}={value!r}")
        return f"Settings({', '.join(shown)})"

    __str__ = __repr__

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``PULLWAKE_<FIELD>`` variables; ``overrides`` win."""
        source = os.environ if env is None else env
        values: dict[str, Any] = {}
        for name, field_type in cls.__annotations__.items():
            raw = source.get(f"PULLWAKE_{name.upper()}")
            if raw is None:
                continue
            values[name] = _parse(name, str(field_type), raw)
        values.update(overrides)
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raise :class:`ConfigError` when a value is out of its sane range."""
        for name in self.__struct_fields__:
            value = getattr(self, name)
            # Every number is a size, a count, a rate or a duration: zero or less is a mistake.
            if type(value) is int and value <= 0 and name not in _ZERO_ALLOWED:
                raise ConfigError(f"PULLWAKE_{name.upper()} must be positive, got {value}")
        for name in _ZERO_ALLOWED:
            if getattr(self, name) < 0:
                raise ConfigError(f"PULLWAKE_{name.upper()} must not be negative")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", self.redis_key_prefix):
            raise ConfigError(
                "PULLWAKE_REDIS_KEY_PREFIX must be 1-64 characters of letters, digits, _ . -"
            )
        if self.redis_max_connections < 2:
            raise ConfigError(
                "PULLWAKE_REDIS_MAX_CONNECTIONS must be at least 2 (one is the wake reader's "
                "pub/sub connection)"
            )
        if self.pg_pool_min > self.pg_pool_max:
            raise ConfigError("PULLWAKE_PG_POOL_MIN must not exceed PULLWAKE_PG_POOL_MAX")
        if self.page_limit_max > PAGE_LIMIT_CEILING:
            raise ConfigError(f"PULLWAKE_PAGE_LIMIT_MAX must be at most {PAGE_LIMIT_CEILING}")
        if not self.public_url.startswith(("http://", "https://")):
            raise ConfigError("PULLWAKE_PUBLIC_URL must be an http(s) URL")
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(
                f"PULLWAKE_LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}, "
                f"got {self.log_format!r}"
            )
        if self.dashboard_path is not None and not DASHBOARD_PATH.fullmatch(self.dashboard_path):
            raise ConfigError(
                "PULLWAKE_DASHBOARD_PATH must be a path such as /ui (letters, digits, - _ . /), "
                f"got {self.dashboard_path!r}"
            )
        if self.log_level.upper() not in LOG_LEVELS:
            raise ConfigError(
                f"PULLWAKE_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}"
            )
        if self.send_burst is not None and self.send_rate_per_s is None:
            raise ConfigError("PULLWAKE_SEND_BURST needs PULLWAKE_SEND_RATE_PER_S")

    @property
    def send_burst_effective(self) -> int:
        """The send bucket's size: ``send_burst``, else two seconds of ``send_rate_per_s``."""
        return self.send_burst or 2 * (self.send_rate_per_s or 0)

    def with_(self, **changes: Any) -> Settings:
        """Return a copy with ``changes`` applied and validated."""
        updated = msgspec.structs.replace(self, **changes)
        updated.validate()
        return updated


def _parse(name: str, type_name: str, raw: str) -> Any:
    if "None" in type_name and not raw.strip():
        return None  # set but empty: unset
    try:
        if type_name.startswith("bool"):
            return _bool(raw)
        if type_name.startswith("int"):
            return int(raw.strip())
    except ValueError as exc:
        raise ConfigError(f"PULLWAKE_{name.upper()}: {exc}") from None
    return raw
