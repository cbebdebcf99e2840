"""Capture cost and rate: MJPEG decoded at reduced scale from its packets, full-size snapshots from the same
JPEG, and ``max_fps`` (a file paced like a camera; a live source's extra frames skipped)."""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from edge_helpers import FifoCamera, read_all

from edge.config import CameraConfig
from edge.sources import CameraSource, FrameQueue, compressed_packets, reduced_decode_flag
from trainer.synthetic import write_clip


def test_reduced_decode_flag_covers_the_model_input() -> None:
    assert reduced_decode_flag((480, 640), (160, 160)) == cv2.IMREAD_REDUCED_COLOR_2  # 240x320 covers 160
    assert reduced_decode_flag((1080, 1920), (160, 160)) == cv2.IMREAD_REDUCED_COLOR_4  # 270x480; 1/8 is 135 high
    assert reduced_decode_flag((1280, 1280), (160, 160)) == cv2.IMREAD_REDUCED_COLOR_8
    assert reduced_decode_flag((240, 320), (160, 160)) == cv2.IMREAD_COLOR  # 1/2 would be 120 high: never enlarge
    assert reduced_decode_flag((160, 160), (160, 160)) == cv2.IMREAD_COLOR


@pytest.fixture(scope="module")
def mjpg_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_clip(tmp_path_factory.mktemp("clip") / "line.avi", (480, 640), 24, [(8, 16)], seed=1, codec="MJPG")


def test_mjpeg_is_decoded_at_reduced_scale_and_fits_like_a_full_decode(mjpg_clip: Path) -> None:
    cap = cv2.VideoCapture(str(mjpg_clip))
    assert compressed_packets(cap)  # an MJPEG file through FFmpeg hands out its JPEGs
    cap.release()
    hw = (160, 160)
    reduced, _ = read_all(CameraConfig(id="cam0", source=str(mjpg_clip)), hw, keep_original=True)
    full, _ = read_all(CameraConfig(id="cam0", source=str(mjpg_clip), reduced_decode=False), hw, keep_original=True)
    assert len(reduced) == len(full) == 24  # a file loses nothing either way
    assert all(f.packet is not None and f.original is None for f in reduced)
    assert all(f.packet is None and f.original is not None for f in full)
    for a, b in zip(reduced, full, strict=True):
        assert a.image.shape == b.image.shape == (160, 160, 3)
        diff = np.abs(a.image.astype(np.int16) - b.image.astype(np.int16))
        assert diff.mean() < 1.5, diff.mean()  # the model sees (almost) the same pixels, defects included
    # the snapshot is the camera's full frame, decoded from the kept JPEG only when asked for
    snap = reduced[10].snapshot_image()
    assert snap.shape == (480, 640, 3)
    assert np.abs(snap.astype(np.int16) - full[10].snapshot_image().astype(np.int16)).mean() < 1.5


def test_lossless_and_small_sources_decode_as_before(tmp_path: Path) -> None:
    ffv1 = write_clip(tmp_path / "lossless.avi", (120, 160), 6, [], seed=2, codec="FFV1")
    cap = cv2.VideoCapture(str(ffv1))
    assert not compressed_packets(cap)  # not MJPEG: the capture is left decoding as usual
    ok, image = cap.read()
    cap.release()
    assert ok and image.shape == (120, 160, 3)
    frames, _ = read_all(CameraConfig(id="cam0", source=str(ffv1)), (64, 64), keep_original=True)
    assert len(frames) == 6 and all(f.packet is None and f.original is not None for f in frames)


def test_max_fps_paces_a_file_like_a_camera(mjpg_clip: Path) -> None:
    t0 = time.monotonic()
    frames, _ = read_all(CameraConfig(id="cam0", source=str(mjpg_clip), max_fps=20.0), (64, 64))
    elapsed = time.monotonic() - t0
    assert len(frames) == 24  # every frame, at the camera's rate
    assert elapsed >= 23 / 20.0 * 0.95, elapsed  # a slower machine can only take longer
    gaps = np.diff([f.t_capture for f in frames])
    assert np.median(gaps) >= 0.045, gaps


def test_max_fps_skips_a_live_sources_extra_frames_without_a_stall(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # FFmpeg probes a pipe for seconds before it opens by default; a camera FIFO is set up like this.
    monkeypatch.setenv("OPENCV_FFMPEG_CAPTURE_OPTIONS", "probesize;4096|analyzeduration;0")
    camera = FifoCamera(tmp_path / "cam.mjpeg")  # ~30 frames/s, like a driver
    queue = FrameQueue(1000)
    cfg = CameraConfig(id="cam0", source=str(camera.path), live=True, max_fps=4.0, stale_timeout_s=2.0)
    src = CameraSource(cfg, (64, 64), queue)
    src.start()
    try:
        deadline = time.monotonic() + 20
        while src.captured == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert src.captured >= 1, "the FIFO camera never delivered"
        taken, written = src.captured, camera.written
        time.sleep(3.0)
        taken, written = src.captured - taken, camera.written - written
    finally:
        src.stop()
        camera.stop()
        src.join()
    assert written >= 20, written  # the driver kept delivering...
    assert 2 <= taken <= 3.0 * 4 + 2, (taken, written)  # ...but at most ~4 a second were taken
    assert src.reconnects == 0  # skipping is not silence: the watchdog never fired


def test_capture_threads_run_below_inference(mjpg_clip: Path) -> None:
    import os

    base = os.getpriority(os.PRIO_PROCESS, 0)
    _, src = read_all(CameraConfig(id="cam0", source=str(mjpg_clip), nice=5), (64, 64))
    assert src.reader_nice == min(19, base + 5)
    assert os.getpriority(os.PRIO_PROCESS, 0) == base  # the calling (inference) thread keeps its priority
