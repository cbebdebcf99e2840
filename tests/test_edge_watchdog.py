"""Cameras that misbehave, through the real edge-run: a read that blocks for ever (a FIFO whose writer goes
silent) is abandoned and the camera reopened; a dead camera does not keep --max-frames from finishing; a live
camera that is down at start is waited for. Stats say what is true (connected / stalled)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from edge_helpers import REPO, Collector, FifoCamera, check_payloads, cli_command, run_cli, write_video

FPS = 10.0


def camera_stats(col: Collector, camera: str = "cam0") -> list[dict]:
    return [json.loads(m.payload)["cameras"][camera] for m in col.on("/stats")]


def test_a_blocked_read_is_abandoned_and_the_camera_reopened(tmp_path: Path, mosquitto: str,
                                                             toy_bundle: Path) -> None:
    cam = FifoCamera(tmp_path / "cam0.mjpeg")
    cfg = tmp_path / "st.yaml"
    cfg.write_text(f"""station: st-fifo
state_dir: {tmp_path / 'state'}
cameras:
  - id: cam0
    source: {cam.path}
    live: true
    stale_timeout_s: 1.0
    reopen_initial_s: 0.1
    reopen_max_s: 0.2
mqtt: {{stats_interval_s: 0.2}}
""", encoding="utf-8")
    # FFmpeg probes a pipe for seconds before it opens by default; a camera FIFO is set up like this.
    env = {**os.environ, "OPENCV_FFMPEG_CAPTURE_OPTIONS": "probesize;4096|analyzeduration;0"}
    log = tmp_path / "edge-run.log"
    with Collector(mosquitto, ["anomaly/st-fifo/#"]) as col, open(log, "w") as log_fh:
        proc = subprocess.Popen([*cli_command("edge-run"), "--config", cfg, "--engine", toy_bundle,
                                 "--mqtt", mosquitto], cwd=tmp_path, stderr=log_fh, text=True, env=env)

        def why(what: str) -> str:
            return f"{what}; stats {camera_stats(col)[-3:]}; log:\n{log.read_text()[-3000:]}"

        try:
            assert col.wait_for(lambda ms: any(s["frames_processed"] >= 20 and s["connected"]
                                               for s in camera_stats(col)), timeout=30), why("no frames")
            cam.stalled.set()  # the writer goes silent: the station's read blocks for ever
            assert col.wait_for(lambda ms: any(s["stalled"] and not s["connected"] for s in camera_stats(col)),
                                timeout=15), why("stats never said stalled")
            before = max(s["frames_processed"] for s in camera_stats(col))
            time.sleep(1.5)  # stay silent through another reopen or two
            cam.stalled.clear()
            assert col.wait_for(lambda ms: any(s["frames_processed"] >= before + 20 and s["connected"]
                                               and not s["stalled"] for s in camera_stats(col)),
                                timeout=30), why("the camera did not resume after the stall")
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        finally:
            cam.stop()
            if proc.poll() is None:
                proc.kill()
        check_payloads(col)
    err = log.read_text()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert "the read is blocked); abandoning it and reopening" in err, err
    assert camera_stats(col)[-1]["reconnects"] >= 1


def test_a_dead_camera_does_not_keep_max_frames_from_finishing(tmp_path: Path, mosquitto: str,
                                                               toy_bundle: Path) -> None:
    video = write_video(tmp_path / "a.avi", [(5, 15)], 40, fps=FPS)
    cfg = tmp_path / "st.yaml"
    cfg.write_text(f"""station: st-dead
state_dir: {tmp_path / 'state'}
cameras:
  - id: good
    source: {video}
  - id: dead
    source: rtsp://127.0.0.1:1/nothing-listens-here
    stale_timeout_s: 1.0
    reopen_initial_s: 0.2
    reopen_max_s: 0.5
""", encoding="utf-8")
    with Collector(mosquitto, ["anomaly/st-dead/#"]) as col:
        proc = run_cli("edge-run", ["--config", cfg, "--engine", toy_bundle, "--mqtt", mosquitto,
                                    "--max-frames", "30"], cwd=tmp_path, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert col.wait_for(lambda ms: any(m.payload == b"stopped" for m in ms), timeout=10)
        got = check_payloads(col)
    assert "camera 'dead': not delivering while the others have finished" in proc.stderr
    final = got["stats"][-1]["cameras"]
    assert final["good"]["frames_processed"] == 30
    assert final["dead"]["frames_processed"] == 0 and not final["dead"]["connected"]


def test_a_live_camera_down_at_start_is_waited_for(tmp_path: Path, mosquitto: str, toy_bundle: Path) -> None:
    late = tmp_path / "appears-later.avi"
    cfg = tmp_path / "st.yaml"
    cfg.write_text(f"""station: st-late
state_dir: {tmp_path / 'state'}
cameras:
  - id: cam0
    source: {late}
    live: true
    reopen_initial_s: 0.2
    reopen_max_s: 0.4
