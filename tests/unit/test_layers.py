"""The package's layers, checked over the source files: dev tooling (``pullwake.dev``) stays out
of the library's import path; only the CLI's ``dev`` command reaches it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pullwake

SRC = Path(pullwake.__file__).parent
DEV = "pullwake.dev"


def _imported_modules(tree: ast.AST) -> list[tuple[str, ast.AST]]:
    """Every module an ``import`` or ``from ... import`` names (``from a import b`` counts as
    ``a`` and ``a.b``: ``b`` may be a module), with the node that names it."""
    found: list[tuple[str, ast.AST]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node))
            found += [(f"{node.module}.{alias.name}", node) for alias in node.names]
    return found


def _is_dev(module: str) -> bool:
    return module == DEV or module.startswith(DEV + ".")


def _enclosing_functions(tree: ast.AST) -> dict[ast.AST, str]:
    """Each node inside a function, mapped to the outermost function's name."""
    owner: dict[ast.AST, str] = {}
    for top in ast.walk(tree):
        if isinstance(top, ast.FunctionDef | ast.AsyncFunctionDef):
            for node in ast.walk(top):
                owner.setdefault(node, top.name)
    return owner


def _dev_imports() -> dict[str, list[str]]:
    """Per source file outside ``dev/``: where it imports ``pullwake.dev`` (module, function)."""
    found: dict[str, list[str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        relative = path.relative_to(SRC)
        if relative.parts[0] == "dev":
            continue
        tree = ast.parse(path.read_text(), str(path))
        owner = _enclosing_functions(tree)
        seen: set[ast.AST] = set()
        for module, node in _imported_modules(tree):
            if _is_dev(module) and node not in seen:  # one entry per import statement
                seen.add(node)
                found.setdefault(str(relative), []).append(f"{module} in {owner.get(node)}")
    return found


def test_the_checker_sees_every_kind_of_import() -> None:
    tree = ast.parse(
        "import pullwake.dev.embedded\nfrom pullwake import dev\nfrom pullwake.dev.demo import x\n"
        "from pullwake.devices import y\n"
    )
    modules = [module for module, _ in _imported_modules(tree) if _is_dev(module)]
    assert modules == [
        "pullwake.dev.embedded",
        "pullwake.dev",
        "pullwake.dev.demo",
        "pullwake.dev.demo.x",
    ]


def test_only_the_cli_dev_command_imports_the_dev_package() -> None:
    """The library (runner, client, HTTP API, core, store, streams, testing ...) never imports
    ``pullwake.dev``; the CLI does, lazily, in its ``dev`` command only."""
    found = _dev_imports()
    assert found == {"cli.py": ["pullwake.dev.devmode in _dev"]}


def test_importing_the_library_loads_no_dev_module() -> None:
    """The same rule at run time: importing every library package leaves ``pullwake.dev``
    unloaded (a fresh interpreter, so this test's own imports do not count)."""
    library = [
        "pullwake.cli",
        "pullwake.client",
        "pullwake.core",
        "pullwake.http",
        "pullwake.runner",
        "pullwake.services",
        "pullwake.store",
        "pullwake.streams",
        "pullwake.tasks",
        "pullwake.testing",
    ]
    code = (
        "import sys\n"
        + "".join(f"import {name}\n" for name in library)
        + f"print(sorted(m for m in sys.modules if m == {DEV!r} or m.startswith({DEV + '.'!r})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]"
