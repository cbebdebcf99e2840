"""Hot model swap: follow ``engines/<model>/current`` (and ``{prefix}/{station}/cmd/reload``), and have the
next bundle verified, loaded and warmed on a thread of its own while the running one keeps scoring; the
station swaps between two batches (edge.pipeline). A bundle that fails any step (a checksum, a missing file,
ONNX Runtime refusing its graph or its input size) is refused with one line, once per promotion, and the running
one stays; the next good one promoted is taken. An empty or unreadable ``current`` is said once per cause, and a
``cmd/reload`` that finds the running version promoted swaps nothing (no open event is ended).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from core.backend import Backend
from core.bundle import CURRENT, Bundle, load_bundle, read_current
from core.errors import BundleError

log = logging.getLogger("edge.swap")


class BundleWatcher:
    """Loads the promoted bundle of ``model_dir`` when it changes; the station takes it with ``take_ready``."""

    def __init__(self, model_dir: Path, running_version: str, make_backend: Callable[[Bundle], Backend],
                 poll_s: float) -> None:
        self.model_dir = model_dir
        self.make_backend = make_backend
        self.poll_s = poll_s
        self._running = running_version  # the version the station runs (or takes at its next batch)
        self._known = running_version  # the version last tried: a refused one is not tried again unless asked
        self._problem: Optional[str] = None  # what is wrong with `current` now, said once per cause
        self._failures: set[str] = set()  # causes of unexpected failures already logged
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
        """cmd/reload: look at ``current`` now, and retry a version that was refused before; the running version
        itself is not loaded again (an info line says so)."""
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
                self._look(forced)
            except Exception as exc:  # the watcher outlives whatever its work raises: said once per cause
                cause = f"{type(exc).__name__}: {_one_line(exc)}"
                if cause not in self._failures:
                    self._failures.add(cause)
                    log.error("bundle watcher: %s; the running bundle keeps scoring, still watching %s", cause,
                              self.model_dir / CURRENT)

    def _look(self, forced: bool) -> None:
        """One look at ``current``: prepare a version not tried yet (or any, when ``forced``, but the running one)."""
        try:
            version: Optional[str] = read_current(self.model_dir)
            problem = None if version else (f"{self.model_dir / CURRENT} is empty; it must name one version folder "
                                            "(re-promote a version)")
        except BundleError as exc:
            version, problem = None, _one_line(exc)
        if problem is not None or not version:
            if forced or problem != self._problem:  # once per cause, and to every cmd/reload
                log.warning("%s; the running bundle %s keeps scoring", problem, self._running)
            self._problem = problem
            return
        self._problem = None
        if version == self._running:
            if forced:
                log.info("cmd/reload: already running %s (the promoted version); nothing to swap", version)
            return
        if version == self._known and not forced:
            return  # refused before: tried again on cmd/reload or when promoted anew
        self._known = version
        self._prepare(version)

    def _prepare(self, version: str) -> None:
        t0 = time.monotonic()
        try:
            bundle = load_bundle(self.model_dir)  # verifies format and every checksum
            backend = self.make_backend(bundle)
            try:
                h, w = bundle.input_hw
                backend.infer(np.zeros((1, h, w, 3), np.uint8))  # warm: the first call pays for allocations
            except BaseException:
                backend.close()
                raise
        except Exception as exc:  # a checksum, a missing file, ONNX Runtime refusing the graph or the input size
            self.refused += 1
            log.error("new bundle %s refused (%s); the running one keeps scoring", version, _one_line(exc))
            return
        with self._lock:
            old, self._ready = self._ready, (bundle, backend)
        self._running = bundle.version  # what runs from the next batch on
        self._known = bundle.version
        if old is not None:
            old[1].close()
        log.info("bundle %s %s verified, loaded and warmed in %.1f s; swapping at the next batch",
                 bundle.model_name, bundle.version, time.monotonic() - t0)


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as one bounded log line: ONNX Runtime's messages run over several."""
    text = " ".join(str(exc).split())
    if len(text) > limit:
        text = text[:limit - 1] + "…"
    return text or type(exc).__name__
