"""The registry of capture source kinds: which kind a source string is, the image-folder kind on real image
files, a kind added from outside by one class, and edge-run on a folder of images end to end."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import cv2
import numpy as np
import pytest
from edge_helpers import (
    Collector,
    assert_seq_monotonic,
    check_events,
    check_payloads,
    make_frame,
    read_all,
    run_cli,
    wait_stopped,
)

from core.errors import UserError
from edge.config import CameraConfig
from edge.sources import (
    FILE_FPS_FALLBACK,
    CameraSource,
    Capture,
    FrameQueue,
    SourceKind,
    describe_open_failure,
    find_kind,
    get_source_kind,
    is_live,
    register_source,
    source_kind,
    source_kinds,
)

BUILT_IN = ["gstreamer", "url", "camera", "folder", "file"]  # the order they are asked in


# -- a kind from outside: one class, registered here, no other edit ----------------------------------
class CountingCapture:
    """``toy://N``: N frames, frame i a uniform grey of 10 * i."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.position = 0

    def read(self) -> tuple[bool, Any]:
        if self.position >= self.count:
            return False, None
        self.position += 1
        return True, np.full((48, 64, 3), 10 * (self.position - 1), np.uint8)

    def release(self) -> None:
        self.position = self.count


@register_source("toy")
class ToyKind(SourceKind):
    order = 5  # before 'url', which would claim any scheme://
    live = False
    hint = "toy sources are toy://<number of frames>"

    def claims(self, source: str) -> bool:
        return source.startswith("toy://")

    def open(self, source: str, timeout_s: float) -> Optional[Capture]:
        return CountingCapture(int(source.strip()[len("toy://"):]))  # raises on toy://many: a kind with a bug

    def frame_rate(self, capture: Capture) -> Optional[float]:
        return 10.0


def grey(image: np.ndarray) -> int:
    return int(round(float(image.mean())))


# -- the registry -------------------------------------------------------------------------------------
def test_the_registry_lists_every_kind_in_the_order_they_are_asked() -> None:
    kinds = source_kinds()
    assert [k for k in kinds if k in BUILT_IN] == BUILT_IN and "toy" in kinds
    assert kinds.index("toy") < kinds.index("url")
    assert kinds[-1] == "file"  # the catch-all is asked last
    kinds_dir = Path(__file__).resolve().parents[1] / "edge" / "sources" / "kinds"
    assert {p.stem for p in kinds_dir.glob("*.py")} - {"__init__"} == set(BUILT_IN)  # one module a kind


@pytest.mark.parametrize("source,kind", [
    ("0", "camera"), (" 2 ", "camera"), ("/dev/video0", "camera"),
    ("rtsp://user:secret@10.0.0.5:554/stream1", "url"), ("http://cam.local/mjpg", "url"),
    ("https://cam.local/video", "url"),
    ("v4l2src device=/dev/video0 ! videoconvert ! appsink", "gstreamer"),
    ("nvarguscamerasrc ! nvvidconv ! video/x-raw,format=BGRx ! appsink", "gstreamer"),
    ("clip.avi", "file"), ("recordings/line 1.mp4", "file"), ("/no/such/folder/", "file"),
    ("toy://3", "toy"),
])
def test_each_source_string_is_claimed_by_its_kind(source: str, kind: str) -> None:
    assert source_kind(source) == kind


def test_a_directory_is_a_folder_and_a_kind_may_be_named_outright(tmp_path: Path) -> None:
    assert source_kind(str(tmp_path)) == "folder"
    assert not is_live(CameraConfig(source=str(tmp_path)))  # a recording: nothing dropped, file time
    assert is_live(CameraConfig(source="0")) and is_live(CameraConfig(source="rtsp://cam/s"))
    assert is_live(CameraConfig(source=str(tmp_path), live=True))  # the config has the last word
    later = tmp_path / "not-yet"  # a drop folder that does not exist yet would be taken for a file...
    assert find_kind(str(later)).name == "file" and find_kind(str(later), "folder").name == "folder"
    with pytest.raises(UserError, match="unknown source kind 'scanner'; choose one of ") as info:
        find_kind("x", "scanner")
    assert "\n" not in str(info.value) and "folder" in str(info.value)


def test_open_failures_name_the_camera_and_what_to_check(tmp_path: Path) -> None:
    def said(source: str, kind: Optional[str] = None) -> str:
        cam = CameraConfig(id="cam1", source=source)
        return get_source_kind(kind).open_failure(cam) if kind else describe_open_failure(cam)

    assert said("0") == "camera 'cam1': cannot open 0 (is a camera plugged in at that index and not used by " \
                        "another process?)"
    assert "does the device exist" in said("/dev/video9")
    assert said(str(tmp_path / "x.avi")) == f"camera 'cam1': video file {tmp_path / 'x.avi'} not found"
    assert "GStreamer support" in said("videotestsrc ! appsink")
    assert "rtsp://***@cam/s" in said("rtsp://user:pw@cam/s") and "pw" not in said("rtsp://user:pw@cam/s")
    assert said(str(tmp_path)) == (f"camera 'cam1': image folder {tmp_path} holds no images (.png, .jpg, .jpeg, "
                                   ".bmp, .tif, .tiff); put the images directly in it")
    assert said(str(tmp_path / "gone"), "folder") == f"camera 'cam1': image folder {tmp_path / 'gone'} not found"


