"""pullwake: a pull-based wake broker for workers that cannot be reached from outside."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from pullwake.config import Settings
from pullwake.errors import PullwakeError
from pullwake.model import Principal

if TYPE_CHECKING:
    from pullwake.http import PullWake, PullWakeConfig, PullWakeDep, PullWakePlugin, create_app

__all__ = [
    "Principal",
    "PullWake",
    "PullWakeConfig",
    "PullWakeDep",
    "PullWakePlugin",
    "PullwakeError",
    "Settings",
    "create_app",
]
_HTTP = frozenset({"PullWake", "PullWakeConfig", "PullWakeDep", "PullWakePlugin", "create_app"})

try:
    __version__ = version("pullwake")  # pyproject.toml's, the one place it is written
except PackageNotFoundError:  # the source tree on sys.path, not installed
    __version__ = "0+unknown"


def __getattr__(name: str) -> Any:
    # The HTTP layer (Litestar) loads on first use, so `pullwake --help` and the runner start fast.
    if name in _HTTP:
        from pullwake import http

        return getattr(http, name)
    raise AttributeError(f"module 'pullwake' has no attribute {name!r}")
