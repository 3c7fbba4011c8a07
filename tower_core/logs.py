"""The tower's own log lines (the ``tower.*`` loggers): timestamp, level and logger, on stderr, at TOWER_LOG_LEVEL.

Without a handler of their own their INFO lines (an SLA evaluation's transitions, a replay, alerts sent) were
dropped, and warnings and errors went out bare through Python's last-resort handler: no time, no level."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class _TowerHandler(logging.StreamHandler):
    """Marks the handler this module installed, so configuring twice adds none."""


def configure(level: str) -> None:
    logger = logging.getLogger("tower")
    logger.setLevel(level)
    if not any(isinstance(h, _TowerHandler) for h in logger.handlers):
        handler = _TowerHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
        logger.addHandler(handler)
    logger.propagate = False  # one line per record, whatever else configures the root logger