# -- the folder kind, on real image files -------------------------------------------------------------
def write_images(folder: Path, levels: list[int], names: list[str]) -> None:
    """One uniform grey image per name (level i in image i), in the format its suffix says."""
    folder.mkdir(parents=True, exist_ok=True)
    for level, name in zip(levels, names, strict=True):
        assert cv2.imwrite(str(folder / name), np.full((40, 60, 3), level, np.uint8)), name


def test_a_folder_delivers_every_image_in_name_order_as_a_recording(tmp_path: Path) -> None:
    folder = tmp_path / "station-replay"
    names = ["part1.png", "part2.jpg", "part3.bmp", "part9.tiff", "part10.png", "part11.JPEG", "part100.tif"]
    levels = [10, 40, 70, 100, 130, 160, 190]
    write_images(folder, levels, names)
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes((folder / "part1.png").read_bytes())
    write_images(folder / "subfolder", [250], ["part0.png"])  # not read: only the folder's own images
    cam = CameraConfig(id="replay", source=str(folder))
    frames, src = read_all(cam)
    assert src.kind.name == "folder" and not src.live
    assert [f.index for f in frames] == list(range(7))
    # part9 before part10 (as people number files), each image whole; JPEG's loss aside
    assert [grey(f.image) for f in frames] == pytest.approx(levels, abs=2)
    assert all(f.image.shape == (16, 16, 3) for f in frames)
    steps = np.diff([f.ts for f in frames])
    assert steps == pytest.approx([1 / FILE_FPS_FALLBACK] * 6, abs=1e-5)  # stamped like a file, at the default rate
    assert src.undecodable == 0 and src.reconnects == 0


