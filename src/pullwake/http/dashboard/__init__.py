"""The operator dashboard: server-rendered pages (Jinja2 and htmx, no build step, no CDN) on a
router of the plugin's own, behind the API's authentication.

An API token is entered once on the login page; the browser then holds a session cookie (see
:mod:`.session`). Each principal sees what the API would show it: the runners it owns, the
entities it created or is a member of. Actions go through the same use cases as the API.
"""

from __future__ import annotations

from pullwake.http.dashboard.routes import dashboard_router

__all__ = ["dashboard_router"]
