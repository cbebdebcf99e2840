"""Frame collection for retraining and operator labels: the real edge-run on a clip with defect stretches, a
real Mosquitto, real PNG files on disk, the trainer's own data reader on the result."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import paho.mqtt.publish as mqtt_publish
import pytest
from edge_helpers import (
    Collector,
    assert_one_line_error,
    check_payloads,
    cli_command,
    run_cli,
    wait_stopped,
    write_video,
)

from core.events import EventDetector, EventRule
from core.payloads import payload_problem
from edge.collect import Collection
from edge.config import CollectConfig
from edge.frame_writer import EventJob, FrameWriter, LabelJob, NormalJob, Shot, encode_png, frame_name
from edge.mqtt import parse_mqtt_url
from edge.sources import Frame
from trainer.data import load_test, load_train

FPS = 10.0
T0 = 1_790_000_000.0  # a fixed frame clock for the in-process tests


def wait_until(pred: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def sidecars(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def noise_frame(index: int, camera: str = "cam0", size: tuple[int, int] = (48, 64), seed: int = 0) -> Frame:
    image = np.random.default_rng(seed * 100_000 + index).integers(0, 256, (*size, 3), dtype=np.uint8)
    return Frame(camera=camera, index=index, ts=T0 + index / FPS, image=image[:16, :16].copy(), original=image)


def shot(index: int, score: float = 0.01, peak: bool | None = None) -> Shot:
    return Shot(noise_frame(index), score, 0.1, "toy", "v1", peak=peak)


# -- in process: the writer's size bound, disk errors, a full queue ------------------------------------------
def test_size_cap_rotates_oldest_normals_then_events_never_labelled(tmp_path: Path) -> None:
    root = tmp_path / "collect"
    png, _, _ = encode_png(shot(0))
    one = len(png) + 420  # a frame and its sidecar (~400 bytes)
    labelled = root / "test" / "good"
    labelled.mkdir(parents=True)
    (labelled / "old.png").write_bytes(png)
    (labelled / "old.json").write_text(json.dumps({"event_id": "x", "label": "good"}))
    writer = FrameWriter(root, "st", max_bytes=int(5.5 * one), queue_frames=64, retry_s=60)
    writer.start()
    try:
        for i in range(1, 7):
            assert writer.submit(NormalJob(shot(i)))
        assert wait_until(lambda: writer.counts["normal_frames"] == 6)
        kept = sorted(p.name for p in (root / "train" / "good").glob("*.png"))
        assert kept == sorted(f"{frame_name(T0 + i / FPS, 'cam0', i)}.png" for i in (3, 4, 5, 6))  # 1, 2 rotated
        assert writer.counts["rotated"] == 2
        assert not list((root / "train" / "good").glob("*.json")) or \
            all(p.with_suffix(".png").exists() for p in (root / "train" / "good").glob("*.json"))

        first = "11111111-1111-4111-8111-111111111111"
        writer.submit(EventJob(first, [shot(i, 0.5, i == 11) for i in (10, 11, 12)]))
        assert wait_until(lambda: writer.counts["events"] == 1)
        assert len(list((root / "train" / "good").glob("*.png"))) == 1  # three normals made room
        second = "22222222-2222-4222-8222-222222222222"
        writer.submit(EventJob(second, [shot(i, 0.5, i == 21) for i in (20, 21, 22)]))
        assert wait_until(lambda: writer.counts["events"] == 2)
        assert not list((root / "train" / "good").glob("*.png"))  # the last normal, then the older event
        assert not (root / "events" / first).exists() and (root / "events" / second).is_dir()

        writer.submit(LabelJob(second, "defect", "dent"))
        assert wait_until(lambda: writer.counts["labelled"] == 1)
        # now only labelled frames: 4 of them fill 5.5 frames' worth; an event of 3 may delete nothing
        writer.submit(EventJob(first, [shot(i, 0.5, i == 31) for i in (30, 31, 32)]))
        assert wait_until(lambda: writer.counts["skipped"] == 3)
        assert (labelled / "old.png").exists() and len(list((root / "test" / "dent").glob("*.png"))) == 3
        assert not list((root / "events").iterdir())
    finally:
        writer.close(10)


def test_disk_error_is_one_line_pauses_and_recovers(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "collect"
    writer = FrameWriter(root, "st", max_bytes=1 << 30, queue_frames=64, retry_s=0.5)
    writer.start()
    try:
        writer.submit(NormalJob(shot(1)))
        assert wait_until(lambda: writer.counts["normal_frames"] == 1)
        good = root / "train" / "good"
        shutil.rmtree(good)
        good.write_text("a file where the folder was")  # every write now fails (ENOTDIR), even as root
        with caplog.at_level(logging.INFO, logger="edge.collect"):
            writer.submit(NormalJob(shot(2)))
            assert wait_until(lambda: writer.counts["errors"] == 1)
            assert writer.paused
            assert not writer.submit(NormalJob(shot(3)))  # paused: handed back at once, counted
            assert writer.counts["skipped"] == 1
            assert wait_until(lambda: not writer.paused, 3)
            writer.submit(NormalJob(shot(4)))  # the same cause again: not logged again
            assert wait_until(lambda: writer.counts["errors"] == 2)
            good.unlink()
            good.mkdir()
            assert wait_until(lambda: not writer.paused, 3)
            writer.submit(NormalJob(shot(5)))
            assert wait_until(lambda: writer.counts["normal_frames"] == 2)
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1, errors
        assert "collection paused" in errors[0] and str(good) in errors[0], errors
        assert any("writing to" in r.getMessage() and "again" in r.getMessage() for r in caplog.records)
    finally:
        writer.close(10)


def test_full_queue_drops_and_counts_never_blocks(tmp_path: Path) -> None:
    writer = FrameWriter(tmp_path / "c", "st", max_bytes=1 << 30, queue_frames=3, retry_s=60)  # not started
    t0 = time.perf_counter()
    results = [writer.submit(NormalJob(shot(i))) for i in range(10)]
    assert time.perf_counter() - t0 < 0.5
    assert results == [True] * 3 + [False] * 7 and writer.counts["dropped"] == 7
    assert not writer.submit(EventJob("33333333-3333-4333-8333-333333333333", [shot(20), shot(21)]))
    assert writer.counts["dropped"] == 9
    writer.start()
    writer.close(10)
    assert writer.counts["normal_frames"] == 3
    # no event, no label yet: no test/ folder, which `edge-train fit` would refuse empty
    assert not (tmp_path / "c" / "test").exists() and load_test(tmp_path / "c", (16, 16)) is None
    assert len(load_train(tmp_path / "c", (16, 16))) == 3


def test_a_label_on_an_open_event_waits_for_its_frames(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = CollectConfig(enabled=True, normal_every_s=0.5, guard_s=1.0, event_frames=3)
    collection = Collection(cfg, tmp_path / "c", "st", ["cam0"], window_n=5)
    collection.set_model("toy", "v1", 0.1)
    detector = EventDetector(EventRule(threshold=0.1, k=3, n=5, close_after=3, hysteresis=0.9, cooldown_s=0.0))
    collection.start()
    event_id = None
    with caplog.at_level(logging.INFO, logger="edge.collect"):
        for i in range(60):
            score = 0.5 if 20 <= i < 30 else 0.01
            frame = noise_frame(i)
            transitions = detector.feed(i, frame.ts, score)
            collection.on_frame("cam0", frame, score, detector, transitions)
            for t in transitions:
                if t.type == "start":
                    event_id = t.event_id
                    collection.on_label_message(b"[1, 2]")
                    collection.on_label_message(json.dumps({"event_id": t.event_id, "verdict": "defect"}).encode())
                    collection.on_label_message(json.dumps({"event_id": "nope", "verdict": "good"}).encode())
                    collection.on_label_message(json.dumps({"event_id": t.event_id, "verdict": "defect",
                                                            "kind": "dent"}).encode())
                if t.type == "end":
                    collection.on_event_end("cam0", t)
    collection.close()
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"label for event {event_id} held" in m for m in messages), messages
    ignored = [m for m in messages if "ignored cmd/label" in m]
    assert len(ignored) == 3 and "needs a kind" in ignored[1] and "event_id" in ignored[2], ignored
    dent = sidecars(tmp_path / "c" / "test" / "dent")
    assert [s["frame"] for s in dent] == [21, 22, 23]  # the peak (highest frame of the equal opening hits) ± 1
    assert [s["peak"] for s in dent] == [False, True, False]
    assert all(s["label"] == "dent" and s["event_id"] == event_id and s["labelled_at"].endswith("Z") for s in dent)
    normals = [s["frame"] for s in sidecars(tmp_path / "c" / "train" / "good")]
    assert normals and all(i <= 20 - 10 or i >= 32 + 10 for i in normals), normals
    assert collection.stats()["labels_refused"] == 3 and collection.stats()["labelled"] == 1


# -- the real station ---------------------------------------------------------------------------------------
def test_station_collects_normals_away_from_events_and_labels_move_events(tmp_path: Path, mosquitto: str,
                                                                           toy_bundle: Path) -> None:
    defects = [(20, 40), (70, 90), (120, 140)]
    video = write_video(tmp_path / "line.avi", defects, 200, fps=FPS)
    root = tmp_path / "collected"
    cfg = tmp_path / "st-col.yaml"
    cfg.write_text(f"""station: st-col
