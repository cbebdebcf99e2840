"""The drop-oldest capture queue and the cross-camera batcher."""

from __future__ import annotations

import threading
import time

import numpy as np

from core.payloads import iso_utc
from core.preprocess import resize_frame
from edge.batcher import Batcher
from edge.sources import Frame, FrameQueue, source_kind


def frame(cam: str, i: int) -> Frame:
    return Frame(camera=cam, index=i, ts=float(i), image=np.zeros((4, 4, 3), np.uint8))


def test_put_drops_the_oldest_and_counts() -> None:
    q = FrameQueue(3)
    for i in range(10):
        q.put(frame("c", i))
    assert q.dropped == 7
    with q.cond:
        got = [q.get_nowait().index for _ in range(3)]  # type: ignore[union-attr]
        assert q.get_nowait() is None
    assert got == [7, 8, 9]  # the newest survive, in order


def test_put_blocking_waits_for_space_and_loses_nothing() -> None:
    q = FrameQueue(2)
    stop = threading.Event()
    got: list[int] = []

    def producer() -> None:
        for i in range(50):
            assert q.put_blocking(frame("c", i), stop)
        q.close()

    t = threading.Thread(target=producer)
    t.start()
    b = Batcher([q], max_batch=4, max_wait_ms=5)
    while not b.finished:
        got += [f.index for f in b.next_batch()]
    t.join(5)
    assert got == list(range(50)) and q.dropped == 0


def test_put_blocking_gives_up_when_stopped() -> None:
    q = FrameQueue(1)
    stop = threading.Event()
    q.put(frame("c", 0))
    stop.set()
    assert q.put_blocking(frame("c", 1), stop) is False


def test_batches_are_capped_at_max_batch() -> None:
    q = FrameQueue(100)
    for i in range(10):
        q.put(frame("c", i))
    q.close()
    b = Batcher([q], max_batch=4, max_wait_ms=1000)
    sizes = []
    while True:
        batch = b.next_batch()
        if not batch:
            break
        sizes.append(len(batch))
    assert sizes == [4, 4, 2]  # the last one does not wait: the source is finished


def test_a_partial_batch_goes_out_after_max_wait() -> None:
    q = FrameQueue(10)
    q.put(frame("c", 0))  # the queue stays open: only max_wait can end this batch
    b = Batcher([q], max_batch=8, max_wait_ms=20)
    assert [f.index for f in b.next_batch()] == [0]


def test_cameras_share_batches_round_robin() -> None:
    cond = threading.Condition()
    qa, qb = FrameQueue(10, cond), FrameQueue(10, cond)
    for i in range(6):
        qa.put(frame("a", i))
    qb.put(frame("b", 0))
    b = Batcher([qa, qb], max_batch=4, max_wait_ms=0)
    cams = [f.camera for f in b.next_batch()]
    assert len(cams) == 4 and "b" in cams  # one busy camera cannot starve another


def test_idle_batcher_returns_empty() -> None:
    q = FrameQueue(2)
    assert Batcher([q], max_batch=2, max_wait_ms=1, idle_timeout_s=0.01).next_batch() == []


def test_source_kinds_and_helpers() -> None:
    assert source_kind("0") == "camera"
    assert source_kind("rtsp://cam/stream") == "url"
    assert source_kind("videotestsrc ! videoconvert ! appsink") == "gstreamer"
    assert source_kind("/dev/video0") == "camera"
    assert source_kind("clip.avi") == "file"
    out = resize_frame(np.full((48, 64), 7, np.uint8), (12, 16))
    assert out.shape == (12, 16, 3) and out.dtype == np.uint8
    assert iso_utc(0.0) == "1970-01-01T00:00:00.000Z"


def test_a_batch_waits_only_for_cameras_not_yet_in_it() -> None:
    # One camera: its next frame is a frame interval away, so a batch goes out at once, however long max_wait.
    q = FrameQueue(10)
    q.put(frame("c", 0))
    t0 = time.monotonic()
    assert [f.index for f in Batcher([q], max_batch=8, max_wait_ms=5000).next_batch()] == [0]
    assert time.monotonic() - t0 < 2.0
    # Two cameras: the batch waits for the second one's frame (within max_wait), then goes out without more.
    cond = threading.Condition()
    qa, qb = FrameQueue(10, cond), FrameQueue(10, cond)
    qa.put(frame("a", 0))
    later = threading.Timer(0.1, lambda: qb.put(frame("b", 0)))
    later.start()
    t0 = time.monotonic()
    batch = Batcher([qa, qb], max_batch=8, max_wait_ms=5000).next_batch()
    later.join()
    assert sorted(f.camera for f in batch) == ["a", "b"]
    assert time.monotonic() - t0 < 2.0
