"""What capture hands the batcher: a ``Frame``, through a bounded ``FrameQueue`` per camera."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import cv2
import numpy as np


@dataclass
class Frame:
    """One captured frame: the resized model input, and what a snapshot needs (the original, or its JPEG)."""

    camera: str
    index: int
    ts: float  # seconds since the epoch, UTC: file time (recordings) or wall clock (live)
    image: np.ndarray  # uint8 BGR [H, W, 3] at the model's input size
    original: Optional[np.ndarray] = None
    t_capture: float = field(default_factory=time.monotonic)  # for end-to-end latency
    packet: Optional[np.ndarray] = None  # the compressed JPEG, when capture decoded it at reduced scale

    def snapshot_image(self) -> np.ndarray:
        """The frame at camera resolution: decoded from its JPEG only now (a snapshot is rare, frames are not)."""
        if self.packet is not None:
            full = cv2.imdecode(self.packet, cv2.IMREAD_COLOR)
            if full is not None:
                return full
        return self.original if self.original is not None else self.image


class FrameQueue:
    """Bounded FIFO; ``put`` drops the oldest when full (counted), ``put_blocking`` waits for space.

    All queues of a station share one Condition so the batcher can wait on "any camera has a frame".
    """

    def __init__(self, maxsize: int, cond: Optional[threading.Condition] = None) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self.maxsize = maxsize
        self.cond = cond or threading.Condition()
        self._items: deque[Frame] = deque()
        self.dropped = 0
        self.closed = False  # the producer will put no more

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: Frame) -> None:
        with self.cond:
            while len(self._items) >= self.maxsize:  # a loop: maxsize may have been lowered (a model swap)
                self._items.popleft()
                self.dropped += 1
            self._items.append(item)
            self.cond.notify_all()

    def put_blocking(self, item: Frame, stop: threading.Event) -> bool:
        """Wait for space (recordings lose nothing); False when ``stop`` was set first."""
        with self.cond:
            while len(self._items) >= self.maxsize:
                if stop.is_set():
                    return False
                self.cond.wait(0.1)
            self._items.append(item)
            self.cond.notify_all()
            return True

    def get_nowait(self) -> Optional[Frame]:
        """Caller holds ``cond``; wakes a blocked producer."""
        if not self._items:
            return None
        item = self._items.popleft()
        self.cond.notify_all()
        return item

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    @property
    def finished(self) -> bool:
        """Closed and drained: nothing more will ever come out."""
        return self.closed and not self._items
