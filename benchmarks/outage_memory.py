"""Memory of a station holding events during a broker outage: the spool (events on disk, at most
mqtt.max_inflight in the MQTT client) against handing every event to paho while disconnected (what the
station did before the spool: paho queues them all in memory), in the same run.

    python benchmarks/outage_memory.py [--events 30000]

Each side runs in a fresh subprocess with the broker unreachable; resident memory (VmRSS) is read before the
first event and after every checkpoint. Prints one table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def payload(seq: int) -> dict:
    return {"schema": 2, "event_id": f"6f1c{seq:04x}-0000-4000-8000-000000000000"[:36], "type": "update",
            "station": "bench", "camera": "cam0", "seq": seq, "ts": "2026-11-26T07:12:03.400Z", "frame": seq,
            "score": 0.91, "peak_score": 2.91, "threshold": 2.37, "model": "patchcore",
            "model_version": "20261126T070000Z", "backend": "onnxruntime"}


def child(mode: str, events: int, checkpoints: list[int]) -> None:
    """Runs in a subprocess: hold ``events`` events with the broker down; print JSON {count: rss_mb}."""
    from edge.config import MqttConfig
    from edge.mqtt import new_client, parse_mqtt_url
    from edge.outbox import open_outbox
    from edge.sinks.mqtt import MqttSink

    cfg = MqttConfig(url="mqtt://127.0.0.1:1", reconnect_min_s=1, reconnect_max_s=1)
    out = {0: rss_mb()}
    topic = "anomaly/bench/cam0/event"
    if mode == "spool":
        state = Path(tempfile.mkdtemp(prefix="outage-"))
        spool = open_outbox(state, "bench", ["mqtt"], 1 << 30, 30 * 86400.0)
        publisher = MqttSink(cfg, "bench", spool)
        publisher.start()
        for i in range(1, events + 1):
            spool.add_event("cam0", lambda seq: payload(seq))
            publisher.wake()
            if i in checkpoints:
                out[i] = rss_mb()
        publisher.stop()
        spool.close()
        disk = sum(f.stat().st_size for f in state.iterdir() if f.name.startswith("bench.spool"))
        out[-1] = disk / events  # bytes on disk per held event
    else:
        client = new_client("bench-paho", parse_mqtt_url(cfg.url), cfg)
        client.connect_async("127.0.0.1", 1)
        client.loop_start()
        for i in range(1, events + 1):
            client.publish(topic, json.dumps(payload(i)).encode(), qos=1)  # queued in memory while disconnected
            if i in checkpoints:
                out[i] = rss_mb()
        client.loop_stop()
    print(json.dumps(out))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=30000)
    ap.add_argument("--child", choices=("spool", "paho"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    checkpoints = sorted({1000, args.events // 10, args.events // 3, args.events} - {0})
    if args.child:
        child(args.child, args.events, checkpoints)
        return 0
    rows = {}
    for mode in ("paho", "spool"):
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, __file__, "--events", str(args.events), "--child", mode],
                             capture_output=True, text=True, check=True, cwd=ROOT)
        rows[mode] = ({int(k): v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()},
                      time.perf_counter() - t0)
    print(f"events held during an outage: resident memory (MB), {args.events} events")
    print(f"{'held events':>12} | {'paho queue (before)':>20} | {'spool (now)':>12}")
    for n in [0, *checkpoints]:
        print(f"{n:>12} | {rows['paho'][0][n]:>20.1f} | {rows['spool'][0][n]:>12.1f}")
    disk = rows["spool"][0][-1]
    month = disk * 10 * 60 * 24 * 30 / 1e6
    print(f"spool on disk: {disk:.0f} bytes per event (SQLite file + WAL): a month of outage at 10 events a minute "
          f"is {month:.0f} MB")
    for mode, label in (("paho", "paho queue"), ("spool", "spool")):
        mem = rows[mode][0]
        per_event_kb = (mem[args.events] - mem[0]) * 1024 / args.events
        print(f"{label}: {per_event_kb:.2f} KB per held event; {rows[mode][1]:.1f} s for the run "
              f"({args.events / rows[mode][1]:.0f} events/s including start-up)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
