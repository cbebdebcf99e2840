"""``max_fps``: how often a capture reader takes a frame."""

from __future__ import annotations

import threading
import time
from typing import Callable, Optional


class FramePace:
    """``max_fps`` for one reader: a live source is read at its own rate and frames in between are skipped
    (``skip``); a recording (video file, image folder) is read at the rate instead (``wait``), as a camera
    would deliver it."""

    _STEP_S = 0.5  # a long wait is taken in steps, each reported as "still here" to the stall watchdog

    def __init__(self, max_fps: Optional[float], skip: bool) -> None:
        self.interval = 1.0 / max_fps if max_fps else 0.0
        self.skip = skip
        self.next_due = time.monotonic()

    def wait(self, stop: threading.Event, still_here: Callable[[], None]) -> bool:
        """Before a read: sleep until the next frame is due (recordings only); False when stopped meanwhile."""
        if not self.interval or self.skip:
            return True
        while True:
            delay = self.next_due - time.monotonic()
            if delay <= 0:
                return True
            if stop.wait(min(delay, self._STEP_S)):
                return False
            still_here()

    def take(self) -> bool:
        """After a read: True when this frame is to be delivered (and the next one is scheduled)."""
        if not self.interval:
            return True
        now = time.monotonic()
        if self.skip and now < self.next_due:
            return False
        # The next slot one interval on; after a long gap restart from now instead of bursting to catch up.
        self.next_due = self.next_due + self.interval if now - self.next_due < self.interval else now + self.interval
        return True
