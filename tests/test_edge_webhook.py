"""The webhook sink against a real HTTP server (http.server in a thread on a loopback port): each event POSTed
as JSON with its Idempotency-Key, retried with back-off until a 2xx, refusals dropped after max_refusals and
counted, secrets never logged; and a real edge-run with BOTH sinks (a real Mosquitto too): every event of the
run reaches the HTTP server across a server outage and a station restart, as it reaches the MQTT subscriber."""

from __future__ import annotations

import base64
import json
import logging
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
from edge_helpers import Collector, check_payloads, cli_command, free_port, run_cli, validate, write_video

from edge.config import WebhookConfig
from edge.outbox import Outbox
from edge.sinks.webhook import WebhookSink

FPS = 10.0


@dataclass
class Post:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int

    @property
    def key(self) -> str:
        return self.headers["Idempotency-Key"]

    def json(self) -> Any:
        return json.loads(self.body)


class Receiver:
    """A real HTTP server on a loopback port, in a thread. Records every POST; ``answer(post) -> status`` decides
    the reply (200 unless set); ``stop()`` closes the port (connections refused) and ``start()`` opens it again."""

    def __init__(self, port: Optional[int] = None) -> None:
        self.port = port or free_port()
        self.posts: list[Post] = []
        self.answer: Callable[[Post], int] = lambda post: 200
        self._cond = threading.Condition()
        self._server: Optional[ThreadingHTTPServer] = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/events"

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                post = Post(self.path, dict(self.headers.items()), body, 0)
                post.status = receiver.answer(post)
                with receiver._cond:
                    receiver.posts.append(post)
                    receiver._cond.notify_all()
                self.send_response(post.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def delivered(self) -> list[Post]:
        """2xx answers, first copy of each Idempotency-Key (what a de-duplicating receiver keeps), in order."""
        with self._cond:
            seen: set[str] = set()
            out = []
            for p in self.posts:
                if 200 <= p.status < 300 and p.key not in seen:
                    seen.add(p.key)
                    out.append(p)
            return out

    def wait_for(self, pred: Callable[[list[Post]], bool], timeout: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not pred(self.posts):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True


@pytest.fixture
def receiver() -> Any:
    rx = Receiver()
    yield rx
    rx.stop()


def event(kind: str, event_id: str = "e1") -> Any:
    def make(seq: int) -> dict[str, Any]:
        payload: dict[str, Any] = {"event_id": event_id, "type": kind, "seq": seq}
        if kind == "end":
            payload["reason"] = "cleared"
        return payload
    return make


def fast(url: str, **kw: Any) -> WebhookConfig:
    return WebhookConfig(url=url, retry_min_s=0.05, retry_max_s=0.2, timeout_s=2.0, **kw)


# -- the sink alone, on a real outbox ---------------------------------------------------------------
def test_events_are_posted_in_order_with_their_key_and_retried_until_a_2xx(
        tmp_path: Path, receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    receiver.answer = lambda post: 503
    box = Outbox(tmp_path / "s.sqlite", ["webhook"], max_bytes=10**6, max_age_s=3600)
    url = f"http://hook:pa55word@127.0.0.1:{receiver.port}/in/events?site=7"
    sink = WebhookSink(fast(url), "st", box)
    with caplog.at_level(logging.INFO, "edge.webhook"):
        sink.start()
        for kind in ("start", "update", "end"):
            box.add_event("cam0", event(kind))
        sink.wake()
        assert receiver.wait_for(lambda ps: len(ps) >= 3), "no retries while the receiver answers 503"
        assert sink.pending == 3 and not sink.connected and box.depth == 3  # nothing dropped
        receiver.answer = lambda post: 200
        assert sink.flush(10.0) == 0
        sink.stop()
    got = receiver.delivered()
    assert [p.key for p in got] == ["e1:start:1", "e1:update:2", "e1:end:3"]  # event_id:type:seq, in seq order
    assert [p.json()["type"] for p in got] == ["start", "update", "end"] and box.depth == 0
    first = got[0]
    assert first.path == "/in/events?site=7" and first.headers["Content-Type"] == "application/json"
    assert first.headers["Authorization"] == "Basic " + base64.b64encode(b"hook:pa55word").decode()
    assert sink.stats() == {"depth": 0, "delivered": 3, "failed": 0, "connected": True}
    retried = [p.key for p in receiver.posts if p.status == 503]
    assert retried and set(retried) == {"e1:start:1"}  # the oldest is retried; nothing overtakes it
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert sum("answered 503" in r.getMessage() for r in caplog.records) == 1, text  # one line per outage
    assert "answers again" in text and "pa55word" not in text and "site=7" not in text


def test_a_refused_event_is_dropped_after_max_refusals_and_counted_and_the_rest_flow(
        tmp_path: Path, receiver: Receiver, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOK_TOKEN", "t0ken-never-logged")
    receiver.answer = lambda post: 422 if post.json().get("type") == "update" else 201
    box = Outbox(tmp_path / "s.sqlite", ["webhook"], max_bytes=10**6, max_age_s=3600)
    sink = WebhookSink(fast(receiver.url, token_env="HOOK_TOKEN", max_refusals=3), "st", box)
    with caplog.at_level(logging.INFO, "edge.webhook"):
        sink.start()
        for kind in ("start", "update", "end"):
            box.add_event("cam0", event(kind))
        box.add_snapshot("cam0", "e1", b"\xff\xd8jpeg")  # webhook.snapshots is false: settled, never posted
        sink.wake()
        assert sink.flush(10.0) == 0
        sink.stop()
    assert [p.key for p in receiver.posts] == ["e1:start:1"] + ["e1:update:2"] * 3 + ["e1:end:3"]
    assert [p.key for p in receiver.delivered()] == ["e1:start:1", "e1:end:3"]
    assert all(p.headers["Authorization"] == "Bearer t0ken-never-logged" for p in receiver.posts)
    assert sink.failed == 1 and sink.delivered == 2 and box.depth == 0
    refusals = [r.getMessage() for r in caplog.records if "refused a record" in r.getMessage()]
    assert len(refusals) == 1 and "422" in refusals[0]  # once per cause, not once per try
    assert "t0ken" not in "\n".join(r.getMessage() for r in caplog.records)


def test_snapshots_are_posted_as_json_when_asked(tmp_path: Path, receiver: Receiver) -> None:
    box = Outbox(tmp_path / "s.sqlite", ["webhook"], max_bytes=10**6, max_age_s=3600)
    sink = WebhookSink(fast(receiver.url, snapshots=True), "st", box)
    sink.start()
    box.add_snapshot("cam3", "e9", b"\xff\xd8jpeg", {"score": 0.8125, "frame": 42, "ts": "2026-12-06T21:00:04.200Z"})
    box.add_snapshot("cam3", "e8", b"\xff\xd8old")  # as an earlier version stored it: no meta
    sink.wake()
    assert sink.flush(10.0) == 0
    sink.stop()
    post, old = receiver.posts
    body = post.json()
    assert post.key == "e9:snapshot" and body["type"] == "snapshot" and body["camera"] == "cam3"
    assert body["event_id"] == "e9" and base64.b64decode(body["data_base64"]) == b"\xff\xd8jpeg"
    assert (body["score"], body["frame"], body["ts"]) == (0.8125, 42, "2026-12-06T21:00:04.200Z")
    assert old.json()["event_id"] == "e8" and base64.b64decode(old.json()["data_base64"]) == b"\xff\xd8old"
    assert "score" not in old.json()


def test_the_sender_survives_an_outbox_error_and_failure_stays_none(tmp_path: Path, receiver: Receiver,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    box = Outbox(tmp_path / "s.sqlite", ["webhook"], max_bytes=10**6, max_age_s=3600)
    sink = WebhookSink(fast(receiver.url), "st", box)
    assert sink.failure() is None  # not started: nothing to say
    sink.start()
    # a record http.client refuses to send (a newline in its Idempotency-Key): the sender's work raises
    box.add_event("cam0", lambda seq: {"event_id": "e1\nX-Injected: 1", "type": "start", "seq": seq})
    sink.wake()
    time.sleep(0.5)  # retried every retry_min_s (0.05 s)
    try:
        assert sink._sender.is_alive() and sink.failure() is None
        lines = [r.getMessage() for r in caplog.records if "sending from the outbox failed" in r.getMessage()]
        assert len(lines) == 1, lines  # once per cause, however often it is retried
        assert not receiver.posts
    finally:
        sink.stop()
        box.close()


# -- a real station with both sinks ---------------------------------------------------------------
def station_yaml(tmp_path: Path, name: str, video: Path, hook_url: str, flush_s: float) -> Path:
    path = tmp_path / f"{name}-{flush_s:g}.yaml"
    path.write_text(f"""station: st-hook
state_dir: {tmp_path / 'state'}
sinks: [mqtt, webhook]
engine: {{max_batch: 4, max_wait_ms: 5}}
cameras:
  - id: cam0
    source: {video}
    live: true
    max_fps: 20
    reopen_initial_s: 0.05
    reopen_max_s: 0.05
events: {{k: 3, n: 5, close_after: 5, update_interval_s: 0.3, cooldown_s: 0.5}}
mqtt: {{stats_interval_s: 0.3, flush_timeout_s: 15, reconnect_max_s: 1}}
webhook: {{url: '{hook_url}', retry_min_s: 0.1, retry_max_s: 0.5, timeout_s: 2, flush_timeout_s: {flush_s}}}
""", encoding="utf-8")
    return path


def keys(events: list[dict[str, Any]]) -> list[tuple[str, str, int]]:
    """What a subscriber keeps: each (event_id, type, seq) once, in arrival order."""
    out: list[tuple[str, str, int]] = []
    for e in events:
        k = (e["event_id"], e["type"], e["seq"])
        if k not in out:
            out.append(k)
    return out


def test_a_station_with_mqtt_and_webhook_delivers_every_event_to_both_across_an_outage_and_a_restart(
        tmp_path: Path, mosquitto: str, toy_bundle: Path, receiver: Receiver) -> None:
    video = write_video(tmp_path / "loop.avi", [(5, 15), (25, 35)], 40, fps=FPS)  # looped: events keep coming
    tries: dict[str, int] = {}

    def flaky(post: Post) -> int:  # every third event's first copy is taken, then answered 503: a duplicate follows
        tries[post.key] = tries.get(post.key, 0) + 1
        return 503 if tries[post.key] == 1 and len(tries) % 3 == 0 else 200

    receiver.answer = flaky
    live = station_yaml(tmp_path, "live", video, receiver.url, flush_s=15)
    with Collector(mosquitto, ["anomaly/st-hook/#"]) as col:
        # Run 1, live: the receiver goes away while events happen, and comes back.
        proc = subprocess.Popen([*cli_command("edge-run"), "--config", live, "--engine", toy_bundle,
                                 "--mqtt", mosquitto],
                                cwd=tmp_path, stderr=subprocess.PIPE, text=True)
        try:
            assert receiver.wait_for(lambda ps: len({p.key for p in ps}) >= 3, timeout=40), "no events posted"
            receiver.stop()
            during = len(col.events())
            assert col.wait_for(lambda ms: len([m for m in ms if m.topic.endswith("/event")]) >= during + 4,
                                timeout=30), "no events while the webhook's receiver was down"
            time.sleep(1.0)  # MQTT delivers meanwhile; the webhook's tries meet a closed port
            receiver.start()
            assert receiver.wait_for(lambda ps: len({p.key for p in ps}) >= during + 4, timeout=30), \
                "the events held during the outage never arrived"
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, err
        assert "Traceback" not in err and "webhook http://127.0.0.1" in err and "answers again after" in err, err

        # Run 2, a recording, with the receiver down: MQTT delivers, the webhook's events stay in the spool.
        receiver.stop()
        clip = write_video(tmp_path / "clip.avi", [(10, 20)], 30, fps=FPS)
        quick = station_yaml(tmp_path, "quick", video, receiver.url, flush_s=1)
        run2 = run_cli("edge-run", ["--config", quick, "--camera", clip, "--engine", toy_bundle, "--mqtt", mosquitto],
                       cwd=tmp_path)
        assert run2.returncode == 3, run2.stderr  # as for MQTT: events not delivered before the flush timeout
        [line] = [ln for ln in run2.stderr.splitlines() if "not acknowledged" in ln]
        assert "by webhook http://127.0.0.1" in line and "mqtt://" not in line, line
        held = len(keys(col.events())) - len({p.key for p in receiver.delivered()})
        assert held >= 2

        # Run 3, receiver back: the held events are delivered first, then this run's.
        receiver.start()
        before = len(receiver.posts)
        clean = write_video(tmp_path / "clean.avi", [], 10, fps=FPS)
        run3 = run_cli("edge-run", ["--config", quick, "--camera", clean, "--engine", toy_bundle, "--mqtt", mosquitto],
                       cwd=tmp_path)
        assert run3.returncode == 0, run3.stderr
        assert col.wait_for(lambda ms: sum(m.topic.endswith("/status") and m.payload == b"stopped" and not m.retain
                                           for m in ms) >= 3, timeout=15)
        mqtt_events = check_payloads(col)["event"]
    after = [p.json() for p in receiver.posts[before:] if 200 <= p.status < 300]
    assert [e["seq"] for e in after[:held]] == sorted(e["seq"] for e in after[:held])
    assert {e["seq"] for e in after[:held]} == {s for _, _, s in keys(mqtt_events)[-held:]}

    posted = [p.json() for p in receiver.delivered()]
    for e in posted:
        validate("event", e)  # the webhook's body is the MQTT event payload, unchanged
    assert keys(posted) == keys(mqtt_events)  # the same events, each once, in the same (seq) order
    seqs = [s for _, _, s in keys(posted)]
    assert seqs == list(range(1, len(seqs) + 1)), seqs  # none lost
    assert len(receiver.posts) > len({p.key for p in receiver.posts})  # duplicates arrived and were folded
    assert {e["type"] for e in posted} >= {"start", "update", "end"}
