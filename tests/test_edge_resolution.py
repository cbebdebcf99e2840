"""A source whose frame size changes mid-stream is re-fitted: an MJPEG stream's reduced decode takes the scale of
the new size (before, the first frame's scale was kept and every later frame was decoded too small and enlarged
back: scored misfitted), each change is logged once and counted in ``CameraSource.refits`` and the stats, and
a station's events on the new size are those of a run that had that size from its start."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
from edge_helpers import make_frame, make_toy_bundle, stream_clip

from edge.config import CameraConfig
from edge.sources import CameraSource, Frame, FrameQueue

BIG, SMALL = (240, 320), (64, 80)  # a 16x16 model input: 1/8 scale fits the big size, only 1/4 the small one
HW = (16, 16)
PART = 80  # frames at each size (25 frames/s: the second event comes after the first one's cooldown)
DEFECTS = [(10, 15), (PART + 40, PART + 45)]  # one at each size; each ends within its part


def jpegs(n: int, size: tuple[int, int], defects: list[tuple[int, int]], seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [cv2.imencode(".jpg", make_frame(rng, size, any(a <= i < b for a, b in defects)))[1].tobytes()
            for i in range(n)]


def write_mjpeg(path: Path, frames: list[bytes]) -> Path:
    """A raw MJPEG stream (JPEGs back to back, what an MJPEG camera or a FIFO from its driver delivers)."""
    path.write_bytes(b"".join(frames))
    return path


def streams(tmp_path: Path) -> tuple[Path, Path]:
    """The stream that switches from BIG to SMALL after PART frames, and its SMALL part alone."""
    big = jpegs(PART, BIG, [DEFECTS[0]], seed=0)
    small = jpegs(PART, SMALL, [(a - PART, b - PART) for a, b in DEFECTS[1:]], seed=1)
    return write_mjpeg(tmp_path / "switches.mjpeg", big + small), write_mjpeg(tmp_path / "small.mjpeg", small)


def read_all(source: Path) -> tuple[list[Frame], CameraSource]:
    queue = FrameQueue(1000)
    src = CameraSource(CameraConfig(id="cam0", source=str(source)), HW, queue, keep_original=True)
    assert src.open()
    src.start()
    src.join(30.0)
    assert queue.closed, "the capture thread did not reach the end of the stream"
    frames = []
    with queue.cond:
        while (item := queue.get_nowait()) is not None:
            frames.append(item)
    return frames, src


def test_a_packet_stream_that_changes_size_is_decoded_at_the_new_sizes_scale(tmp_path: Path, caplog) -> None:
    switches, small = streams(tmp_path)
    frames, src = read_all(switches)
    alone, alone_src = read_all(small)
    assert all(f.packet is not None for f in frames), "not the reduced-decode (packet) path"  # JPEGs kept
    assert len(frames) == 2 * PART and len(alone) == PART
    assert (src.refits, alone_src.refits, src.undecodable) == (1, 0, 0)
    assert src.frame_hw == SMALL
    # After the change every frame is fitted exactly as a stream of that size from its start fits it.
    for after, reference in zip(frames[PART:], alone, strict=True):
        assert np.array_equal(after.image, reference.image), f"frame {after.index} misfitted"
    changes = [r.getMessage() for r in caplog.records if "frame size changed" in r.getMessage()]
    assert changes == ["camera 'cam0': frame size changed from 320x240 to 80x64; frames are re-fitted to the "
                       "model input from the new size"]


def test_a_folder_of_images_of_two_sizes_counts_one_refit(tmp_path: Path) -> None:
    folder = tmp_path / "drop"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        cv2.imwrite(str(folder / f"part{i}.png"), make_frame(rng, BIG if i < 3 else SMALL, False))
    frames, src = read_all(folder)
    assert len(frames) == 6 and src.refits == 1 and src.frame_hw == SMALL
    assert all(f.image.shape[:2] == HW for f in frames)


def test_a_station_whose_stream_changes_size_ends_its_events_at_the_right_scores(tmp_path: Path,
                                                                                mosquitto: str) -> None:
    switches, small = streams(tmp_path)
    bundle = make_toy_bundle(tmp_path / "engines", hw=HW)
    (tmp_path / "switches").mkdir()
    (tmp_path / "alone").mkdir()
    got = stream_clip(tmp_path / "switches", mosquitto, bundle, switches, "st-switch")
    ref = stream_clip(tmp_path / "alone", mosquitto, bundle, small, "st-small")
    cam = got["stats"][-1]["cameras"]["cam0"]
    assert cam["frames_processed"] == 2 * PART and cam["refits"] == 1 and cam["undecodable"] == 0
    ends = [e for e in got["event"] if e["type"] == "end"]
    assert [e["reason"] for e in ends] == ["cleared", "cleared"], json.dumps(got["event"])
    ref_end = next(e for e in ref["event"] if e["type"] == "end")
    assert ends[1]["frame"] == ref_end["frame"] + PART
    assert ends[1]["peak_score"] == ref_end["peak_score"]  # scored as the same size alone: no misfit
    assert 0.0 <= ends[1]["peak_score"] <= 1.0
