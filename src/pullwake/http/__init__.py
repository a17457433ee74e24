"""Litestar HTTP layer: the plugin, routes, auth and problem responses."""

from pullwake.http.plugin import PullWakePlugin, create_app

__all__ = ["PullWakePlugin", "create_app"]