state_dir: {tmp_path / 'state'}
engine:
  max_batch: 4
  max_wait_ms: 5
cameras:
  - id: cam0
    source: {video}
    max_fps: 25
events:
  k: 3
  n: 5
  close_after: 5
  cooldown_s: 0.5
  update_interval_s: 100
mqtt:
  stats_interval_s: 0.3
collect:
  enabled: true
  dir: {root}
  normal_every_s: 0.5
  guard_s: 1.0
  event_frames: 5
""")
    url = parse_mqtt_url(mosquitto)

    def send(payload: Any) -> None:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        mqtt_publish.single("anomaly/st-col/cmd/label", body, qos=1, hostname=url.host, port=url.port)

    with Collector(mosquitto, ["anomaly/st-col/status", "anomaly/st-col/stats", "anomaly/st-col/+/event"]) as col:
        proc = subprocess.Popen([*cli_command("edge-run"), "--config", str(cfg), "--engine", str(toy_bundle),
                                 "--mqtt", mosquitto], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=tmp_path)
        try:
            def events() -> list[dict[str, Any]]:
                return [json.loads(m.payload) for m in col.on("/event")]

            def started(n: int) -> str:
                assert col.wait_for(lambda ms: sum(e["type"] == "start" for e in events()) >= n, timeout=60)
                return [e for e in events() if e["type"] == "start"][n - 1]["event_id"]

            first = started(1)
            assert col.wait_for(lambda ms: any(e["type"] == "end" for e in events()), timeout=60)
            assert wait_until(lambda: (root / "events" / first).is_dir())
            # an operator at the station's shell while it runs: the first event is a scratch
            during = run_cli("edge-run", ["label", "--config", cfg, first, "defect", "--kind", "scratch"],
                             cwd=tmp_path)
            assert during.returncode == 0, during.stderr
            running_then = proc.poll() is None
            send(b"not json")
            send({"event_id": first, "verdict": "defect", "kind": "Bad Kind"})
            send({"event_id": "6f1c0000-0000-4000-8000-000000000000", "verdict": "good"})
            send({"event_id": first, "verdict": "good"})  # labelled already
            second = started(2)
            send({"event_id": second, "verdict": "defect", "kind": "dent"})  # while it is open: held
            third = started(3)
            send({"event_id": third, "verdict": "good"})  # a false alarm
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, err
        assert "Traceback" not in err
        wait_stopped(col)
        got = check_payloads(col)  # the stats' collect object included
    assert running_then, "the station had ended before edge-run label ran: the test proves nothing about a running one"
    assert f"event {first} labelled scratch: 5 frame(s) moved to {root / 'test' / 'scratch'}" in during.stdout
    assert any("station 'st-col'" in line and f"collecting in {root}" in line for line in err.splitlines()), err
    evs = got["event"]
    starts = {e["event_id"]: e for e in evs if e["type"] == "start"}
    ends = {e["event_id"]: e for e in evs if e["type"] == "end"}
    assert len(starts) == 3 and set(ends) == set(starts) == {first, second, third}

    # normal frames: below the threshold, never within guard_s (10 frames) of an event or a defect stretch
    normals = sidecars(root / "train" / "good")
    assert len(normals) >= 8, normals
    for s in normals:
        i = s["frame"]
        assert s["kind"] == "normal" and s["score"] < s["threshold"]
        assert all(i <= starts[e]["frame"] - 10 or i >= ends[e]["frame"] + 10 for e in starts), i
        assert all(i < a - 8 or i >= b + 10 for a, b in defects), i
        assert s["size"] == [64, 64] and s["resolution"] == "captured" and s["model"] == "toy"
    assert len({s["frame"] for s in normals}) == len(normals)
    for p in (root / "train" / "good").glob("*.json"):
        img = cv2.imread(str(p.with_suffix(".png")))
        assert img is not None and img.shape == (64, 64, 3)

    # the CLI moved the first event to test/scratch; cmd/label the second to test/dent (sent while it was open)
    # and the third to test/good; the bad messages were ignored with one line each
    for event_id, label in ((first, "scratch"), (second, "dent"), (third, "good")):
        labelled = sidecars(root / "test" / label)
        assert len(labelled) == 5 and {s["event_id"] for s in labelled} == {event_id}
        assert all(s["label"] == label and s["kind"] == "event" and s["labelled_at"].endswith("Z") for s in labelled)
        peaks = [s for s in labelled if s["peak"]]
        assert len(peaks) == 1 and peaks[0]["score"] == pytest.approx(ends[event_id]["peak_score"], abs=1e-6)
        p = peaks[0]["frame"]
        assert [s["frame"] for s in labelled] == [p - 2, p - 1, p, p + 1, p + 2]
        assert all(cv2.imread(str(m.with_suffix(".png"))) is not None for m in (root / "test" / label).glob("*.json"))
    assert not list((root / "events").iterdir())
    assert sum("ignored cmd/label" in line and "Bad Kind" in line for line in err.splitlines()) == 1, err
    assert "ignored command on anomaly/st-col/cmd/label (payload is not empty or a JSON object)" in err
    refused = [line for line in err.splitlines() if "cmd/label refused" in line]
    assert len(refused) == 2 and "unknown event" in refused[0] and "already labelled 'scratch'" in refused[1], refused
    final = got["stats"][-1]["collect"]
    assert final["normal_frames"] == len(normals) and final["events"] == 3 and final["event_frames"] == 15
    assert final["labelled"] == 2 and final["labels_refused"] == 3 and final["dropped"] == 0

    again = run_cli("edge-run", ["label", "--config", cfg, first, "good"], cwd=tmp_path)
    assert_one_line_error(again, "edge-run label", first, "already labelled 'scratch'")
    unknown = run_cli("edge-run", ["label", "--config", cfg, "6f1c0000-0000-4000-8000-000000000000", "good"],
                      cwd=tmp_path)
    assert_one_line_error(unknown, "edge-run label", "unknown event")
    no_kind = run_cli("edge-run", ["label", "--config", cfg, second, "defect"], cwd=tmp_path)
    assert_one_line_error(no_kind, "edge-run label", "needs a kind")

    # what the trainer reads: train/good, and test/good + test/<kind> as labelled test images
    train = load_train(root, (32, 32))
    assert len(train) == len(normals)
    test = load_test(root, (32, 32))
    assert test is not None and sorted(set(test.kinds)) == ["dent", "good", "scratch"]
    assert test.labels.tolist().count(0) == 5 and test.labels.tolist().count(1) == 10


def test_a_station_keeps_its_folder_within_max_mb_across_restarts(tmp_path: Path, toy_bundle: Path) -> None:
    video = write_video(tmp_path / "v.avi", [], 40, fps=FPS)
    root = tmp_path / "collected"
    cfg = tmp_path / "s.yaml"
    cfg.write_text(f"station: st-cap\nstate_dir: {tmp_path / 'state'}\nmqtt:\n  flush_timeout_s: 0\ncollect:\n"
                   f"  enabled: true\n  dir: {root}\n  normal_every_s: 0.1\n  guard_s: 0\n  max_mb: 0.05\n"
                   "  queue_frames: 100\n")
    first: list[str] = []
    for run in range(2):
        proc = run_cli("edge-run", ["--config", cfg, "--camera", video, "--engine", toy_bundle,
                                    "--mqtt", "mqtt://127.0.0.1:1"], cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        files = sorted((root / "train" / "good").iterdir())
        assert sum(p.stat().st_size for p in files) <= 0.05 * 2**20
        frames = sorted(s["frame"] for s in sidecars(root / "train" / "good"))
        assert 2 <= len(frames) < 40 and frames == list(range(40 - len(frames), 40)), frames  # the newest kept
        names = [p.name for p in files if p.suffix == ".png"]
        if run == 0:
            first = names
        else:
            assert not set(first) & set(names)  # the first run's frames were counted at start and rotated first


def test_collect_dir_that_cannot_be_created_is_one_line(tmp_path: Path, toy_bundle: Path) -> None:
    video = write_video(tmp_path / "v.avi", [], 10)
    (tmp_path / "afile").write_text("x")
    cfg = tmp_path / "s.yaml"
    cfg.write_text(f"collect:\n  enabled: true\n  dir: {tmp_path / 'afile' / 'sub'}\n")
    proc = run_cli("edge-run", ["--config", cfg, "--camera", video, "--engine", toy_bundle, "--state-dir",
                                tmp_path / "state", "--mqtt", "mqtt://127.0.0.1:1"], cwd=tmp_path, timeout=30)
    assert_one_line_error(proc, "edge-run", "collect.dir", "cannot create")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("collect:\n  event_frames: 0\n")
    proc = run_cli("edge-run", ["label", "--config", bad, "6f1c0000-0000-4000-8000-000000000000", "good"])
    assert_one_line_error(proc, "edge-run label", "bad.yaml:2", "collect.event_frames")


def test_label_schema_matches_the_contract() -> None:
    ok = {"event_id": "6f1c0000-0000-4000-8000-000000000000", "verdict": "defect", "kind": "scratch"}
    assert payload_problem("label", ok) is None
    assert payload_problem("label", {**ok, "verdict": "good", "kind": None}) is not None
    assert payload_problem("label", {"event_id": ok["event_id"], "verdict": "good"}) is None
    assert "kind" in (payload_problem("label", {**ok, "kind": "Scratch"}) or "")
    assert payload_problem("label", {**ok, "extra": 1}) is not None
