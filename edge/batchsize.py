"""The station's batch size: held in one place (``BatchSize``), and picked as the fastest for the backend the
station actually runs on.

Per-frame cost depends on the backend, the graph and the machine (on a 2-core CPU a memory-bank graph was
slower per frame at batch 8 than at 1; a GPU wants large batches), so a fixed number is wrong somewhere.
At start the backend scores blank frames at each power of two up to the configured maximum; the batch with
the most frames per second wins, and a smaller one within ``tolerance`` of it is preferred (lower latency).
"""

from __future__ import annotations

import logging
import time

import numpy as np

from core.backend import Backend

log = logging.getLogger("edge.batchsize")


class BatchSize:
    """The one holder of the station's batch size: the batcher, the stats and the queue sizes read it; only the
    station changes it (``Station.use_batch``: the size auto_batch chose, or a swapped-in bundle's limit).
    A backend's own ``max_batch`` is its capacity (how many frames one call may carry), not this choice."""

    def __init__(self, size: int) -> None:
        self._size = 1
        self.size = size

    @property
    def size(self) -> int:
        return self._size

    @size.setter
    def size(self, value: int) -> None:
        if int(value) < 1:
            raise ValueError(f"batch size must be at least 1, got {value}")
        self._size = int(value)

    def __repr__(self) -> str:
        return f"BatchSize({self._size})"


def candidate_sizes(max_batch: int) -> list[int]:
    sizes = [1]
    while sizes[-1] * 2 <= max_batch:
        sizes.append(sizes[-1] * 2)
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


def measure(backend: Backend, input_hw: tuple[int, int], sizes: list[int], seconds_each: float) -> dict[int, float]:
    """Frames per second at each batch size: the median call, on blank frames, after one warm-up call each.

    The sizes are timed in turns (1, 2, 4, ..., 1, 2, 4, ...), not one after the other: a machine whose speed
    drifts while it is timed (a busy host, a CPU clocking up) then shifts every size alike instead of favouring
    whichever size was timed in its fast moment.
    """
    batches = {n: np.zeros((n, *input_hw, 3), np.uint8) for n in sizes}
    for frames in batches.values():
        backend.infer(frames)  # warm-up: allocations for this shape
    times: dict[int, list[float]] = {n: [] for n in sizes}
    deadline = time.perf_counter() + seconds_each * len(sizes)
    turns = 0  # every size has been timed this many times
    while turns < 3 or (time.perf_counter() < deadline and turns < 50):
        for n, frames in batches.items():
            t0 = time.perf_counter()
            backend.infer(frames)
            times[n].append(time.perf_counter() - t0)
        turns += 1
    return {n: n / float(np.median(t)) for n, t in times.items()}


def fastest_batch(backend: Backend, input_hw: tuple[int, int], max_batch: int, seconds_each: float = 0.3,
                  tolerance: float = 0.02) -> int:
    """The batch size to run with; logs what it measured."""
    rates = measure(backend, input_hw, candidate_sizes(max_batch), seconds_each)
    best = max(rates.values())
    chosen = min(n for n, r in rates.items() if r >= best * (1.0 - tolerance))
    table = ", ".join(f"{n}: {r:.0f}" for n, r in rates.items())
    log.info("batch size %d: fastest on %s here (frames/s by batch size: %s)", chosen, backend.name, table)
    return chosen