mqtt: {{stats_interval_s: 0.2}}
""", encoding="utf-8")
    with Collector(mosquitto, ["anomaly/st-late/#"]) as col:
        proc = subprocess.Popen([*cli_command("edge-run"), "--config", cfg, "--engine", toy_bundle,
                                 "--mqtt", mosquitto], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
        try:
            assert col.wait_for(lambda ms: bool(col.on("/stats")), timeout=20), "the station did not run"
            assert proc.poll() is None  # still running, waiting for its camera
            assert not camera_stats(col)[-1]["connected"]
            write_video(tmp_path / "tmp.avi", [], 20, fps=FPS).rename(late)  # the camera comes up
            assert col.wait_for(lambda ms: any(s["frames_processed"] > 0 for s in camera_stats(col)), timeout=20)
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, err
    assert "waiting for it" in err and "Traceback" not in err


def test_a_silent_stream_server_costs_only_its_own_camera(tmp_path: Path, mosquitto: str, toy_bundle: Path) -> None:
    """An RTSP server that accepts the connection and never answers: its camera is abandoned and retried on
    its own threads; the other camera's file is scored to the end and the run finishes."""
    import socket
    import threading

    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    port = server.getsockname()[1]
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept_and_say_nothing() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    threading.Thread(target=accept_and_say_nothing, daemon=True).start()
    video = write_video(tmp_path / "a.avi", [(5, 15)], 200, fps=FPS)
    cfg = tmp_path / "st.yaml"
    cfg.write_text(f"""station: st-silent
state_dir: {tmp_path / 'state'}
cameras:
  - id: good
    source: {video}
  - id: silent
    source: rtsp://127.0.0.1:{port}/stream
    stale_timeout_s: 1.0
    reopen_initial_s: 0.2
    reopen_max_s: 0.5
""", encoding="utf-8")
    try:
        t0 = time.monotonic()
        proc = run_cli("edge-run", ["--config", cfg, "--engine", toy_bundle, "--mqtt", mosquitto,
                                    "--max-frames", "200"], cwd=tmp_path, timeout=60)
        took = time.monotonic() - t0
    finally:
        stop.set()
        server.close()
        for conn in held:
            conn.close()
    assert proc.returncode == 0, proc.stderr
    assert held, "the station never connected to the silent server"
    assert "camera 'silent': not delivering while the others have finished" in proc.stderr
    assert "stopped after 200 frames" in proc.stderr
    assert took < 30, f"the silent camera held the run for {took:.0f} s"


# A camera whose read is still blocked in OpenCV when the station stops, and which speaks again while the
# interpreter finalises: the read returns, CPython unwinds the thread, OpenCV's catch (...) swallows the unwind
# and the process aborts ("FATAL: exception not rethrown", SIGABRT) after a clean stop. Seen once in CI at the
# end of the test above; made certain here by feeding the camera from an object torn down with the modules.
_STOP_WITH_A_BLOCKED_READ = r'''
import os, sys, threading, time, types
os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] = "probesize;4096|analyzeduration;0"
import cv2, numpy as np
from edge.cli import leave_past_blocked_captures
from edge.config import CameraConfig
from edge.sources import CameraSource, FrameQueue

fifo, guarded = sys.argv[1], sys.argv[2] == "guarded"
frame = cv2.imencode(".jpg", np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8))[1].tobytes()
writer = []
quiet = threading.Event()

def camera():  # frames until told to go quiet, then open and silent: the station's read blocks
    writer.append(os.open(fifo, os.O_WRONLY))
    while not quiet.is_set():
        os.write(writer[0], frame)
        time.sleep(0.03)

threading.Thread(target=camera, daemon=True).start()
source = CameraSource(CameraConfig(id="cam0", source=fifo, live=True, stale_timeout_s=60.0), (32, 32),
                      FrameQueue(64))
source.start()
deadline = time.monotonic() + 30
while source.captured < 20 and time.monotonic() < deadline:
    time.sleep(0.05)
quiet.set()
time.sleep(0.5)
source.stop()
source.join()
print(f"streamed before the stall: {source.captured >= 20}", flush=True)

class SpeakAgainAtFinalisation:
    def __init__(self, fd, frame):
        self.fd, self.frame, self.write, self.sleep = fd, frame, os.write, time.sleep
    def __del__(self):
        for _ in range(20):
            self.write(self.fd, self.frame)
            self.sleep(0.05)

holder = types.ModuleType("holder")  # not __main__: the blocked thread keeps no reference to this module
holder.speaker = SpeakAgainAtFinalisation(writer[0], frame)
sys.modules["holder"] = holder
sys.exit(leave_past_blocked_captures(0) if guarded else 0)
'''


def _stop_with_a_blocked_read(tmp_path: Path, mode: str) -> subprocess.CompletedProcess:
    fifo = tmp_path / "cam0.mjpeg"
    os.mkfifo(fifo)
    return subprocess.run([sys.executable, "-c", _STOP_WITH_A_BLOCKED_READ, str(fifo), mode], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_a_stop_with_a_read_still_blocked_in_opencv_exits_cleanly(tmp_path: Path) -> None:
    control = _stop_with_a_blocked_read(tmp_path, "unguarded")
    assert "streamed before the stall: True" in control.stdout, control.stdout + control.stderr
    assert control.returncode == -signal.SIGABRT and "exception not rethrown" in control.stderr, (
        "a plain exit no longer aborts here (a newer Python or OpenCV?): this test no longer proves the guard; "
        f"rc {control.returncode}, stderr {control.stderr[-500:]}")
    (tmp_path / "cam0.mjpeg").unlink()
    guarded = _stop_with_a_blocked_read(tmp_path, "guarded")
    assert "streamed before the stall: True" in guarded.stdout, guarded.stdout + guarded.stderr
    assert guarded.returncode == 0, guarded.stderr[-2000:]
