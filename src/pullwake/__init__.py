"""pullwake: a pull-based wake broker for workers that cannot be reached from outside."""

from pullwake.config import Settings
from pullwake.errors import PullwakeError
from pullwake.http import PullWakePlugin, create_app
from pullwake.model import Principal

__all__ = ["Principal", "PullWakePlugin", "PullwakeError", "Settings", "create_app"]
__version__ = "0.1.0"
