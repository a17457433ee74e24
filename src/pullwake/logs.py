"""Log output for every pullwake process: ``PULLWAKE_LOG_FORMAT`` (``text`` or ``json``) and
``PULLWAKE_LOG_LEVEL``, applied to pullwake's, uvicorn's, Litestar's and arq's loggers alike.

One handler on the root logger, on stderr; the libraries' loggers propagate to it. Fields given
with ``extra=`` (``entity``, ``wake``, ``claim``, ``epoch``, ``runner``, ...) are JSON members in
``json`` mode and ``key=value`` pairs after the message in ``text`` mode.
"""

from __future__ import annotations

import json
import logging
import logging.config
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from pullwake.config import LOG_FORMATS, LOG_LEVELS
from pullwake.errors import ConfigError

__all__ = [
    "TEXT_FORMAT",
    "JsonFormatter",
    "TextFormatter",
    "configure",
    "from_env",
    "logging_config",
]

TEXT_FORMAT = "%(asctime)s %(levelname)-5s %(name)s: %(message)s"

# The attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",  # uvicorn's copy of the message with ANSI colours
}
_LIBRARY_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi", "litestar", "arq")


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields a log call passed with ``extra=``."""
    return {
        k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")
    }


def _text_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if not text or any(c.isspace() or c in '"=' for c in text):
        return json.dumps(text)
    return text


class TextFormatter(logging.Formatter):
    """``2026-01-01 12:00:00,000 INFO  pullwake.x: message key=value ...``"""

    def __init__(self, fmt: str = TEXT_FORMAT) -> None:
        super().__init__(fmt)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = fields_of(record)
        if not fields:
            return line
        pairs = " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())
        head, sep, rest = line.partition("\n")  # a traceback stays after the fields
        return f"{head} {pairs}{sep}{rest}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``message``,
    the ``extra=`` fields, and ``exc_info`` / ``stack_info`` when there are any."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        out: dict[str, Any] = {
            "ts": ts.replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in fields_of(record).items():
            out.setdefault(key, value)
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def from_env(env: Mapping[str, str] | None = None, *, verbose: bool = False) -> tuple[str, str]:
    """``(format, level)`` from ``PULLWAKE_LOG_FORMAT`` / ``PULLWAKE_LOG_LEVEL``; ``verbose``
    (``-v``) makes the level DEBUG. A bad value is a :class:`ConfigError`."""
    source = os.environ if env is None else env
    fmt = (source.get("PULLWAKE_LOG_FORMAT") or "text").strip().lower()
    level = (source.get("PULLWAKE_LOG_LEVEL") or "INFO").strip().upper()
    if fmt not in LOG_FORMATS:
        raise ConfigError(
            f"PULLWAKE_LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}, got {fmt!r}"
        )
    if level not in LOG_LEVELS:
        raise ConfigError(
            f"PULLWAKE_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, got {level!r}"
        )
    return fmt, "DEBUG" if verbose else level


def logging_config(fmt: str, level: str) -> dict[str, Any]:
    """A :func:`logging.config.dictConfig` dict (also uvicorn's ``log_config``, applied again in
    each ``serve --workers N`` process): the root handler, and uvicorn's, Litestar's and arq's
    loggers without handlers of their own, propagating to it."""
    formatter = JsonFormatter if fmt == "json" else TextFormatter
    quiet = "DEBUG" if level == "DEBUG" else "WARNING"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"pullwake": {"()": f"{formatter.__module__}.{formatter.__qualname__}"}},
        "handlers": {
            "pullwake": {
                "class": "logging.StreamHandler",
                "formatter": "pullwake",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"handlers": ["pullwake"], "level": level},
        "loggers": {
            **{name: {"handlers": [], "propagate": True} for name in _LIBRARY_LOGGERS},
            "httpx": {"level": quiet},
            "httpcore": {"level": quiet},
            "arq.worker": {"level": quiet},  # one line per job
        },
    }


def configure(fmt: str, level: str) -> None:
    """Apply :func:`logging_config` to this process."""
    logging.config.dictConfig(logging_config(fmt, level))
