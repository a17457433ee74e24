"""Settings.from_env: parsing, validation and secret redaction."""

from __future__ import annotations

import pytest

from pullwake.config import Settings, redact_url
from pullwake.errors import ConfigError

_DEFAULTS = Settings()
INT_FIELDS = [name for name in Settings.__struct_fields__ if type(getattr(_DEFAULTS, name)) is int]
BOOL_FIELDS = [
    name for name in Settings.__struct_fields__ if type(getattr(_DEFAULTS, name)) is bool
]


def env_name(field: str) -> str:
    return f"PULLWAKE_{field.upper()}"


def test_defaults_from_empty_environment() -> None:
    s = Settings.from_env({})
    assert s == Settings()
    assert s.database_url is None
    assert s.redis_url is None
    assert s.redis_key_prefix == "pullwake"
    assert s.dev_asserted_auth is False
    assert s.claim_lease_ms == 30_000
    assert s.runner_lease_ms == 90_000
    assert s.redeliver_after_ms == 15_000
    assert s.recovery_interval_ms == 1_000
    assert s.max_body_bytes == 1_048_576
    assert s.public_url == "http://127.0.0.1:8000"
    assert s.max_attempts == 5
    assert s.webhook_secret is None
    assert s.webhook_max_attempts == 8
    assert s.webhook_backoff_ms == 1_000
    assert s.webhook_timeout_ms == 10_000
    assert s.webhook_allow_private is False


def test_documented_variables_are_read() -> None:
    s = Settings.from_env(
        {
            "PULLWAKE_DATABASE_URL": "postgresql://u@db/pw",
            "PULLWAKE_REDIS_URL": "redis://cache:6379/1",
            "PULLWAKE_DEV_ASSERTED_AUTH": "1",
            "PULLWAKE_CLAIM_LEASE_MS": "1234",
            "PULLWAKE_RUNNER_LEASE_MS": "5000",
            "PULLWAKE_REDELIVER_AFTER_MS": "700",
            "PULLWAKE_RECOVERY_INTERVAL_MS": "250",
            "PULLWAKE_MAX_BODY_BYTES": "2048",
            "PULLWAKE_PUBLIC_URL": "https://wake.example.com",
            "PULLWAKE_MAX_ATTEMPTS": "3",
            "PULLWAKE_WEBHOOK_SECRET": "whsec_abc",
            "PULLWAKE_WEBHOOK_MAX_ATTEMPTS": "2",
            "PULLWAKE_WEBHOOK_BACKOFF_MS": "10",
            "PULLWAKE_WEBHOOK_TIMEOUT_MS": "20",
            "PULLWAKE_WEBHOOK_ALLOW_PRIVATE": "true",
            "PULLWAKE_REDIS_KEY_PREFIX": "pwx",
        }
    )
    assert s.database_url == "postgresql://u@db/pw"
    assert s.redis_url == "redis://cache:6379/1"
    assert s.dev_asserted_auth is True
    assert s.claim_lease_ms == 1234
    assert s.runner_lease_ms == 5000
    assert s.redeliver_after_ms == 700
    assert s.recovery_interval_ms == 250
    assert s.max_body_bytes == 2048
    assert s.public_url == "https://wake.example.com"
    assert s.max_attempts == 3
    assert s.webhook_secret == "whsec_abc"
    assert s.webhook_max_attempts == 2
    assert s.webhook_backoff_ms == 10
    assert s.webhook_timeout_ms == 20
    assert s.webhook_allow_private is True
    assert s.redis_key_prefix == "pwx"


def test_every_field_has_an_environment_variable() -> None:
    """Each struct field is reachable through PULLWAKE_<FIELD>."""
    assert INT_FIELDS
    assert BOOL_FIELDS
    for name in INT_FIELDS:
        env = {"PULLWAKE_PG_POOL_MAX": "100", env_name(name): "77"}
        s = Settings.from_env(env)
        assert getattr(s, name) == 77, name
    for name in BOOL_FIELDS:
        assert getattr(Settings.from_env({env_name(name): "yes"}), name) is True, name


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PULLWAKE_CLAIM_LEASE_MS", "4321")
    monkeypatch.setenv("PULLWAKE_DEV_ASSERTED_AUTH", "on")
    s = Settings.from_env()
    assert s.claim_lease_ms == 4321
    assert s.dev_asserted_auth is True