def test_an_unreadable_image_is_skipped_and_counted_not_fatal(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "drop"
    write_images(folder, [20, 60, 100], ["a_01.png", "a_03.jpg", "a_04.png"])
    (folder / "a_02.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"truncated by a camera still writing it")
    (folder / "a_05.jpg").write_bytes(b"")  # an empty file
    frames, src = read_all(CameraConfig(id="drop", source=str(folder), max_fps=50.0))
    assert [grey(f.image) for f in frames] == pytest.approx([20, 60, 100], abs=2)
    assert [f.index for f in frames] == [0, 1, 2]  # frame numbers count delivered frames
    assert src.undecodable == 2
    assert "a_02.png cannot be read" in caplog.text and "a_05.jpg cannot be read" in caplog.text
    assert np.diff([f.ts for f in frames]) == pytest.approx([1 / 50.0] * 2, abs=1e-5)  # max_fps sets a folder's rate


def test_an_empty_folder_does_not_open(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no images here")
    src = CameraSource(CameraConfig(id="empty", source=str(tmp_path)), (16, 16), FrameQueue(4))
    assert not src.open()


# -- the toy kind: picked for its strings, run by the shared machinery --------------------------------
def test_a_kind_registered_from_outside_is_picked_and_delivers_frames(caplog: pytest.LogCaptureFixture) -> None:
    frames, src = read_all(CameraConfig(id="toy", source="toy://5"), hw=(24, 32))
    assert isinstance(src.kind, ToyKind) and not src.live
    assert [grey(f.image) for f in frames] == [0, 10, 20, 30, 40]
    assert all(f.image.shape == (24, 32, 3) and f.camera == "toy" for f in frames)
    assert np.diff([f.ts for f in frames]) == pytest.approx([0.1] * 4, abs=1e-5)  # its own frame rate
    bad = CameraConfig(id="toy", source="toy://many")
    assert not CameraSource(bad, (8, 8), FrameQueue(2)).open()  # its open raised: not opened, said in the log
    assert "opening toy://many as a toy source raised ValueError" in caplog.text
    assert describe_open_failure(bad) == "camera 'toy': cannot open toy://many (toy sources are toy://<number " \
                                         "of frames>)"


class FlakyCapture(CountingCapture):
    """``flaky://N``: like ``toy://N``, but reading frames 3 and 9 raises, and frames 5 and 7 are images OpenCV
    cannot resize (a driver's bugs)."""

    def read(self) -> tuple[bool, Any]:
        ok, image = super().read()
        if self.position in (4, 10):
            raise RuntimeError("driver hiccup\non two lines")
        if self.position in (6, 8):
            return True, np.zeros((48, 64, 3), np.complex64)
        return ok, image


@register_source("flaky")
class FlakyKind(ToyKind):
    def claims(self, source: str) -> bool:
        return source.startswith("flaky://")

    def open(self, source: str, timeout_s: float) -> Optional[Capture]:
        return FlakyCapture(int(source.strip()[len("flaky://"):]))

    def frame_count(self, capture: Capture) -> Optional[int]:
        return capture.count if isinstance(capture, FlakyCapture) else None


def test_what_a_frame_raises_costs_that_frame_not_the_capture_thread(caplog: pytest.LogCaptureFixture) -> None:
    frames, src = read_all(CameraConfig(id="flaky", source="flaky://12"), hw=(24, 32))
    assert [grey(f.image) for f in frames] == [10 * i for i in range(12) if i not in (3, 5, 7, 9)]  # to the end
    assert src.undecodable == 4
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 3 and all("\n" not in w for w in warnings), warnings  # one line per cause
    assert "a read raised RuntimeError (driver hiccup on two lines); taken as a failed read" in warnings[0]
    assert "1 damaged frame(s) could not be read" in warnings[1]
    assert "1 frame could not be decoded or fitted (ValueError: frames must be uint8 or uint16" in warnings[2]


@register_source("buggy-live")
class BuggyLiveKind(ToyKind):
    """``buggy-live://N``: a live kind whose first capture cannot be set up (its ``compressed`` raises once)."""

    live = True
    opened = 0

    def claims(self, source: str) -> bool:
        return source.startswith("buggy-live://")

    def open(self, source: str, timeout_s: float) -> Optional[Capture]:
        BuggyLiveKind.opened += 1
        return CountingCapture(int(source.strip()[len("buggy-live://"):]))

    def compressed(self, capture: Capture) -> bool:
        if BuggyLiveKind.opened == 1:
            raise KeyError("a bug in the kind")
        return False


def test_a_live_cameras_reader_that_raises_is_reopened_not_lost(caplog: pytest.LogCaptureFixture) -> None:
    cam = CameraConfig(id="live", source="buggy-live://1000", reopen_initial_s=0.05, reopen_max_s=0.05)
    queue = FrameQueue(4)
    src = CameraSource(cam, (8, 8), queue)
    assert src.open()
    src.start()
    deadline = time.monotonic() + 10
    while src.captured < 20 and time.monotonic() < deadline:
        time.sleep(0.02)
    src.stop()
    src.join()
    assert src.captured >= 20 and src.reconnects >= 1 and BuggyLiveKind.opened >= 2
    lines = [r.getMessage() for r in caplog.records if "raised KeyError" in r.getMessage()]
    assert len(lines) == 1 and "reopening it" in lines[0], lines

# -- edge-run on a folder, end to end -----------------------------------------------------------------
def test_edge_run_scores_a_folder_of_images_end_to_end(tmp_path: Path, mosquitto: str, toy_bundle: Path) -> None:
    """A factory replay: 40 inspection images (two stretches with a planted defect, one file corrupt) through
    the real CLI, ONNX Runtime and Mosquitto; every image scored, one event per defect, the corrupt one skipped."""
    folder = tmp_path / "inspection"
    folder.mkdir()
    defects = [(8, 14), (25, 32)]
    rng = np.random.default_rng(3)
    for i in range(40):
        image = make_frame(rng, (64, 64), defect=any(a <= i < b for a, b in defects))
        suffix = ".png" if i % 2 else ".jpg"
        assert cv2.imwrite(str(folder / f"img{i}{suffix}"), image)
    (folder / "img40.png").write_bytes(b"not a png")  # the last file: the frame numbers above stay aligned
    config = tmp_path / "station.yaml"
    config.write_text(f"station: st-folder\nstate_dir: {tmp_path / 'state'}\n"
                      "events:\n  close_after: 3\n  cooldown_s: 0.1\n"
                      "mqtt:\n  stats_interval_s: 0.2\n", encoding="utf-8")
    with Collector(mosquitto, ["anomaly/st-folder/#"]) as col:
        proc = run_cli("edge-run", ["--config", str(config), "--camera", f"line={folder}", "--engine", str(toy_bundle),
                                    "--mqtt", mosquitto], cwd=tmp_path, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
        assert "img40.png cannot be read" in proc.stderr
        wait_stopped(col)
        got = check_payloads(col)
    events = got["event"]
    check_events(events, defects, "line")
    assert_seq_monotonic(events)
    final = got["stats"][-1]["cameras"]["line"]
    assert final["frames_processed"] == 40 and final["dropped"] == 0  # a recording loses nothing


def test_an_opencv_error_that_repeats_the_url_is_logged_as_one_line_without_its_password() -> None:
    from edge.sources.capture import _one_line

    line = _one_line(RuntimeError("OpenCV(4.9) error: cannot open rtsp://admin:s3cret@cam.local/stream\n  in line 2"))
    assert "s3cret" not in line and "\n" not in line and "cam.local" in line
