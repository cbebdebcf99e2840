"""The capture threads: their priority, and the ones that may still be blocked inside OpenCV.

A read or open that blocks in OpenCV (a FIFO with no writer, a hung GStreamer pipeline, a silent stream)
cannot be interrupted, only walked away from: ``Attempt`` is how a supervisor does that safely.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:
    from edge.sources.registry import Capture

# Threads that call into OpenCV to open or read a capture. One abandoned while blocked may return at any time,
# and if that happens while the interpreter is shutting down, CPython unwinds it with a forced unwind that
# OpenCV's C++ ``catch (...)`` blocks swallow: "FATAL: exception not rethrown" and SIGABRT after a clean stop.
_OPENCV_THREADS: weakref.WeakSet[threading.Thread] = weakref.WeakSet()


def opencv_thread(target: Callable[..., None], name: str, args: tuple = ()) -> threading.Thread:
    """A daemon thread that will call into a capture, remembered for ``threads_in_opencv``."""
    thread = threading.Thread(target=target, args=args, name=name, daemon=True)
    _OPENCV_THREADS.add(thread)
    return thread


def threads_in_opencv(grace_s: float = 0.0) -> int:
    """How many capture threads may still be inside an OpenCV call, after waiting up to ``grace_s`` for them."""
    deadline = time.monotonic() + grace_s
    alive = [thread for thread in list(_OPENCV_THREADS) if thread.is_alive()]
    for thread in alive:
        thread.join(max(0.0, deadline - time.monotonic()))
    return sum(thread.is_alive() for thread in alive)


def lower_thread_priority(nice: int) -> Optional[int]:
    """Run the calling thread ``nice`` steps below the process (Linux: per-thread nice); its nice value after,
    or None where threads have no priority of their own. Lowering needs no privilege."""
    if not hasattr(os, "setpriority") or not hasattr(threading, "get_native_id"):
        return None
    tid = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, tid)
        if nice > 0:
            os.setpriority(os.PRIO_PROCESS, tid, min(19, current + nice))
        return os.getpriority(os.PRIO_PROCESS, tid)
    except OSError:
        return None


class Attempt:
    """One capture being opened or read on a thread of its own, so the supervisor can walk away from it when
    OpenCV blocks. An abandoned attempt releases its capture itself if its call ever returns; nothing else
    touches that capture again (releasing a capture another thread is blocked in can crash OpenCV)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.abandoned = False
        self.cap: Optional[Capture] = None

    def abandon(self) -> None:
        with self.lock:
            self.abandoned = True

    def keep(self, cap: Capture) -> bool:
        """Store the opened capture; False (and released) when the supervisor has already left."""
        with self.lock:
            if self.abandoned:
                cap.release()
                return False
            self.cap = cap
            return True