def test_unknown_variables_are_ignored() -> None:
    assert Settings.from_env({"PULLWAKE_NOPE": "x", "OTHER": "1"}) == Settings()


def test_overrides_win_over_environment() -> None:
    s = Settings.from_env({"PULLWAKE_CLAIM_LEASE_MS": "1000"}, claim_lease_ms=2000)
    assert s.claim_lease_ms == 2000


@pytest.mark.parametrize(("raw", "value"), [(" 42 ", 42), ("7", 7), ("+9", 9), ("1_000", 1000)])
def test_int_parsing(raw: str, value: int) -> None:
    assert Settings.from_env({"PULLWAKE_CLAIM_LEASE_MS": raw}).claim_lease_ms == value


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("1", True),
        ("true", True),
        ("TRUE", True),
        ("Yes", True),
        (" on ", True),
        ("0", False),
        ("false", False),
        ("No", False),
        ("off", False),
        ("", False),
    ],
)
def test_bool_parsing(raw: str, value: bool) -> None:
    assert Settings.from_env({"PULLWAKE_DEV_ASSERTED_AUTH": raw}).dev_asserted_auth is value


@pytest.mark.parametrize("raw", ["abc", "1.5", "", "10ms", "0x10"])
def test_bad_int_names_the_variable(raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"PULLWAKE_CLAIM_LEASE_MS": raw})
    assert "PULLWAKE_CLAIM_LEASE_MS" in info.value.detail
    assert info.value.code == "CONFIG_ERROR"


@pytest.mark.parametrize("raw", ["maybe", "2", "enabled", "y"])
def test_bad_bool_names_the_variable(raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"PULLWAKE_WEBHOOK_ALLOW_PRIVATE": raw})
    assert "PULLWAKE_WEBHOOK_ALLOW_PRIVATE" in info.value.detail
    assert repr(raw) in info.value.detail


ZERO_MEANS_SOMETHING = {"pg_pool_min", "retention_ms", "auth_cache_ttl_ms"}


