"""A video file with a damaged stretch in the middle is read to its real end: the frames that cannot be read are
skipped and counted in ``CameraSource.undecodable``, the frames after the damage are scored (an event planted
after it is reported) and edge-run exits 0. Before, the first failed read was taken as the end of the file (an
FFV1 file stopped at frame 149 of 300) and an MJPG file's dropped frames vanished without a count."""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from edge_helpers import make_frame, make_toy_bundle, stream_clip

from edge.config import CameraConfig
from edge.sources import CameraSource, FrameQueue

N = 300
DEFECTS = [(40, 60), (240, 260)]  # one before the damage, one after it


def write_coded(path: Path, codec: str, n: int = N) -> Path:
    """``n`` frames of 64x64 noise (never bright) with the toy model's defects planted in DEFECTS."""
    writer = cv2.VideoWriter(str(path), cv2.CAP_FFMPEG, cv2.VideoWriter.fourcc(*codec), 10.0, (64, 64))
    assert writer.isOpened(), f"OpenCV cannot write {codec} here"
    rng = np.random.default_rng(0)
    for i in range(n):
        writer.write(make_frame(rng, (64, 64), any(a <= i < b for a, b in DEFECTS)))
    writer.release()
    return path


def damage_middle(path: Path, length: int = 20000) -> Path:
    """Overwrite ``length`` bytes in the middle of the file with noise, as a bad sector or a torn copy does."""
    data = bytearray(path.read_bytes())
    start = len(data) // 2
    data[start:start + length] = np.random.default_rng(1).integers(0, 256, length, dtype=np.uint8).tobytes()
    damaged = path.with_name("damaged-" + path.name)
    damaged.write_bytes(bytes(data))
    return damaged


def read_all(source: Path) -> tuple[int, CameraSource]:
    """Every frame a CameraSource delivers from ``source`` (read as edge-run reads it), and the source."""
    queue = FrameQueue(N + 10)
    src = CameraSource(CameraConfig(id="cam0", source=str(source)), (32, 32), queue)
    assert src.open()
    src.start()
    src.join(30.0)
    assert queue.closed, "the capture thread did not reach the end of the file"
    return len(queue), src


@pytest.mark.parametrize("codec", ["FFV1", "MJPG"])
def test_a_damaged_file_is_read_to_its_end_and_the_damaged_frames_are_counted(tmp_path: Path, codec: str) -> None:
    clean = write_coded(tmp_path / f"clip-{codec}.avi", codec)
    delivered, src = read_all(clean)
    assert (delivered, src.undecodable) == (N, 0)  # an intact file: nothing counted as damaged
    t0 = time.monotonic()
    delivered, src = read_all(damage_middle(clean))
    assert src.undecodable > 0, "the damaged frames were not counted"
    assert delivered + src.undecodable == N  # every frame the header counts is either delivered or counted
    assert delivered >= N - 30, f"only {delivered} of {N} frames read: the damage ended the file"
    assert time.monotonic() - t0 < 20  # the retries at the real end are bounded


@pytest.mark.parametrize("codec", ["FFV1", "MJPG"])
def test_edge_run_scores_the_frames_after_the_damage(tmp_path: Path, mosquitto: str, codec: str) -> None:
    bundle = make_toy_bundle(tmp_path / "engines")
    damaged = damage_middle(write_coded(tmp_path / f"clip-{codec}.avi", codec))
    got = stream_clip(tmp_path, mosquitto, bundle, damaged, f"st-damaged-{codec.lower()}")
    cam = got["stats"][-1]["cameras"]["cam0"]
    processed = cam["frames_processed"]
    assert N - 30 <= processed < N, processed  # not half the file; the damaged frames are not scored
    assert cam["undecodable"] == N - processed  # and they are counted in the stats
    starts = [e for e in got["event"] if e["type"] == "start"]
    ends = [e for e in got["event"] if e["type"] == "end"]
    assert len(starts) == len(ends) == 2, got["event"]
    # The defect after the damage is reported (frame numbers count delivered frames: the skipped ones are not).
    assert DEFECTS[1][0] - (N - processed) <= starts[1]["frame"] < DEFECTS[1][1], starts
