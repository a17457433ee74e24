"""Logging for a runner in a program that configured none: like :data:`logging.lastResort`,
but from INFO up, and out of the way as soon as the program configures logging."""

from __future__ import annotations

import logging
import sys

__all__ = ["FORMAT", "StderrFallback", "ensure_logging"]

FORMAT = "%(asctime)s %(levelname)-5s %(name)s: %(message)s"
"""The format of ``pullwake``'s own commands."""

LOGGER = "pullwake"


def _configured(logger: logging.Logger, own: logging.Handler | None) -> bool:
    return any(h is not own and not isinstance(h, logging.NullHandler) for h in logger.handlers)


class StderrFallback(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes ``pullwake`` records to stderr while neither the root logger nor ``pullwake``
    has another handler. Meanwhile the ``pullwake`` logger is at INFO and does not propagate.
    Once the program configures logging, this handler writes nothing more and puts the level
    back at once, and propagation with the first record the program's levels let through: from
    then on the program's own settings decide, and nothing is written twice."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.setFormatter(logging.Formatter(FORMAT))
        self.set_level = False  # the logger's INFO level is this handler's doing
        self.set_propagate = False  # so is its not propagating

    def install(self, logger: logging.Logger) -> None:
        """Take over ``logger`` (at INFO unless its level was set) until logging is set up."""
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
            self.set_level = True
        if logger.propagate:
            logger.propagate = False
            self.set_propagate = True

    def emit(self, record: logging.LogRecord) -> None:
        root, logger = logging.getLogger(), logging.getLogger(LOGGER)
        if not (_configured(root, self) or _configured(logger, self)):
            self.stream = sys.stderr  # the stream of the moment (tests and daemons swap it)
            super().emit(record)
            return
        if self.set_level:
            self.set_level = False
            if logger.level == logging.INFO:
                logger.setLevel(logging.NOTSET)
        if self.set_propagate and record.levelno >= logger.getEffectiveLevel():
            # The logger hands this record on to the root's handlers once this returns.
            self.set_propagate = False
            logger.propagate = True


def ensure_logging() -> StderrFallback | None:
    """Install :class:`StderrFallback` on the ``pullwake`` logger when the program has not
    configured logging (no handler on the root logger or on ``pullwake``); then INFO records
    show, unless the ``pullwake`` logger's level was set. Returns the handler installed now."""
    logger = logging.getLogger(LOGGER)
    fallback = next((h for h in logger.handlers if isinstance(h, StderrFallback)), None)
    if _configured(logging.getLogger(), fallback) or _configured(logger, fallback):
        return None
    installed = None
    if fallback is None:
        fallback = installed = StderrFallback()
        logger.addHandler(fallback)
    fallback.install(logger)
    return installed
