"""One engine serves all cameras: frames are gathered into batches of up to max_batch or max_wait_ms.

Cameras are taken round-robin so one fast camera cannot starve the others. A batch waits (at most max_wait_ms)
only for cameras that have no frame in it yet: waiting for a camera's next frame would cost a whole frame
interval of latency (33 ms at 30 fps) for nothing, as a busy camera's queue already holds what is ready.
"""

from __future__ import annotations

import threading
import time
from typing import Optional, Sequence, Union

from edge.batchsize import BatchSize
from edge.sources import Frame, FrameQueue


class Batcher:
    """Pulls frames from the camera queues (which share one Condition) into batches."""

    def __init__(self, queues: Sequence[FrameQueue], max_batch: Union[int, BatchSize], max_wait_ms: float,
                 idle_timeout_s: float = 0.2) -> None:
        """``max_batch``: the station's BatchSize (read at every batch), or a fixed number."""
        if not queues:
            raise ValueError("at least one queue is needed")
        if isinstance(max_batch, int) and max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        cond = queues[0].cond
        if any(q.cond is not cond for q in queues):
            raise ValueError("all queues must share one Condition")
        self.queues = list(queues)
        self.cond: threading.Condition = cond
        self.batch = max_batch if isinstance(max_batch, BatchSize) else BatchSize(max_batch)
        self.max_wait_s = max_wait_ms / 1000.0
        self.idle_timeout_s = idle_timeout_s
        self._next = 0  # round-robin start

    @property
    def max_batch(self) -> int:
        return self.batch.size

    @property
    def finished(self) -> bool:
        """Every source closed and drained."""
        with self.cond:
            return all(q.finished for q in self.queues)

    def _take(self, batch: list[Frame], contributed: set[int]) -> None:
        """Move queued frames into ``batch`` round-robin; ``contributed`` collects the queues they came from."""
        n = len(self.queues)
        progress = True
        while progress and len(batch) < self.max_batch:
            progress = False
            for i in range(n):
                if len(batch) >= self.max_batch:
                    break
                k = (self._next + i) % n
                item = self.queues[k].get_nowait()
                if item is not None:
                    batch.append(item)
                    contributed.add(k)
                    progress = True
            self._next = (self._next + 1) % n

    def next_batch(self, stop: Optional[threading.Event] = None) -> list[Frame]:
        """A batch of 1..max_batch frames; empty when idle for ``idle_timeout_s``, finished or stopped.

        The first frame starts the max_wait clock: a batch never waits longer than that for company, and not at
        all once every camera still delivering has a frame in it.
        """
        batch: list[Frame] = []
        contributed: set[int] = set()
        idle_deadline = time.monotonic() + self.idle_timeout_s
        deadline: Optional[float] = None
        with self.cond:
            while True:
                self._take(batch, contributed)
                if len(batch) >= self.max_batch:
                    return batch
                now = time.monotonic()
                if batch and deadline is None:
                    deadline = now + self.max_wait_s
                if all(q.finished for q in self.queues) or (stop is not None and stop.is_set()):
                    return batch
                if batch and all(k in contributed or q.closed for k, q in enumerate(self.queues)):
                    return batch  # every camera still delivering is in: waiting would only add latency
                until = deadline if deadline is not None else idle_deadline
                if now >= until:
                    return batch
                self.cond.wait(min(until - now, 0.1))
