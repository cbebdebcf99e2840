"""Soak test of a station under faults: the broker restarted and edge-run SIGKILLed and restarted, at random;
poison messages on the command topics (JSON nested 2 000 deep, a 10 MB string, invalid UTF-8), the state
dir's disk full for a minute (a tmpfs filled by a file, then freed: skipped, with the reason, where mount is
refused), and the camera switching its frame size back and forth.

    python benchmarks/soak.py --minutes 30 [--seed 0] [--json soak.json]

A real Mosquitto (persistence on, restarted with SIGTERM: a broker that crashes with SIGKILL may lose what
it had acknowledged but not yet saved, which is the broker's durability, not the station's), a real edge-run
scoring a paced 10 fps camera (a FIFO fed JPEG frames, a defect every 10 s) with the toy bundle of the tests
(named by its model folder, so cmd/reload is a live command; collection on, so cmd/label is one too),
and a SCADA subscriber with a persistent session. At the end the station is stopped cleanly and the broker
left up until everything is delivered. Expected events are every seq the station's spool handed out (seq is
assigned in the same transaction that stores the event, so 1..last is exactly what was produced); delivered
is what the subscriber received, de-duplicated on (event_id, type, seq). Each event is put down to the fault
in force when its frame was taken (a lost one: when its nearest delivered predecessor was), or ``none``; the
table shows expected / delivered / lost per fault kind. ``spool.max_mb`` is 4: the WAL is then checkpointed at
512 KB, so a full disk reaches the spool's writes at once (with the default 256 MB a WAL already grown to SQLite's
4 MB autocheckpoint is reused in place, and the spool stores on through a full disk). No station kill or broker
restart is scheduled while the disk is full or in the 40 s after (the spool's retry back-off): a restart then would
lose what was only in memory, which the station says it does. Prints one table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from edge_helpers import Collector, Mosquitto, fill_disk, free_port, make_toy_bundle, mosquitto_binary  # noqa: E402

STATION = "soak"


SIZES = ((64, 64), (96, 80))  # (h, w) the camera switches between


def _jpegs(h: int, w: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    good = rng.integers(30, 120, size=(h, w, 3), dtype=np.uint8)
    bad = good.copy()
    bad[h // 4:3 * h // 4, w // 4:3 * w // 4] = 255
    return [cv2.imencode(".jpg", img)[1].tobytes() for img in (good, bad)]


class PacedCamera:
    """A camera at ``fps`` behind a FIFO: dark noise, and a bright defect for 2 s out of every 10 s;
    ``switch_size()`` changes its frame size mid-stream (as a camera reconfigured by its web page does)."""

    def __init__(self, path: Path, fps: float = 10.0) -> None:
        os.mkfifo(path)
        self.path = path
        self.fps = fps
        self.by_size = [_jpegs(h, w) for h, w in SIZES]
        self.size_index = 0
        self.jpegs = self.by_size[0]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        n = 0
        while not self.stop.is_set():
            try:
                with open(self.path, "wb") as fh:  # waits for a reader (a restarted station)
                    while not self.stop.is_set():
                        defect = (n % int(10 * self.fps)) >= int(8 * self.fps)
                        fh.write(self.jpegs[defect])
                        fh.flush()
                        n += 1
                        time.sleep(1.0 / self.fps)
            except OSError:
                time.sleep(0.05)

    def switch_size(self) -> None:
        self.size_index = 1 - self.size_index
        self.jpegs = self.by_size[self.size_index]

    def close(self) -> None:
        self.stop.set()
        with contextlib.suppress(OSError):
            os.close(os.open(self.path, os.O_RDONLY | os.O_NONBLOCK))


def rss_mb(pid: int) -> Optional[float]:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def spool_depth(path: Path) -> int:
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)) as db:
            return int(db.execute("SELECT COUNT(*) FROM records").fetchone()[0])
    except sqlite3.Error:
        return 0


def last_seq(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        row = db.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()
        return int(row[0]) if row else 0


POISON = {  # what an adversary (or a broken integration) publishes on the command topics
    "deep_json": b"[" * 2000 + b"]" * 2000,
    "10mb_string": b'{"event_id": "' + b"x" * (10 * 2**20) + b'"}',
    "invalid_utf8": b'{"event_id": "\xff\xfe\xfd"}',
}


def send_poison(url: str) -> None:
    """Each poison on cmd/reload and cmd/label, QoS 1 (the broker holds it for the station's session), then one
    valid reload: the station must still hear it ("command reload received" in its log)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from edge.mqtt import parse_mqtt_url

    u = parse_mqtt_url(url)
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"soak-poison-{os.getpid()}")
    try:
        client.connect(u.host, u.port)
    except OSError:
        return  # the broker is being restarted: this round is skipped
    client.loop_start()
    try:
        for command in ("reload", "label"):
            for payload in POISON.values():
                info = client.publish(f"anomaly/{STATION}/cmd/{command}", payload, qos=1)
                with contextlib.suppress(RuntimeError, ValueError):
                    info.wait_for_publish(10)
        info = client.publish(f"anomaly/{STATION}/cmd/reload", b"{}", qos=1)
        with contextlib.suppress(RuntimeError, ValueError):
            info.wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


