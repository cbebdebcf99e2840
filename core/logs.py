"""Logging setup shared by the command lines: one format, on stderr, paho's chatter kept at warnings."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str) -> None:
    """Replace the root handlers with one stderr handler at ``level`` (DEBUG, INFO, WARNING, ERROR)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("paho").setLevel(logging.WARNING)
