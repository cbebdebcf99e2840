"""`make demo`: the main job end to end on a fresh machine.

Generates images of a synthetic part with planted defects, trains PatchCore on the good ones,
writes a clip with defect stretches, streams it through `edge-run` and shows the events arriving at
an MQTT subscriber over TCP. When no broker answers at the configured URL, starts a Mosquitto itself.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "demo-out"
BIN = Path(sys.executable).parent
STATION = "demo"
FPS = 10
CLIP_SECONDS = 24
DEFECT_STRETCHES = [(60, 90), (150, 185)]  # frame ranges [start, end) where the part has a defect


def say(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def run(cmd: list[str]) -> str:
    """Run a step, streaming its stderr; return its stdout (the bundle path is its last line)."""
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"demo: step failed with exit code {proc.returncode}: {' '.join(cmd)}")
    return proc.stdout


def broker_answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_mosquitto(port: int, workdir: Path) -> subprocess.Popen[bytes]:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(exe).exists():
        sys.exit("demo: no MQTT broker answers and mosquitto is not installed; run 'apt-get install mosquitto'")
    conf = workdir / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        if broker_answers("127.0.0.1", port):
            return proc
        time.sleep(0.05)
    proc.kill()
    sys.exit(f"demo: mosquitto did not start on port {port}")


def configured_mqtt_url() -> str:
    from edge.config import load_station_config

    return load_station_config(ROOT / "config" / "station.yaml").mqtt.url


def main() -> int:
    OUT.mkdir(exist_ok=True)
    data = OUT / "data"
    say("1/5 generating images of a part: good ones to learn from, and a test set with planted defects")
    from trainer.synthetic import DEMO_SIZE, make_demo_dataset, write_clip

    size = DEMO_SIZE  # camera-like frames; both training images and clip are resized to the model input
    shutil.rmtree(data, ignore_errors=True)
    make_demo_dataset(data)
    print(f"wrote {data}")

    say("2/5 training PatchCore (EfficientNet-Lite0 features) on the good images, exporting the ONNX bundle")
    bundle = run([str(BIN / "edge-train"), "fit", "--data", str(data), "--out", "engines"]).strip().splitlines()[-1]
    print(f"bundle: {bundle}")
    print(run([str(BIN / "edge-train"), "eval", bundle, "--data", str(data), "--json"]).strip())

    say(f"3/5 writing a {CLIP_SECONDS}s clip at {FPS} fps with defects in frames "
        + ", ".join(f"{a}-{b - 1}" for a, b in DEFECT_STRETCHES))
    clip = OUT / "clip.avi"
    write_clip(clip, size, FPS * CLIP_SECONDS, DEFECT_STRETCHES, fps=FPS, seed=7)
    print(f"wrote {clip}")

    url = configured_mqtt_url()
    parsed = urlparse(url)
    host, port = parsed.hostname or "localhost", parsed.port or 1883
    broker = None
    tmp = Path(tempfile.mkdtemp(prefix="edge-demo-"))
    if broker_answers(host, port):
        say(f"4/5 using the MQTT broker at {url}")
    else:
        port = port if host in ("localhost", "127.0.0.1") and not broker_answers("127.0.0.1", port) else free_port()
        say(f"4/5 no broker answers at {url}: starting Mosquitto on 127.0.0.1:{port}")
        broker = start_mosquitto(port, tmp)
        url = f"mqtt://127.0.0.1:{port}"

    events: list[str] = []
    subscriber = subprocess.Popen(
        [str(BIN / "edge-events"), "--mqtt", url, "--station", STATION],
        stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )

    def show() -> None:
        assert subscriber.stdout is not None
        for line in subscriber.stdout:
            events.append(line)
            print("subscriber> " + line.rstrip(), flush=True)

    reader = threading.Thread(target=show, daemon=True)
    reader.start()
    time.sleep(1.0)  # let the subscription settle before events flow

    say("5/5 edge-run: camera = the clip, engine = the bundle, events to MQTT")
    try:
        state = tmp / "state"
        env = dict(os.environ)
        cmd = [str(BIN / "edge-run"), "--camera", str(clip), "--engine", bundle, "--mqtt", url,
               "--station", STATION, "--state-dir", str(state)]
        print("$ " + " ".join(cmd), flush=True)
        rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
        time.sleep(1.0)
    finally:
        subscriber.terminate()
        subscriber.wait(timeout=5)
        reader.join(timeout=5)
        if broker is not None:
            broker.terminate()
            broker.wait(timeout=5)
    starts = [json.loads(e) for e in events if json.loads(e).get("type") == "start"]
    print(f"\nedge-run exited {rc}; the subscriber received {len(events)} event messages.")
    for a, b in DEFECT_STRETCHES:
        hit = [e["frame"] for e in starts if a <= e["frame"] < b]
        print(f"  planted defect, frames {a}-{b - 1}: " + (f"event opened at frame {hit[0]}" if hit else "MISSED"))
    false = [e["frame"] for e in starts if not any(a <= e["frame"] < b for a, b in DEFECT_STRETCHES)]
    print(f"  events opened on good parts: {len(false)}" + (f" (frames {false})" if false else ""))
    return 0 if rc == 0 and starts else 1


if __name__ == "__main__":
    sys.exit(main())
