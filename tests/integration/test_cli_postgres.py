"""The CLI against a real Postgres: ``tokens`` with no Redis at all, and one line (never a
traceback) when Postgres is down, the database does not exist or lacks the schema."""

from __future__ import annotations

import asyncio
import re
import secrets
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from pullwake.cli import main
from pullwake.model import hash_token
from pullwake.store.migrate import available_migrations
from pullwake.testing import free_port

from .helpers import ALICE

ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


def _database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


async def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    # main() runs its own event loop: in a thread, as the pullwake command would
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return code, out, err


def _postgres_alone(monkeypatch: pytest.MonkeyPatch, url: str) -> str:
    """``url`` as PULLWAKE_DATABASE_URL and no Redis setting at all."""
    monkeypatch.setenv("PULLWAKE_DATABASE_URL", url)
    monkeypatch.delenv("PULLWAKE_REDIS_URL", raising=False)
    return url


@pytest.fixture
def postgres_only(monkeypatch: pytest.MonkeyPatch, database_url: str) -> str:
    """This run's migrated database and no Redis setting at all."""
    return _postgres_alone(monkeypatch, database_url)


async def test_tokens_need_only_postgres_and_revoke_never_echoes_the_secret(
    postgres_only: str, db: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    code, raw, err = await _run(capsys, "tokens", "create", "--principal", ALICE, "--label", "ci")
    assert code == 0, err
    raw = raw.strip()
    assert raw.startswith("pwk_")
    token_id = re.fullmatch(rf"# token id (tok_\w+) for {re.escape(ALICE)}; .*\n", err)[1]
    code, _, _ = await _run(capsys, "tokens", "create", "--principal", "service:bot")
    assert code == 0

    code, listing, err = await _run(capsys, "tokens", "list")
    assert (code, err) == (0, "")
    header, *rows = listing.splitlines()
    assert header.split() == [
        "ID",
        "PRINCIPAL",
        "STATE",
        "CREATED",
        "LAST",
        "USED",
        "REVOKED",
        "LABEL",
    ]
    assert len(rows) == 2
    assert re.fullmatch(rf"{token_id}  {re.escape(ALICE)}\s+active  {ISO}  -\s+-\s+ci", rows[0])
    assert re.fullmatch(rf"tok_\w+  service:bot\s+active  {ISO}  -\s+-", rows[1])
    code, only, _ = await _run(capsys, "tokens", "list", "--principal", "service:bot")
    assert (code, len(only.splitlines())) == (0, 2)

    # by the token itself: looked up by its hash, only its id printed
    code, out, err = await _run(capsys, "tokens", "revoke", raw)
    assert (code, out, err) == (0, f"revoked {token_id} ({ALICE})\n", "")
    code, listing, _ = await _run(capsys, "tokens", "list", "--principal", ALICE)
    assert re.search(
        rf"^{token_id}  {re.escape(ALICE)}  revoked  {ISO}  -\s+{ISO}  ci$", listing, re.M
    )
    for secret in (raw, hash_token(raw)):
        assert secret not in listing

    # an unknown token is not echoed either; an unknown id is
    unknown = "pwk_" + secrets.token_urlsafe(32)
    code, out, err = await _run(capsys, "tokens", "revoke", unknown)
    assert (code, out, err) == (1, "", "pullwake: NOT_FOUND: no token has this secret\n")
    code, out, err = await _run(capsys, "tokens", "revoke", "tok_0123")
    assert (code, out, err) == (1, "", "pullwake: NOT_FOUND: token 'tok_0123' does not exist\n")


@pytest.mark.parametrize(
    "argv",
    [("migrate",), ("tokens", "list"), ("serve",), ("inspect", "runner", "r"), ("prune",)],
)
async def test_postgres_down_is_one_line(
    argv: tuple[str, ...], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"postgresql://postgres:s3cret@127.0.0.1:{free_port()}/pullwake"  # nothing listens
    monkeypatch.setenv("PULLWAKE_DATABASE_URL", url)
    monkeypatch.setenv("PULLWAKE_REDIS_URL", "redis://127.0.0.1:1/0")
    port = ["--port", str(free_port())] if argv[0] == "serve" else []
    code, out, err = await _run(capsys, *argv, *port)
    assert (code, out) == (1, "")
    assert err == (
        f"pullwake: cannot connect to Postgres (PULLWAKE_DATABASE_URL="
        f"{url.replace('s3cret', '***')}): connection refused; is Postgres running there?\n"
    )


@pytest.mark.parametrize("argv", [("migrate",), ("tokens", "list"), ("serve", "--no-migrate")])
async def test_a_wrong_database_name_is_one_line(
    argv: tuple[str, ...],
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    name = f"pullwake_missing_{secrets.token_hex(4)}"
    url = _database(database_url, name)  # on the test server
    monkeypatch.setenv("PULLWAKE_DATABASE_URL", url)
    monkeypatch.setenv("PULLWAKE_REDIS_URL", "redis://127.0.0.1:1/0")
    port = ["--port", str(free_port())] if argv[0] == "serve" else []
    code, out, err = await _run(capsys, *argv, *port)
    assert (code, out) == (2, "")
    assert err == (
        f'pullwake: database "{name}" does not exist (PULLWAKE_DATABASE_URL={url}): create it '
        "or fix the URL\n"
    )


@pytest.fixture
def empty_database(monkeypatch: pytest.MonkeyPatch, bare_database_url: str) -> str:
    """A database without any pullwake schema, and no Redis setting."""
    return _postgres_alone(monkeypatch, bare_database_url)


async def test_a_database_without_the_schema_says_to_migrate(
    empty_database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    where = f"(PULLWAKE_DATABASE_URL={empty_database}): run `pullwake migrate`"
    code, out, err = await _run(capsys, "tokens", "list")
    assert (code, out) == (2, "")
    assert err == f"pullwake: the database has no pullwake schema {where}\n"

    code, out, _ = await _run(capsys, "migrate")
    assert (code, out.startswith("applied: 0001_initial")) == (0, True)
    latest = available_migrations()[-1]
    conn = await asyncpg.connect(empty_database)
    try:
        await conn.execute("DELETE FROM pullwake_migrations WHERE version = $1", latest.version)
    finally:
        await conn.close()
    code, _, err = await _run(capsys, "tokens", "list")
    assert code == 2
    assert err == (
        f"pullwake: the database lacks 1 of this version's migrations "
        f"({latest.version:04d}_{latest.name}) {where}\n"
    )