class SmallDisk:
    """The state dir on a tmpfs of ``mb`` MB; ``fill()`` writes a file until it is full, ``free()`` deletes it."""

    def __init__(self, path: Path, mb: int = 16) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mb}m", "tmpfs", str(path)], capture_output=True,
                              text=True)
        self.refused = None if done.returncode == 0 else (done.stderr or done.stdout).strip() or "mount refused"
        self.filler = path / "filler"

    def fill(self) -> None:
        fill_disk(self.filler)

    def free(self) -> None:
        with contextlib.suppress(OSError):
            self.filler.unlink()

    def close(self) -> None:
        if self.refused is None:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


def by_fault(received: list[dict[str, Any]], expected: int,
             windows: list[tuple[str, float, float]]) -> dict[str, dict[str, int]]:
    """expected / delivered / lost per fault kind: each seq put down to the window its frame time falls in."""
    ts_of: dict[int, float] = {}
    for e in received:
        with contextlib.suppress(KeyError, ValueError):
            ts_of.setdefault(int(e["seq"]), datetime.fromisoformat(e["ts"].replace("Z", "+00:00")).timestamp())
    table: dict[str, dict[str, int]] = {}
    last_ts = 0.0
    for seq in range(1, expected + 1):
        delivered = seq in ts_of
        last_ts = ts_of.get(seq, last_ts)
        kind = next((k for k, t0, t1 in windows if t0 <= last_ts <= t1), "none")
        row = table.setdefault(kind, {"expected": 0, "delivered": 0, "lost": 0})
        row["expected"] += 1
        row["delivered" if delivered else "lost"] += 1
    return table


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--no-disk-full", action="store_true", help="leave out the full-disk fault (no tmpfs mount)")
    args = ap.parse_args()
    binary = mosquitto_binary()
    if not binary:
        print("soak: error: mosquitto not found (make broker)", file=sys.stderr)
        return 2
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="edge-soak-"))
    bundle = make_toy_bundle(work / "engines")
    camera = PacedCamera(work / "cam0.mjpeg")
    broker = Mosquitto(work / "broker", free_port(), binary, persistent=True)
    cfg = work / "station.yaml"
    cfg.write_text(f"""station: {STATION}
state_dir: {work / 'state'}
cameras:
  - {{id: cam0, source: {camera.path}, live: true, stale_timeout_s: 3, reopen_initial_s: 0.2, reopen_max_s: 1}}
events: {{k: 3, n: 5, close_after: 5, update_interval_s: 0.5, cooldown_s: 0.5}}
mqtt: {{stats_interval_s: 2, flush_timeout_s: 5, reconnect_max_s: 2}}
collect: {{enabled: true, dir: {work / 'collect'}, max_mb: 64, normal_every_s: 30}}
spool: {{max_mb: 4}}
""", encoding="utf-8")
    env = {**os.environ, "OPENCV_FFMPEG_CAPTURE_OPTIONS": "probesize;4096|analyzeduration;0",
           "PYTHONPATH": str(ROOT)}
    spool = work / "state" / f"{STATION}.spool.sqlite"
    disk = None if args.no_disk_full else SmallDisk(work / "state")
    disk_note = "left out (--no-disk-full)" if disk is None else (f"skipped: {disk.refused}" if disk.refused
                                                                   else "state dir on a 16 MB tmpfs")
    counts = {"broker_restarts": 0, "station_kills": 0, "station_starts": 0, "poison_rounds": 0,
              "size_switches": 0, "disk_full_s": 0}
    windows: list[tuple[str, float, float]] = []  # (fault kind, wall-clock start, end)
    rss: list[tuple[float, float]] = []  # (seconds into the station process, MB)
    rss_by_start: dict[int, list[tuple[float, float]]] = {}  # the same, per station process
    high_water = 0

    def start_station() -> subprocess.Popen:
        counts["station_starts"] += 1
        log = open(work / f"station-{counts['station_starts']}.log", "w")  # noqa: SIM115 (kept by the child)
        return subprocess.Popen([sys.executable, "-m", "edge.cli", "--config", str(cfg), "--engine", str(bundle.parent),
                                 "--mqtt", broker.url], cwd=work, stderr=log, env=env)

    def sample(seconds: float) -> None:
        """Sleep ``seconds`` while recording the spool's depth and the station's memory."""
        nonlocal high_water
        end = time.monotonic() + seconds
        while True:
            high_water = max(high_water, spool_depth(spool))
            mb = rss_mb(station.pid)
            if mb is not None:
                rss.append((time.monotonic() - station_t0, mb))
                rss_by_start.setdefault(counts["station_starts"], []).append((time.monotonic() - station_t0, mb))
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(0.5, left))

    t_end = time.monotonic() + args.minutes * 60
    with Collector(broker.url, [f"anomaly/{STATION}/+/event"], session="soak-scada") as col:
        time.sleep(1.5)  # the broker has saved the subscriber's session
        station = start_station()
        station_t0 = time.monotonic()
        next_broker = time.monotonic() + rng.uniform(30, 120)
        next_kill = time.monotonic() + rng.uniform(60, 240)
        next_poison = time.monotonic() + rng.uniform(15, 45)
        next_switch = time.monotonic() + rng.uniform(20, 50)
        disk_at = time.monotonic() + args.minutes * 60 / 3 if disk is not None and disk.refused is None else None
        quiet_until = 0.0  # no kill or broker restart before this (the disk fault and its recovery)
        while time.monotonic() < t_end:
            sample(1.0)
            now = time.monotonic()
            if disk_at is not None and now >= disk_at and now < t_end - 100:
                assert disk is not None
                t0 = time.time()
                disk.fill()
                sample(60.0)
                disk.free()
                counts["disk_full_s"] += 60
                windows.append(("disk_full", t0, time.time() + 5))
                disk_at = None
                quiet_until = time.monotonic() + 40
                continue
            if now >= next_poison:
                t0 = time.time()
                send_poison(broker.url)
                counts["poison_rounds"] += 1
                windows.append(("poison", t0, time.time() + 5))
                next_poison = now + rng.uniform(30, 60)
                continue
            if now >= next_switch:
                camera.switch_size()
                counts["size_switches"] += 1
                windows.append(("resolution_change", time.time(), time.time() + 10))
                next_switch = now + rng.uniform(30, 60)
                continue
            if now < quiet_until:
                continue
            if now >= next_broker:
                t0 = time.time()
                broker.kill(signal.SIGTERM)
                counts["broker_restarts"] += 1
                sample(rng.uniform(2, 25))
                if rng.random() < 0.5 and now < t_end - 60:  # sometimes the station dies during the outage
                    station.kill()
                    station.wait()
                    counts["station_kills"] += 1
                    station = start_station()
                    station_t0 = time.monotonic()
                broker.start()
                windows.append(("broker_restart", t0, time.time() + 5))
                next_broker = time.monotonic() + rng.uniform(30, 120)
            elif now >= next_kill:
                windows.append(("station_kill", time.time() - 2, time.time() + 8))
                station.kill()
                station.wait()
                counts["station_kills"] += 1
                sample(rng.uniform(0.5, 5))
                station = start_station()
                station_t0 = time.monotonic()
                next_kill = time.monotonic() + rng.uniform(60, 240)
        station.send_signal(signal.SIGTERM)
        station.wait(60)
        expected = last_seq(spool)
        col.wait_for(lambda ms: len({json.loads(m.payload)["seq"] for m in ms}) >= expected, timeout=60)
        received = [json.loads(m.payload) for m in col.messages]
        exit_code = station.returncode
    camera.close()
    broker.stop()
    if disk is not None:
        disk.close()
    keys = {(e["event_id"], e["type"], e["seq"]) for e in received}
    seqs = {e["seq"] for e in received}
    by_id: dict[str, set[str]] = {}
    for e in received:
        by_id.setdefault(e["event_id"], set()).add(e["type"])
    unended = sum(1 for types in by_id.values() if "start" in types and "end" not in types)
    in_order = [e["seq"] for e in received]
    first_seen = []
    seen: set[int] = set()
    for s in in_order:
        if s not in seen:
            seen.add(s)
            first_seen.append(s)
    # memory: the peak after 60 s into a station process over its 55-65 s (transient: a 10 MB poison is held
    # while it is read), worst over processes
    growth = 0.0
    if rss:
        late = [mb for t, mb in rss if t >= 60]
        early = [mb for t, mb in rss if 55 <= t <= 65]
        if late and early:
            growth = max(late) - min(early)
    # what stays: the median of a process's last 10 s against its 55-65 s, for every process that lived 2 min
    settled = [statistics.median([mb for t, mb in series if t >= series[-1][0] - 10])
               - statistics.median([mb for t, mb in series if 55 <= t <= 65])
               for series in rss_by_start.values() if series[-1][0] >= 120]
    per_fault = by_fault(received, expected, windows)
    logs = "".join(p.read_text(errors="replace") for p in sorted(work.glob("station-*.log")))
    result: dict[str, Any] = {
        "minutes": args.minutes, "seed": args.seed, **counts, "disk_full": disk_note,
        "last_exit_code": exit_code, "reloads_heard": logs.count("command reload received"),
        "tracebacks_in_logs": logs.count("Traceback"),
        "spool_degraded_lines": logs.count("cannot store ("), "spool_recovered_lines": logs.count("storing again"),
        "events_expected": expected, "events_delivered": len(seqs & set(range(1, expected + 1))),
        "events_lost": len(set(range(1, expected + 1)) - seqs), "duplicates_received": len(received) - len(keys),
        "events_started_never_ended": unended,
        "delivered_in_seq_order": first_seen == sorted(first_seen),
        "spool_high_water": high_water, "rss_mb_max": round(max((mb for _, mb in rss), default=0.0), 1),
        "rss_growth_mb_after_60s": round(growth, 1),
        "rss_settled_growth_mb": round(max(settled), 1) if settled else None, "workdir": str(work),
        "by_fault": per_fault,
    }
    width = max(len(k) for k in result)
    print(f"soak: {args.minutes:g} min, seed {args.seed}, work dir {work}")
    for k, v in result.items():
        if k != "by_fault":
            print(f"  {k:<{width}}  {v}")
    print(f"\n  {'fault (events made during it)':<32}{'expected':>9}{'delivered':>10}{'lost':>6}")
    for kind, row in sorted(per_fault.items()):
        print(f"  {kind:<32}{row['expected']:>9}{row['delivered']:>10}{row['lost']:>6}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["events_lost"] == 0 and unended == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
