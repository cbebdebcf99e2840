"""Hot model swap: follow ``engines/<model>/current`` (and ``{prefix}/{station}/cmd/reload``), and have the
next bundle verified, loaded and warmed on a thread of its own while the running one keeps scoring; the
station swaps between two batches (edge.pipeline). A bundle that fails any step is refused with one line,
once per version, and the running one stays.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from core.backend import Backend
from core.bundle import Bundle, load_bundle, read_current
from core.errors import BundleError, UserError

log = logging.getLogger("edge.swap")


class BundleWatcher:
    """Loads the promoted bundle of ``model_dir`` when it changes; the station takes it with ``take_ready``."""

    def __init__(self, model_dir: Path, running_version: str, make_backend: Callable[[Bundle], Backend],
                 poll_s: float) -> None:
        self.model_dir = model_dir
        self.make_backend = make_backend
        self.poll_s = poll_s
        self._known = running_version  # the version running or last tried: not tried again unless asked
        self._ready: Optional[tuple[Bundle, Backend]] = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._forced = False
        self._stop = threading.Event()
        self.refused = 0
        self._thread = threading.Thread(target=self._run, name="bundle-watcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(5.0)
        with self._lock:
            ready, self._ready = self._ready, None
        if ready is not None:
            ready[1].close()

    def request_reload(self) -> None:
        """cmd/reload: look at ``current`` now, and retry a version that was refused before."""
        with self._lock:
            self._forced = True
        self._wake.set()

    def take_ready(self) -> Optional[tuple[Bundle, Backend]]:
        """A loaded, warmed bundle and its backend, once; None when there is nothing new."""
        with self._lock:
            ready, self._ready = self._ready, None
            return ready

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.poll_s if self.poll_s > 0 else None)
            self._wake.clear()
            if self._stop.is_set():
                return
            with self._lock:
                forced, self._forced = self._forced, False
            try:
                version: Optional[str] = read_current(self.model_dir)
            except BundleError:
                version = None  # the loader says why when asked to load it
            if version is None and not forced:
                continue
            if version == self._known and not forced:
                continue
            self._known = version or self._known
            self._prepare(version)

    def _prepare(self, version: Optional[str]) -> None:
        t0 = time.monotonic()
        try:
            bundle = load_bundle(self.model_dir)  # verifies format and every checksum
            backend = self.make_backend(bundle)
            try:
                h, w = bundle.input_hw
                backend.infer(np.zeros((1, h, w, 3), np.uint8))  # warm: the first call pays for allocations
            except Exception:
                backend.close()
                raise
        except (UserError, ValueError, RuntimeError, OSError) as exc:
            self.refused += 1
            log.error("new bundle %s refused (%s); the running one keeps scoring", version or "(unreadable current)",
                      str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            return
        with self._lock:
            old, self._ready = self._ready, (bundle, backend)
        if old is not None:
            old[1].close()
        log.info("bundle %s %s verified, loaded and warmed in %.1f s; swapping at the next batch",
                 bundle.model_name, bundle.version, time.monotonic() - t0)
