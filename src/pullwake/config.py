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
    """Every tunable of pullwake; read from the environment by :meth:`from_env`.

    Field ``x`` is the variable ``PULLWAKE_X``. The string under each field is its
    documentation: the docs site's configuration page is generated from it, and
    ``tests/unit/test_docs.py`` fails for a field without one.
    """

    database_url: str | None = None
    """Postgres DSN (`postgresql://user:password@host:5432/db`). Required by `serve`, `worker`,
    `migrate`, `prune`, `tokens`, `inspect` and `send --direct`; `pullwake dev` starts an
    embedded Postgres when it is unset. `pullwake runner` and `pullwake send` over HTTP never
    read it."""
    redis_url: str | None = None
    """Redis URL: the server, or with `PULLWAKE_REDIS_CLUSTER=1` any node of the cluster (database
    0). Required by `serve`, `worker`, `inspect` and `send --direct` (not by `migrate`, `prune`
    or `tokens`, which use Postgres only); `pullwake dev` starts an embedded Redis when it is
    unset."""
    redis_cluster: bool = False
    """`PULLWAKE_REDIS_URL` names a node of a Redis Cluster: wake streams and limits live on the
    cluster (see [Redis Cluster](redis-cluster.md)). A server that disagrees stops `serve`,
    `worker` and the CLI with one `configuration error` line."""
    arq_redis_url: str | None = None
    """The standalone Redis of arq's queue (webhook jobs); unset, `PULLWAKE_REDIS_URL`. Required
    with `PULLWAKE_REDIS_CLUSTER=1`, since arq has no cluster support."""
    redis_key_prefix: str = "pullwake"
    """First part of every pullwake Redis key and of the arq queue name (1-64 letters, digits, `_ .
    -`); isolates deployments sharing one Redis."""
    dev_asserted_auth: bool = False
    """Accept `X-Pullwake-Asserted-Email` and treat a request without credentials as
    `system:dev-local`. For development only; always on in `pullwake dev`."""
    claim_lease_ms: int = 30_000
    """Claim lease granted at claim time and by each claim heartbeat; also the base of a webhook
    claim's lease."""
    runner_lease_ms: int = 90_000
    """Runner liveness lease when a runner heartbeat names none."""
    max_runner_lease_ms: int = 3_600_000
    """Cap on the `lease_ms` a runner heartbeat may ask for."""
    redeliver_after_ms: int = 15_000
    """A published wake not claimed this long is published again by `redeliver_wakes`, and reported
    as `stale_wakes` by runner health."""
    recovery_interval_ms: int = 1_000
    """How often `expire_claims`, `redeliver_wakes`, `repair_streams` and `stream_hygiene` run in
    the worker."""
    recovery_batch: int = 100
    """Rows per recovery batch (`FOR UPDATE SKIP LOCKED`)."""
    stranded_after_ms: int = 15_000
    """A stream entry idle this long in a consumer's pending list is taken with `XAUTOCLAIM` and
    re-published if its wake is still wanted."""
    hygiene_interval_ms: int = 60_000
    """`stream_hygiene` visits every registered runner's stream at least this often (a slice per
    recovery pass)."""
    sweep_interval_ms: int = 60_000
    """`repair_streams` checks every runner with outstanding wakes at least this often (a slice per
    recovery pass, at least 50 runners), besides the runners an event queued and the full check
    after a Redis loss."""
    consumer_idle_ms: int = 3_600_000
    """Stream hygiene deletes consumers idle this long that have nothing pending."""
    stream_retention_ms: int = 3_600_000
    """Stream hygiene keeps entries this long (for inspection), then `XTRIM MINID`, never past a
    pending or unread entry."""
    max_body_bytes: int = 1_048_576
    """Request body limit on `/v1` (`413 PAYLOAD_TOO_LARGE` past it)."""
    max_payload_bytes: int = 262_144
    """Size limit of one message or event payload, encoded as JSON."""
    public_url: str = "http://127.0.0.1:8000"
    """Base of the callback URLs in wake notifications (claims and webhooks): set it to the address
    runners reach (`pullwake dev` sets it for you). Must be `http(s)`."""
    max_attempts: int = 5
    """Claims in a row that end with work left and no progress before the entity is parked."""
    claim_batch_messages: int = 100
    """At most this many inbox messages in a claim response."""
    claim_batch_bytes: int = 262_144
    """Payload budget of those messages (at least one message is always included)."""
    page_limit_max: int = 1_000
    """Largest `limit` of message and event pages; at most 1000, so it may only be lowered."""
    max_sse_per_runner: int = 16
    """Open wake streams per runner id, across all API replicas (`429` past it)."""
    send_rate_per_s: int | None = None
    """Opt-in send limit: messages per second per principal (a token bucket's refill), across
    replicas; unset, no limit."""
    send_burst: int | None = None
    """Size of that bucket; unset, twice the rate. Needs `PULLWAKE_SEND_RATE_PER_S`."""
    stream_maxlen: int = 100_000
    """`XADD ... MAXLEN ~` trim length of each runner stream."""
    sse_keepalive_ms: int = 15_000
    """Idle time before an SSE `: keep-alive` comment; also how often the open streams' callers are
    re-checked (one query for all of a process's streams)."""
    sse_block_ms: int = 5_000
    """How often the wake reader polls every open stream's runner stream besides the notifications:
    the longest a wake whose notification was lost waits (at most 500 polls a second per
    process: with more than 2,500 runners streaming to one process, a round takes runners / 500
    s)."""
    redis_max_connections: int = 16
    """Most Redis connections of an API or worker process, whatever the number of open wake
    streams: a bounded pool (callers wait for a free connection) plus the wake reader's one
    pub/sub connection; at least 2. arq's enqueue pool for webhook jobs is apart."""
    pg_pool_min: int = 1
    """asyncpg pool minimum size per API or worker process (may be 0)."""
    pg_pool_max: int = 10
    """asyncpg pool maximum size per API or worker process (the CLI tools use at most 2)."""
    pg_transaction_pooling: bool = False
    """`PULLWAKE_DATABASE_URL` goes through a transaction-pooling PgBouncer (`pool_mode =
    transaction`): asyncpg's prepared statement cache is off, and without
    `PULLWAKE_LISTEN_DATABASE_URL` so is the auth cache (see [PgBouncer](scaling.md#pgbouncer))."""
    webhook_secret: str | None = None
    """Signing key for webhook targets that name no `secret`; with neither, deliveries are
    unsigned."""
    webhook_max_attempts: int = 8
    """Delivery attempts before a webhook wake fails (a dead letter; the entity is parked)."""
    webhook_backoff_ms: int = 1_000
    """First webhook retry delay; doubles per attempt, capped at 60 s, plus or minus 20 % jitter."""
    webhook_timeout_ms: int = 10_000
    """Timeout of one whole webhook delivery attempt (connect, send, read the answer)."""
    webhook_allow_private: bool = False
    """Allow loopback and private webhook addresses (tests, local use)."""
    max_runners_per_principal: int = 1_000
    """Registered runners per principal (`403 FORBIDDEN` past it; updating an existing runner is
    always allowed)."""
    max_sse_per_principal: int = 256
    """Open wake streams of one principal's runners, across all API replicas."""
    retention_ms: int = 604_800_000
    """Finished wakes and claims, acked inbox messages and events older than this are deleted by
    the worker (default 7 days); `0` keeps everything (see [Retention and
    sizing](postgres.md#retention-and-sizing))."""
    retention_batch: int = 1_000
    """Rows per retention statement (each batch is its own short transaction)."""
    retention_interval_ms: int = 60_000
    """How often the worker's `prune_retention` runs."""
    webhook_concurrency: int = 50
    """Webhook deliveries a worker runs at once (arq's job slots; recovery runs outside them)."""
    max_batch: int = 1_000
    """Messages per `POST /v1/messages` batch (and per batch of `pullwake send --file`)."""
    auth_cache_ttl_ms: int = 5_000
    """How long an API process keeps an API token's principal and a runner's owner and admin status
    in memory. A revoke, delete or disable drops them at once on every replica; this bounds the
    rest. `0`: no cache, every request looks its token and runner up."""
    auth_cache_max_entries: int = 10_000
    """Auth cache entries per API process (least recently used first out)."""
    auth_cache_strict: bool = True
    """A cached entry is used only after a round trip on the cache's listener connection that
    started after the request came in (shared by concurrent requests), so a change committed
    before the request is never missed; `0`: no wait, a change counts once its notification
    arrives."""
    listen_database_url: str | None = None
    """The auth cache's `LISTEN` connection (one per API process); unset, `PULLWAKE_DATABASE_URL`
    (none with `PULLWAKE_PG_TRANSACTION_POOLING`). Must reach Postgres in a session of its own:
    not a transaction-pooling PgBouncer."""
    combine_sends: bool = True
    """An API process with two sends in flight queues the next ones and sends them to Postgres
    together, in one call and one commit, each answered as if sent alone (an idle process sends
    at once); `0`: one call per send."""
    worker_metrics_port: int | None = None
    """`pullwake worker` serves its own metrics on this port (`--metrics-port` wins;
    `--metrics-host`, default `127.0.0.1`); unset, off."""
    metrics_top_runners: int = 20
    """Runners with series of their own on `/metrics` (the most unclaimed wakes first); the others
    share the `_other` series (see [Metrics](operating/metrics.md))."""
    log_format: str = "text"
    """`text` (`2026-12-01 17:00:00,123 INFO  pullwake.x: message key=value ...`) or `json` (one
    object per line with `ts`, `level`, `logger`, `message` and the line's fields). Applies to
    pullwake's, uvicorn's, Litestar's and arq's loggers, in every `serve --workers N` process
    and in the worker."""
    otel: bool = False
    """`on`: OpenTelemetry traces (the `otel` extra). The API adds a server span per request
    (Litestar's middleware; wake streams left out) and `serve`, `worker`, `runner` and `dev`
    install the SDK, exporting over OTLP/HTTP as the standard `OTEL_EXPORTER_OTLP_*`,
    `OTEL_TRACES_SAMPLER` and `OTEL_SERVICE_NAME` variables say (see [Tracing](tracing.md))."""
    log_level: str = "INFO"
    """`DEBUG`, `INFO`, `WARNING`, `ERROR` or `CRITICAL` (any case); `-v` on the command line makes
    it `DEBUG`."""
    dashboard_path: str | None = None
    """Where `pullwake serve` (`create_app`) serves the operator dashboard, e.g. `/ui` (see
    [Dashboard](dashboard.md)); unset, not served. `pullwake dev` always serves it at `/ui`."""

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
