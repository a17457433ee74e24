"""Litestar HTTP layer: the plugin, routes, auth and problem responses."""

from pullwake.http.deps import PullWakeDep
from pullwake.http.host import PullWake
from pullwake.http.plugin import PullWakeConfig, PullWakePlugin, create_app

__all__ = ["PullWake", "PullWakeConfig", "PullWakeDep", "PullWakePlugin", "create_app"]