@pytest.mark.parametrize("name", [n for n in INT_FIELDS if n not in ZERO_MEANS_SOMETHING])
@pytest.mark.parametrize("raw", ["0", "-5"])
def test_non_positive_numbers_are_rejected(name: str, raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({env_name(name): raw})
    assert env_name(name) in info.value.detail
    assert "positive" in info.value.detail


def test_pool_min_may_be_zero_but_not_above_max() -> None:
    assert Settings.from_env({"PULLWAKE_PG_POOL_MIN": "0"}).pg_pool_min == 0
    with pytest.raises(ConfigError, match="PULLWAKE_PG_POOL_MIN"):
        Settings.from_env({"PULLWAKE_PG_POOL_MIN": "5", "PULLWAKE_PG_POOL_MAX": "4"})


def test_auth_cache_ttl_zero_turns_the_cache_off_but_not_negative() -> None:
    assert Settings.from_env({}).auth_cache_ttl_ms == 5_000
    assert Settings.from_env({"PULLWAKE_AUTH_CACHE_TTL_MS": "0"}).auth_cache_ttl_ms == 0
    with pytest.raises(ConfigError, match="PULLWAKE_AUTH_CACHE_TTL_MS must not be negative"):
        Settings.from_env({"PULLWAKE_AUTH_CACHE_TTL_MS": "-1"})
    with pytest.raises(ConfigError, match="PULLWAKE_AUTH_CACHE_MAX_ENTRIES must be positive"):
        Settings.from_env({"PULLWAKE_AUTH_CACHE_MAX_ENTRIES": "0"})


def test_retention_defaults_to_seven_days_and_zero_keeps_everything() -> None:
    assert Settings.from_env({}).retention_ms == 7 * 24 * 3600 * 1000
    assert Settings.from_env({}).retention_batch == 1_000
    assert Settings.from_env({}).retention_interval_ms == 60_000
    assert Settings.from_env({"PULLWAKE_RETENTION_MS": "0"}).retention_ms == 0
    assert Settings().with_(retention_ms=0).retention_ms == 0
    with pytest.raises(ConfigError, match="PULLWAKE_RETENTION_MS must not be negative"):
        Settings.from_env({"PULLWAKE_RETENTION_MS": "-1"})


def test_negative_pool_min_is_rejected() -> None:
    with pytest.raises(ConfigError):
        Settings.from_env({"PULLWAKE_PG_POOL_MIN": "-1"})


@pytest.mark.parametrize("raw", ["ftp://x", "127.0.0.1:8000", "", "wake.example.com"])
def test_public_url_must_be_http(raw: str) -> None:
    with pytest.raises(ConfigError, match="PULLWAKE_PUBLIC_URL"):
        Settings.from_env({"PULLWAKE_PUBLIC_URL": raw})


def test_empty_optional_strings_mean_unset() -> None:
    s = Settings.from_env(
        {"PULLWAKE_DATABASE_URL": "", "PULLWAKE_REDIS_URL": "", "PULLWAKE_WEBHOOK_SECRET": ""}
    )
    assert s.database_url is None
    assert s.redis_url is None
    assert s.webhook_secret is None


def test_settings_are_frozen_and_with_validates() -> None:
    s = Settings()
    with pytest.raises(AttributeError):
        s.claim_lease_ms = 1  # type: ignore[misc]
    assert s.with_(claim_lease_ms=5).claim_lease_ms == 5
    assert s.claim_lease_ms == 30_000
    with pytest.raises(ConfigError, match="PULLWAKE_CLAIM_LEASE_MS"):
        s.with_(claim_lease_ms=0)


# --- redaction -----------------------------------------------------------------------------


def test_repr_redacts_passwords_and_webhook_secret() -> None:
    s = Settings(
        database_url="postgresql://pw:hunter2@db.internal:5432/pullwake",
        redis_url="redis://:s3cretpass@cache:6379/0",
        webhook_secret="whsec_topsecretvalue",
    )
    for text in (repr(s), str(s), f"{s}"):
        assert "hunter2" not in text
        assert "s3cretpass" not in text
        assert "whsec_topsecretvalue" not in text
        assert "postgresql://pw:***@db.internal:5432/pullwake" in text
        assert "redis://:***@cache:6379/0" in text
        assert "webhook_secret='***'" in text
        assert "claim_lease_ms=30000" in text


def test_repr_without_secrets_shows_urls_as_they_are() -> None:
    s = Settings(database_url="postgresql://postgres@127.0.0.1/x", redis_url=None)
    text = repr(s)
    assert "database_url='postgresql://postgres@127.0.0.1/x'" in text
    assert "redis_url=None" in text
    assert "webhook_secret=None" in text


def test_config_error_messages_do_not_leak_secrets() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(
            {
                "PULLWAKE_DATABASE_URL": "postgresql://u:hunter2@h/db",
                "PULLWAKE_WEBHOOK_SECRET": "whsec_zzzzzzzzzz",
                "PULLWAKE_CLAIM_LEASE_MS": "nope",
            }
        )
    assert "hunter2" not in str(info.value)
    assert "whsec_zzzzzzzzzz" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        (None, None),
        ("", ""),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("postgresql://user@h/db", "postgresql://user@h/db"),
        ("postgresql://user:pa%40ss@h:5432/db", "postgresql://user:***@h:5432/db"),
        ("rediss://default:p:w@h:6380", "rediss://default:***@h:6380"),
        ("postgresql://u:p@ss@h/db", "postgresql://u:***@h/db"),
    ],
)
def test_redact_url(url: str | None, redacted: str | None) -> None:
    assert redact_url(url) == redacted


def test_redact_url_query_password() -> None:
    redacted = redact_url("postgresql://u@h/db?password=hunter2")
    assert redacted is not None
    assert "hunter2" not in redacted


# --- Redis Cluster ---------------------------------------------------------------------------


def test_cluster_mode_and_arq_url_are_read_and_redacted() -> None:
    s = Settings.from_env(
        {
            "PULLWAKE_REDIS_URL": "redis://node-1:7000/0",
            "PULLWAKE_REDIS_CLUSTER": "1",
            "PULLWAKE_ARQ_REDIS_URL": "redis://:arqpass@queue:6379/0",
        }
    )
    assert s.redis_cluster is True
    assert s.arq_redis_url == "redis://:arqpass@queue:6379/0"
    assert "arqpass" not in repr(s)
    assert "arq_redis_url='redis://:***@queue:6379/0'" in repr(s)
    assert Settings.from_env({}).redis_cluster is False
    assert Settings.from_env({"PULLWAKE_ARQ_REDIS_URL": ""}).arq_redis_url is None
