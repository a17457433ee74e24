"""Static checks of the named queries and the migration files (no database needed)."""

from __future__ import annotations

import re
from collections import Counter
from importlib import resources
from pathlib import Path

import pytest

import pullwake
from pullwake.store.migrate import Migration, available_migrations
from pullwake.store.pg import _NAME_RE, load_queries, q

SRC = Path(pullwake.__file__).parent
QUERIES_SQL = SRC / "store" / "queries.sql"
MIGRATIONS = SRC / "store" / "migrations"

# store.fetchrow("name", ...), conn.fetch(\n    "name", ...), self.store.execute("name") ...
_CALL_RE = re.compile(r"\.(fetchrow|fetch|fetchval|execute|_step|_step_rows)\(\s*\"(\w+)\"")
# any call of those methods (to spot calls whose query name is not a literal)
_ANY_CALL_RE = re.compile(r"\.(fetchrow|fetch|fetchval|execute)\(\s*([^\s)][^,)]*)")


def _declared_names() -> list[str]:
    return _NAME_RE.findall(QUERIES_SQL.read_text())


def _referenced() -> dict[str, list[str]]:
    refs: dict[str, list[str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        for _method, name in _CALL_RE.findall(path.read_text()):
            refs.setdefault(name, []).append(str(path.relative_to(SRC)))
    return refs


def test_the_packaged_file_is_the_one_checked() -> None:
    packaged = resources.files("pullwake.store").joinpath("queries.sql").read_text()
    assert packaged == QUERIES_SQL.read_text()


def test_query_names_are_unique() -> None:
    names = _declared_names()
    assert names, "no '-- name:' blocks found"
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    assert not duplicates, f"duplicate query names in queries.sql: {duplicates}"


def test_every_name_line_is_recognised() -> None:
    """A typo such as '--name: x' would silently glue that query onto the previous one."""
    text = QUERIES_SQL.read_text()
    suspicious = [
        line
        for line in text.splitlines()
        if re.match(r"^\s*--\s*name\s*:", line, re.IGNORECASE) and not _NAME_RE.match(line)
    ]
    assert not suspicious, f"malformed '-- name:' lines: {suspicious}"


def test_loaded_queries_match_declared_names_and_are_not_empty() -> None:
    queries = load_queries()
    assert sorted(queries) == sorted(_declared_names())
    for name, sql in queries.items():
        body = "\n".join(
            line for line in sql.splitlines() if line.strip() and not line.strip().startswith("--")
        )
        assert body.strip(), f"query {name} has no SQL"
        assert "-- name:" not in sql, f"query {name} swallowed another block"
        assert q(name) == sql


def test_unknown_query_name_raises_key_error() -> None:
    with pytest.raises(KeyError, match="no_such_query"):
        q("no_such_query")


def test_every_referenced_query_exists() -> None:
    refs = _referenced()
    assert len(refs) >= 20, "the source scan found suspiciously few query references"
    declared = set(_declared_names())
    missing = {name: files for name, files in refs.items() if name not in declared}
    assert not missing, f"queries used in src but missing from queries.sql: {missing}"


def test_every_declared_query_is_used() -> None:
    used = set(_referenced())
    unused = sorted(set(_declared_names()) - used)
    assert not unused, f"queries in queries.sql never used in src/pullwake: {unused}"


# A transaction of named queries, or the connection that runs them, outside store/.
_TRANSACTION_RE = re.compile(r"\.transact\(|\bimport\b[^\n]*\bConn\b")


def test_named_queries_are_called_from_the_store_only() -> None:
    """Outside ``store/`` code calls typed store methods: no query names, argument lists, rows
    or transactions of its own."""
    outside: dict[str, list[str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        relative = path.relative_to(SRC)
        if relative.parts[0] == "store":
            continue
        text = path.read_text()
        found = [name for _method, name in _CALL_RE.findall(text)]
        found += _TRANSACTION_RE.findall(text)
        if found:
            outside[str(relative)] = found
    assert not outside, f"named queries called outside store/: {outside}"


def test_query_names_are_passed_as_literals() -> None:
    """The two scans above only see literal names; flag any other call shape in the source."""
    allowed = {"q(name", "name"}  # the pass-through methods of Conn and Store
    odd: list[str] = []
    for path in sorted(SRC.rglob("*.py")):
        for method, first in _ANY_CALL_RE.findall(path.read_text()):
            first = first.strip()
            if first.startswith('"') or first in allowed:
                continue
            if method == "execute" and first.startswith(("migration.sql", "_BOOKKEEPING")):
                continue  # migrations run raw SQL by design
            if method == "execute" and first == "_ROLLBACK":
                continue  # the pool's connection reset (store/pg.py)
            if method == "execute" and first == "raise_on_error=False":
                continue  # a Redis pipeline (streams/), not a query
            if first.startswith(('f"', "f'")) or first.startswith("'"):
                continue  # raw SQL strings (migrations, bookkeeping)
            odd.append(f"{path.relative_to(SRC)}: .{method}({first}")
    assert not odd, f"query calls without a literal query name: {odd}"


def test_positional_parameters_are_contiguous() -> None:
    """$1..$n with no gap: a gap means an argument is passed but never used (or vice versa)."""
    for name, sql in load_queries().items():
        numbers = sorted({int(n) for n in re.findall(r"\$(\d+)", sql)})
        assert numbers == list(range(1, len(numbers) + 1)), (name, numbers)


# --- migrations ----------------------------------------------------------------------------


def test_migration_files_are_well_named() -> None:
    files = sorted(p.name for p in MIGRATIONS.iterdir() if p.suffix == ".sql")
    assert files
    for name in files:
        assert re.fullmatch(r"\d{4}_[a-z0-9_]+\.sql", name), name


def test_migrations_are_numbered_contiguously_from_0001() -> None:
    migrations = available_migrations()
    versions = [m.version for m in migrations]
    assert versions == list(range(1, len(versions) + 1))
    files = sorted(p.name for p in MIGRATIONS.iterdir() if p.suffix == ".sql")
    assert [f"{m.version:04d}_{m.name}.sql" for m in migrations] == files


def test_migrations_have_sql_and_stable_checksums() -> None:
    for migration in available_migrations():
        assert migration.sql.strip()
        assert re.fullmatch(r"[0-9a-f]{64}", migration.checksum)
        assert migration.checksum == Migration(migration.version, "x", migration.sql).checksum


def test_initial_migration_creates_the_documented_tables() -> None:
    sql = available_migrations()[0].sql.lower()
    for table in (
        "principals_tokens",
        "runners",
        "runner_liveness",
        "entity_types",
        "entities",
        "inbox_messages",
        "entity_events",
        "dispatch_state",
        "wakes",
        "claims",
    ):
        assert re.search(rf"create table (if not exists )?{table}\b", sql), table
