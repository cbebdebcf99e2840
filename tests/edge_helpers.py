"""Shared helpers for the edge tests: a toy but real bundle, video files with planted defects, a real
MQTT subscriber, and the real CLIs run as subprocesses."""

from __future__ import annotations

import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import cv2
import numpy as np
import onnx
import paho.mqtt.client as mqtt
from onnx import TensorProto, helper
from paho.mqtt.enums import CallbackAPIVersion

from core.bundle import new_version_dir, promote, write_manifest
from core.payloads import validator
from edge.mqtt import parse_mqtt_url

REPO = Path(__file__).resolve().parents[1]
SCHEMAS = REPO / "edge" / "schemas"
BRIGHT = 200  # the toy model calls a pixel channel "bright" above this
TOY_THRESHOLD = 0.1


# -- a toy bundle -----------------------------------------------------------------------------------
def toy_model(hw: tuple[int, int]) -> onnx.ModelProto:
    """frames uint8 [N,H,W,3] → anomaly_map = fraction of bright channels per pixel, score = its mean.

    A real ONNX graph with the bundle contract's I/O (cast inside the graph), cheap enough for CI.
    """
    h, w = hw
    nodes = [
        helper.make_node("Cast", ["frames"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("Greater", ["x", "bright"], ["hot"]),
        helper.make_node("Cast", ["hot"], ["hotf"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["hotf"], ["anomaly_map"], axes=[3], keepdims=0),
        helper.make_node("ReduceMean", ["anomaly_map"], ["score"], axes=[1, 2], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "toy_bright",
        [helper.make_tensor_value_info("frames", TensorProto.UINT8, ["N", h, w, 3])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"]),
         helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["N", h, w])],
        initializer=[helper.make_tensor("bright", TensorProto.FLOAT, [], [float(BRIGHT)])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="edge-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def make_toy_bundle(engines_root: Path, model_name: str = "toy", hw: tuple[int, int] = (32, 32),
                    threshold: float = TOY_THRESHOLD, promote_it: bool = True) -> Path:
    """A complete bundle written through core.bundle (the same code path as the trainer)."""
    bundle_dir = new_version_dir(engines_root, model_name)
    onnx.save(toy_model(hw), str(bundle_dir / "model.onnx"))
    write_manifest(
        bundle_dir, model_name=model_name,
        input_spec={"height": hw[0], "width": hw[1]},
        outputs=[{"name": "score", "dtype": "float32", "shape": ["N"]},
                 {"name": "anomaly_map", "dtype": "float32", "shape": ["N", hw[0], hw[1]]}],
        calibration={"threshold": threshold, "method": "fixed (toy)"},
        training_data={"count": 0, "hash": "none"},
        metrics={},
    )
    if promote_it:
        promote(bundle_dir)
    return bundle_dir


# -- video files with planted defects ---------------------------------------------------------------
def make_frame(rng: np.random.Generator, size: tuple[int, int], defect: bool) -> np.ndarray:
    """Dark noise (never bright); a defect is a bright square covering a quarter of the frame."""
    h, w = size
    img = rng.integers(30, 120, size=(h, w, 3), dtype=np.uint8)
    if defect:
        img[h // 4:3 * h // 4, w // 4:3 * w // 4] = 255
    return img


def write_video(path: Path, defects: Sequence[tuple[int, int]], n_frames: int, size: tuple[int, int] = (64, 64),
                fps: float = 10.0, seed: int = 0) -> Path:
    """MJPG .avi of ``n_frames``; frames in any [start, stop) of ``defects`` carry the planted defect."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), fps, (size[1], size[0]))
    assert writer.isOpened(), f"cannot write {path}"
    rng = np.random.default_rng(seed)
    for i in range(n_frames):
        writer.write(make_frame(rng, size, any(a <= i < b for a, b in defects)))
    writer.release()
    return path


def write_lit_video(path: Path, n_frames: int, lit: Sequence[tuple[int, int, int]] = (),
                    size: tuple[int, int] = (64, 64), fps: float = 10.0, seed: int = 0) -> Path:
    """MJPG .avi of good frames whose noise reaches the toy model's "bright" level, so good frames score about
    0.08 with some spread (the toy's scores on ``make_frame`` are all 0: nothing to calibrate on); frames in any
    [start, stop) of ``lit`` are brightened by its offset (the light of the line changed)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), fps, (size[1], size[0]))
    assert writer.isOpened(), f"cannot write {path}"
    rng = np.random.default_rng(seed)
    for i in range(n_frames):
        offset = sum(o for a, b, o in lit if a <= i < b)
        cells = rng.integers(30, 216, size=(size[0] // 8, size[1] // 8, 3)).astype(np.int16) + offset
        img = np.repeat(np.repeat(cells, 8, axis=0), 8, axis=1)  # 8x8 cells: they survive JPEG and resizing
        writer.write(np.clip(img, 0, 255).astype(np.uint8))
    writer.release()
    return path


# -- a camera whose driver hangs ------------------------------------------------------------------
class FifoCamera:
    """Writes JPEG frames into a FIFO like a camera driver; ``stall()`` keeps the pipe open and silent, so the
    reader's read blocks (no EOF, no error), as a hung driver or pipeline does; ``resume()`` streams again."""

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.path = path
        rng = np.random.default_rng(0)
        self.frames = [cv2.imencode(".jpg", make_frame(rng, (64, 64), False))[1].tobytes() for _ in range(10)]
        self.stalled = threading.Event()
        self.stopped = threading.Event()
        self.written = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.is_set():
            try:
                with open(self.path, "wb") as fh:  # blocks until the station opens the FIFO
                    while not self.stopped.is_set():
                        if self.stalled.is_set():
                            time.sleep(0.05)
                            continue
                        fh.write(self.frames[self.written % len(self.frames)])
                        fh.flush()
                        self.written += 1
                        time.sleep(0.03)
            except (BrokenPipeError, OSError):
                time.sleep(0.05)  # the reader went away (an abandoned capture released it): open again

    def stop(self) -> None:
        self.stopped.set()
        self.stalled.clear()
        try:  # unblock a writer waiting in open() for a reader
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
            os.close(fd)
        except OSError:
            pass


# -- a real broker ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mosquitto_binary() -> Optional[str]:
    return shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)


class Mosquitto:
    """A Mosquitto process on a loopback port, ready when constructed; can be killed and started again on the
    same port. ``persistent``: retained messages and sessions are saved (every second and on exit) and
    reloaded on restart, as on a production broker. ``conf`` adds lines to its config (TLS, passwords)."""

    def __init__(self, workdir: Path, port: int, binary: str, persistent: bool = False, conf: str = "",
                 anonymous: bool = True, host: str = "127.0.0.1", scheme: str = "mqtt") -> None:
        self.port = port
        self.binary = binary
        self.url = f"{scheme}://{host}:{port}"
        workdir.mkdir(parents=True, exist_ok=True)
        self.conf = workdir / f"mosquitto-{port}.conf"
        # as root, mosquitto drops to user 'mosquitto', who could not read our keys or write our folder
        lines = [f"user {getpass.getuser()}", f"allow_anonymous {'true' if anonymous else 'false'}"]
        if persistent:
            lines += ["persistence true", f"persistence_location {workdir}/", "autosave_interval 1"]
        else:
            lines += ["persistence false"]
        lines += [f"listener {port} 127.0.0.1"]  # listener options in ``conf`` (TLS) apply to this one
        self.conf.write_text("\n".join(lines) + "\n" + conf, encoding="utf-8")
        self.log_path = workdir / f"mosquitto-{port}.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop)
        self.proc: subprocess.Popen = self._spawn()

    def _spawn(self) -> subprocess.Popen:
        proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                self._log.close()
                raise RuntimeError(f"mosquitto exited with {proc.returncode}: "
                                   f"{self.log_path.read_text(errors='replace')}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return proc
            except OSError:
                if time.monotonic() > deadline:
                    proc.kill()
                    raise RuntimeError("mosquitto did not accept connections within 10 s") from None
                time.sleep(0.05)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Stop the broker abruptly (SIGKILL: a crash) or with ``sig``; ``start`` brings it back."""
        self.proc.send_signal(sig)
        self.proc.wait(10)

    def start(self) -> None:
        self.proc = self._spawn()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


# -- schemas ----------------------------------------------------------------------------------------
def load_schema(name: str) -> dict[str, Any]:
    return json.loads((SCHEMAS / f"{name}.schema.json").read_text(encoding="utf-8"))


def validate(name: str, payload: Any) -> None:
    """Validate against a shipped schema, format checks included (uuid, date-time)."""
    validator(name).validate(payload)


# -- a real subscriber ------------------------------------------------------------------------------
@dataclass
class Message:
    topic: str
    payload: bytes
    retain: bool
    qos: int


class Collector:
    """Subscribes (paho, QoS 1) and keeps every message; used as a context manager."""

    def __init__(self, url: str, topics: Sequence[str], session: Optional[str] = None,
                 auth: Optional[tuple[str, str]] = None) -> None:
        """``session``: a client id under which the broker keeps a persistent session, so messages published
        while this subscriber is reconnecting (after a broker restart) are queued for it, not lost."""
        u = parse_mqtt_url(url)
        self.messages: list[Message] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                  client_id=session or f"test-collector-{os.getpid()}-{id(self)}",
                                  clean_session=session is None)
        self.client.reconnect_delay_set(1, 1)
        if auth:
            self.client.username_pw_set(*auth)
        self.client.on_connect = lambda c, *_: c.subscribe([(t, 1) for t in topics])
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(u.host, u.port)
        self.client.loop_start()
        assert self._subscribed.wait(10), "the test subscriber could not subscribe"

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self._cond:
            self.messages.append(Message(msg.topic, bytes(msg.payload), bool(msg.retain), msg.qos))
            self._cond.notify_all()

    def wait_for(self, pred: Callable[[list[Message]], bool], timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not pred(self.messages):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def on(self, suffix: str) -> list[Message]:
        with self._cond:
            return [m for m in self.messages if m.topic.endswith(suffix)]

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(m.payload) for m in self.on("/event")]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> Collector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- checks shared by the end-to-end tests ------------------------------------------------------
def check_payloads(col: Collector) -> dict[str, list[Any]]:
    """Validate every message against its schema; returns decoded payloads by kind."""
    out: dict[str, list[Any]] = {"event": [], "stats": [], "status": [], "snapshot": [], "health": []}
    for m in col.messages:
        kind = m.topic.rsplit("/", 1)[1]
        if kind == "status":
            assert m.retain or m.qos == 1
            validate("status", m.payload.decode())
            out["status"].append(m.payload.decode())
        elif kind == "stats":
            payload = json.loads(m.payload)
            validate("stats", payload)
            out["stats"].append(payload)
        elif kind == "event":
            assert not m.retain and m.qos == 1
            payload = json.loads(m.payload)
            validate("event", payload)
            out["event"].append(payload)
        elif kind == "health":
            assert m.retain or m.qos == 1
            payload = json.loads(m.payload)
            validate("health", payload)
            out["health"].append(payload)
        elif kind == "snapshot":
            assert m.payload[:2] == b"\xff\xd8", "snapshot is not a JPEG"
            out["snapshot"].append(m.payload)
        else:
            raise AssertionError(f"unexpected topic {m.topic}")
    return out


def check_events(events: list[dict[str, Any]], defects: list[tuple[int, int]], camera: str) -> None:
    """One event per defect stretch, opened inside it; none in clean stretches; every start has an end."""
    mine = [e for e in events if e["camera"] == camera]
    starts = [e for e in mine if e["type"] == "start"]
    ends = {e["event_id"]: e for e in mine if e["type"] == "end"}
    assert len(starts) == len(defects), (camera, starts)
    for (a, b), start in ((defects[i], starts[i]) for i in range(len(starts))):
        assert a <= start["frame"] < b, f"{camera}: event opened at frame {start['frame']}, outside [{a}, {b})"
        end = ends.get(start["event_id"])
        assert end is not None, f"{camera}: event {start['event_id']} has no end"
        assert end["frame"] >= start["frame"] and end["peak_score"] >= start["threshold"]
    assert len(ends) == len(starts)


def assert_seq_monotonic(events: list[dict[str, Any]]) -> None:
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), seqs


def wait_stopped(col: Collector) -> None:
    """Wait for this run's 'stopped' (live traffic has retain=False; a retained one is an earlier run's)."""
    assert col.wait_for(lambda ms: any(m.topic.endswith("/status") and m.payload == b"stopped" and not m.retain
                                       for m in ms)), "no 'stopped' status"



# -- the real CLIs ----------------------------------------------------------------------------------
def cli_command(name: str) -> list[str]:
    """The installed console script next to this interpreter, else the same entry point via -c."""
    script = Path(sys.executable).parent / name
    if script.exists():
        return [str(script)]
    func = {"edge-run": "run_main", "edge-events": "events_main"}[name]
    return [sys.executable, "-c", f"import sys; from edge.cli import {func}; sys.exit({func}())"]


def run_cli(name: str, args: Sequence[str], cwd: Optional[Path] = None, timeout: float = 60.0,
            env: Optional[dict[str, str]] = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    full_env.setdefault("PYTHONPATH", str(REPO))
    return subprocess.run([*cli_command(name), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def assert_one_line_error(proc: subprocess.CompletedProcess, prog: str, *needles: str, code: int = 2) -> str:
    """Exit ``code``, no traceback, and a single ``prog: error: ...`` line on stderr mentioning ``needles``."""
    err = proc.stderr
    assert proc.returncode == code, f"exit {proc.returncode}, stderr:\n{err}"
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith(f"{prog}: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def write_station_yaml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def stream_clip(tmp_path: Path, mosquitto: str, bundle: Path, clip: Path, station: str) -> dict[str, list[Any]]:
    """Run edge-run on ``clip`` with ``bundle`` to the end of the file; every payload it published, each checked
    against the shipped schemas (what the model tests assert a station does with their bundles)."""
    config = tmp_path / "station.yaml"
    config.write_text(f"station: {station}\nstate_dir: {tmp_path / 'state'}\nmqtt:\n  stats_interval_s: 0.5\n")
    with Collector(mosquitto, [f"anomaly/{station}/#"]) as col:
        proc = run_cli("edge-run", ["--config", config, "--camera", clip, "--engine", bundle, "--mqtt", mosquitto],
                       timeout=180)
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
        wait_stopped(col)
        return check_payloads(col)


# -- what a station's frame collection writes (retraining tests) ------------------------------------
def write_station_frames(folder: Path, clip: Path, station: str = "line1", still_every: int = 0) -> list[Path]:
    """Frames of ``clip`` as a station's collection writes them: train/good/<time>_<camera>_<frame>.png + .json;
    ``still_every`` k > 0: every k-th part stood still and was collected twice (the second time with the
    sensor's own ±1 noise)."""
    cap = cv2.VideoCapture(str(clip))
    out: list[Path] = []
    rng = np.random.default_rng(1)
    i = 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        name = f"20261201T1200{i // 10:02d}.{i % 10}0"
        shots = [frame]
        if still_every and i % still_every == 0:
            shots.append(np.clip(frame.astype(int) + rng.integers(-1, 2, frame.shape), 0, 255).astype(np.uint8))
        for k, shot in enumerate(shots):
            path = folder / "train" / "good" / f"{name}{k}_cam0_{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), shot)
            path.with_suffix(".json").write_text(json.dumps({"station": station, "camera": "cam0", "frame": i,
                                                             "kind": "normal", "score": 0.0}))
            out.append(path)
        i += 1
    cap.release()
    return out


def write_labelled_holdout(root: Path, clip: Path, defects: list[tuple[int, int]]) -> Path:
    """A --holdout folder from an MJPEG clip with defect stretches: test/good and test/defect."""
    cap = cv2.VideoCapture(str(clip))
    i = 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        label = "defect" if any(a <= i < b for a, b in defects) else "good"
        (root / "test" / label).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / "test" / label / f"{i:04d}.png"), frame)
        i += 1
    return root


def read_all(cam: Any, hw: tuple[int, int] = (16, 16), keep_original: bool = False,
             timeout: float = 30.0) -> tuple[list[Any], Any]:
    """Every frame a capture source (edge.sources.CameraSource of ``cam``) delivers until it ends, and the source."""
    from edge.sources import CameraSource, FrameQueue, describe_open_failure

    queue = FrameQueue(1000)
    src = CameraSource(cam, hw, queue, keep_original=keep_original)
    assert src.open(), describe_open_failure(cam)
    src.start()
    frames: list[Any] = []
    deadline = time.monotonic() + timeout
    while not queue.finished and time.monotonic() < deadline:
        with queue.cond:
            item = queue.get_nowait()
            if item is None:
                queue.cond.wait(0.05)
        if item is not None:
            frames.append(item)
    src.stop()
    src.join()
    assert queue.finished, "the source never ended"
    return frames, src


def event_maker(kind: str, event_id: str = "e1") -> Callable[[int], dict[str, Any]]:
    """What Outbox.add_event takes: the event payload of ``kind`` for the seq it assigns."""
    def make(seq: int) -> dict[str, Any]:
        payload: dict[str, Any] = {"event_id": event_id, "type": kind, "seq": seq, "frame": seq}
        if kind == "end":
            payload["reason"] = "cleared"
        return payload
    return make


def fill_disk(filler: Path) -> Path:
    """Write zeros to ``filler`` until its disk is full; returns it. Unbuffered, in ever smaller blocks: not a byte
    is left (a 64 KB block that did not fit leaves room for a spool that reuses its WAL)."""
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 20, 1 << 16, 1 << 12, 1):
            block = b"\0" * size
            try:
                while True:
                    os.write(fd, block)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def stop_station(proc: subprocess.Popen) -> str:
    """SIGTERM a running edge-run (what systemd sends), wait for its clean exit, kill it if it hangs; its stderr."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    return str(err)
