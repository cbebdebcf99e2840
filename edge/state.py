"""Small durable station state: the event sequence number, monotonic across restarts.

The counter is written (atomically: write then rename, fsync) before the event carrying it is
published, so a crash can skip numbers but never repeat one. A lock file keeps two processes of the
same station from handing out the same numbers.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import IO, Optional

from edge.bundle import atomic_write_text
from edge.errors import UserError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]


class SeqCounter:
    """``next()`` returns 1, 2, 3, ... per station, continuing where the last run stopped."""

    def __init__(self, state_dir: str | Path, station: str) -> None:
        self.dir = Path(state_dir)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"state_dir {self.dir}: cannot create it ({exc.strerror}); "
                            "set state_dir to a writable folder") from None
        self.path = self.dir / f"{station}.seq.json"
        self._lock = threading.Lock()
        self._lockfile: Optional[IO[str]] = None
        self._acquire_process_lock(station)
        self.value = self._read()

    def _acquire_process_lock(self, station: str) -> None:
        if fcntl is None:
            return
        fh = open(self.dir / f".{station}.lock", "a+", encoding="utf-8")  # noqa: SIM115 (held for the run)
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            raise UserError(f"{self.dir}: another edge-run for station '{station}' is using this state_dir; "
                            "stop it or give this one another station id / state_dir") from None
        self._lockfile = fh

    def _read(self) -> int:
        if not self.path.exists():
            return 0
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            value = int(data["seq"])
            if value < 0:
                raise ValueError(value)
            return value
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{self.path}: unreadable event counter ({type(exc).__name__}); fix it to "
                            '{"seq": <last seq sent>} (deleting it restarts seq at 1)') from None

    def next(self) -> int:
        with self._lock:
            self.value += 1
            atomic_write_text(self.path, json.dumps({"seq": self.value}) + "\n")
            return self.value

    def close(self) -> None:
        if self._lockfile is not None:
            self._lockfile.close()
            self._lockfile = None
