"""The station's state folder: one process per station at a time, and the seq of earlier versions.

The state itself (the outbox of events, seq, open events) is in edge/outbox.py. A lock file keeps two processes
of the same station from sharing one spool and handing out the same seq numbers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Optional

from core.errors import UserError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]


class StationLock:
    """Creates ``state_dir`` and holds ``.<station>.lock`` for the life of the run."""

    def __init__(self, state_dir: str | Path, station: str) -> None:
        self.dir = Path(state_dir)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"state_dir {self.dir}: cannot create it ({exc.strerror}); "
                            "set state_dir to a writable folder") from None
        self._lockfile: Optional[IO[str]] = None
        if fcntl is None:
            return
        try:
            fh = open(self.dir / f".{station}.lock", "a+", encoding="utf-8")  # noqa: SIM115 (held for the run)
        except OSError as exc:
            raise UserError(f"state_dir {self.dir}: not writable ({exc.strerror}); "
                            "set state_dir to a writable folder") from None
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            raise UserError(f"{self.dir}: another edge-run for station '{station}' is using this state_dir; "
                            "stop it or give this one another station id / state_dir") from None
        self._lockfile = fh

    def close(self) -> None:
        if self._lockfile is not None:
            self._lockfile.close()
            self._lockfile = None


def legacy_seq(state_dir: str | Path, station: str) -> int:
    """The last seq in ``<station>.seq.json``, the counter of versions before the spool (0 when absent)."""
    path = Path(state_dir) / f"{station}.seq.json"
    if not path.exists():
        return 0
    try:
        value = int(json.loads(path.read_text(encoding="utf-8"))["seq"])
        return max(value, 0)
    except (OSError, ValueError, KeyError, TypeError):
        return 0  # the spool's own counter (or the clock floor) keeps seq monotonic from here on
