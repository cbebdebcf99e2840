"""On-site calibration (``edge-run --calibrate N``): the station's own threshold from frames of its own stream.

The headline test is the problem it solves: a bundle trained on lossless PNG stills, run on an MJPEG clip of the
same kind of parts, fires in clean stretches with its own threshold; calibrated on a good MJPEG clip, the same
station opens one event in each defect stretch and none elsewhere. The others pin the rules around it: the same
threshold rule as the trainer, the state file (bundle version, atomic, one-line errors), which threshold wins,
and a hot swap clearing a calibration that no longer applies.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from edge_helpers import (
    Collector,
    assert_one_line_error,
    check_events,
    check_payloads,
    cli_command,
    make_toy_bundle,
    run_cli,
    toy_model,
    wait_stopped,
    write_lit_video,
)

from core import thresholds
from core.bundle import Bundle, load_bundle, new_version_dir, write_manifest
from core.errors import UserError
from core.site_calibration import SiteCalibration, calibration_path, load_site_calibration
from core.thresholds import Policy, quantile_threshold, rate_threshold, recall_threshold
from edge import calibration as edge_calibration
from edge.backends import create_backend
from edge.batchsize import BatchSize
from edge.calibration import SiteThreshold, choose_threshold, save_site_calibration, site_calibration
from edge.config import CameraConfig, StationConfig
from edge.outbox import open_outbox
from edge.pipeline import RunResult, Station
from edge.stats import StationStats
from trainer import calibrate as trainer_calibrate
from trainer.synthetic import make_dataset, write_clip

SIZE = (240, 320)
DEFECTS = [(40, 70), (110, 140)]
N_FRAMES = 170


def station_yaml(tmp_path: Path, station: str, extra: str = "", file_name: str = "") -> Path:
    path = tmp_path / f"{file_name or station}.yaml"
    path.write_text(f"station: {station}\nstate_dir: {tmp_path / 'state'}\nmqtt:\n  stats_interval_s: 0.2\n{extra}",
                    encoding="utf-8")
    return path


def stream(mosquitto: str, station: str, args: list) -> tuple[subprocess.CompletedProcess, dict]:
    """edge-run to the end of its clip; its exit, stderr and every payload it published (schema-checked)."""
    with Collector(mosquitto, [f"anomaly/{station}/#"]) as col:
        proc = run_cli("edge-run", [*args, "--mqtt", mosquitto], timeout=240)
        assert "Traceback" not in proc.stderr, proc.stderr
        if proc.returncode == 0:
            wait_stopped(col)
        return proc, check_payloads(col)


def startup_line(stderr: str) -> str:
    return next(ln for ln in stderr.splitlines() if "station '" in ln and "camera(s), model" in ln)


# -- the rule and the state file ------------------------------------------------------------------------
def test_station_and_trainer_share_one_threshold_rule(toy_bundle: Path) -> None:
    assert trainer_calibrate.quantile_threshold is thresholds.quantile_threshold
    assert edge_calibration.normal_calibration is thresholds.normal_calibration
    scores = np.random.default_rng(3).normal(20.0, 1.5, 400)
    bundle = load_bundle(toy_bundle)
    for policy in (Policy(), Policy("false-alarm-rate", 0.05), Policy("quantile")):
        trainer = trainer_calibrate.calibrate(scores, policy)
        assert site_calibration(scores, bundle, policy=policy).threshold == trainer["threshold"]
    assert trainer_calibrate.calibrate(scores, Policy("quantile")) == thresholds.normal_calibration(scores, 0.99, 0.5,
                                                                                                      3.0)


def test_calibration_file_round_trip_and_corrupt_files(tmp_path: Path, toy_bundle: Path) -> None:
    bundle = load_bundle(toy_bundle)
    scores = np.random.default_rng(0).normal(5.0, 0.5, 200)
    cal = site_calibration(scores, bundle, 0.99, 0.5, 3.0)
    assert cal.model_version == bundle.version and cal.frames == 200
    assert cal.threshold >= max(np.quantile(scores, 0.99), scores.mean() + 3 * scores.std())
    path = tmp_path / "st.calibration.json"
    save_site_calibration(path, cal)
    assert load_site_calibration(path) == cal
    assert load_site_calibration(tmp_path / "absent.json") is None
    for text in ("{not json", json.dumps({"format": 1, "model": "toy"}), json.dumps({**json.loads(path.read_text()),
                                                                                      "sigma": "NaN"}), "[]"):
        path.write_text(text)
        with pytest.raises(UserError) as err:
            load_site_calibration(path)
        assert str(path) in str(err.value) and "--calibrate" in str(err.value) and "\n" not in str(err.value)


def test_config_threshold_wins_then_this_versions_calibration_then_the_bundles(toy_bundle: Path) -> None:
    bundle = load_bundle(toy_bundle)
    mine = SiteCalibration("toy", bundle.version, 0.25, 0.07, 0.01, 100, 0.99, 0.5, 3.0, "2026-12-01T20:00:00Z")
    other = SiteCalibration("toy", "19990101T000000Z", 0.3, 0.08, 0.01, 100, 0.99, 0.5, 3.0, "2026-12-01T20:00:00Z")
    c = choose_threshold(bundle, 0.5, mine)
    assert (c.source, c.threshold, c.baseline, c.sigma) == ("config", 0.5, 0.07, 0.01)  # baseline: still on-site
    c = choose_threshold(bundle, None, mine)
    assert (c.source, c.threshold, c.baseline) == ("on-site", 0.25, 0.07) and "100 frames" in c.reason
    c = choose_threshold(bundle, None, other)
    assert (c.source, c.threshold, c.calibration) == ("bundle", bundle.threshold, None)
    assert "19990101T000000Z does not apply" in c.reason
    assert choose_threshold(bundle, None, None).source == "bundle"


# -- through the real edge-run -------------------------------------------------------------------------
def test_calibrate_stores_the_stations_threshold_and_the_next_run_uses_it(tmp_path: Path, mosquitto: str,
                                                                          toy_bundle: Path) -> None:
    clip = write_lit_video(tmp_path / "good.avi", 60, seed=1)
    cfg = station_yaml(tmp_path, "st-cal")
    proc, got = stream(mosquitto, "st-cal", ["--config", cfg, "--camera", clip, "--engine", toy_bundle,
                                             "--calibrate", "40"])
    assert proc.returncode == 0, proc.stderr
    line = startup_line(proc.stderr)
    assert "threshold 0.1 (the bundle's calibration), on-site calibration on the first 40 frames" in line, line
    assert "on-site calibration of toy" in proc.stderr and "in force from now" in proc.stderr
    stored = load_site_calibration(calibration_path(tmp_path / "state", "st-cal"))
    assert stored is not None and stored.model_version == toy_bundle.name and stored.frames == 40
    assert got["event"] == []
    last = got["stats"][-1]["calibration"]
    assert last == {"source": "on-site", "threshold": round(stored.threshold, 6), "baseline": round(stored.baseline, 6),
                    "sigma": round(stored.sigma, 6), "frames": 40, "created": stored.created, "calibrating": False}
    scores = got["stats"][-1]["cameras"]["cam0"]["scores"]
    assert scores["frames"] == 20 and abs(scores["p50"] - stored.baseline) < 3 * stored.sigma

    proc, got = stream(mosquitto, "st-cal", ["--config", cfg, "--camera", clip, "--engine", toy_bundle])
    assert proc.returncode == 0, proc.stderr
    assert f"threshold {stored.threshold:.6g} (on-site calibration of 40 frames" in startup_line(proc.stderr)
    assert got["stats"][-1]["calibration"]["source"] == "on-site"

    high = station_yaml(tmp_path, "st-cal", extra="engine:\n  threshold: 0.9\n", file_name="high")  # still wins
    proc, got = stream(mosquitto, "st-cal", ["--config", high, "--camera", clip, "--engine", toy_bundle])
    assert proc.returncode == 0, proc.stderr
    assert "threshold 0.9 (engine.threshold in the station config)" in startup_line(proc.stderr)
    assert got["stats"][-1]["calibration"]["baseline"] == round(stored.baseline, 6)

    other = make_toy_bundle(tmp_path / "engines")  # another bundle version at start: the calibration is cleared
    proc, got = stream(mosquitto, "st-cal", ["--config", cfg, "--camera", clip, "--engine", other])
    assert proc.returncode == 0, proc.stderr
    assert f"threshold 0.1 (the bundle's calibration; the on-site calibration of toy {toy_bundle.name} does not " \
           "apply to this version and was cleared: re-run --calibrate N" in startup_line(proc.stderr)
    assert not calibration_path(tmp_path / "state", "st-cal").exists()
    assert got["stats"][-1]["calibration"]["source"] == "bundle"


def test_calibration_errors_are_one_line(tmp_path: Path, toy_bundle: Path) -> None:
    clip = write_lit_video(tmp_path / "short.avi", 20)
    state = tmp_path / "state"
    cfg = station_yaml(tmp_path, "st-err", extra="  flush_timeout_s: 0.5\n")
    args = ["--config", cfg, "--camera", clip, "--engine", toy_bundle, "--mqtt", "mqtt://127.0.0.1:1"]
    proc = run_cli("edge-run", [*args, "--calibrate", "50"], timeout=60)
    assert_one_line_error(proc, "edge-run", "calibration incomplete", "20 of the 50 frames")
    assert not calibration_path(state, "st-err").exists()
    calibration_path(state, "st-err").write_text("{\"format\": 1, \"threshold\": ")
    proc = run_cli("edge-run", args, timeout=60)
    assert_one_line_error(proc, "edge-run", "st-err.calibration.json", "not a valid on-site calibration",
                          "--calibrate N")
    proc = run_cli("edge-run", [*args, "--calibrate", "10"], timeout=60)  # re-running it replaces the bad file
    assert proc.returncode in (0, 3), proc.stderr  # 3: events of the calibrated frames wait for a broker
    assert load_site_calibration(calibration_path(state, "st-err")) is not None
    proc = run_cli("edge-run", [*args, "--calibrate", "1"], timeout=60)
    assert_one_line_error(proc, "edge-run", "calibration needs at least 2 frames")


def test_a_promoted_bundle_clears_the_calibration_of_the_old_version(tmp_path: Path, mosquitto: str) -> None:
    engines = tmp_path / "engines"
    first = make_toy_bundle(engines)
    clip = write_lit_video(tmp_path / "long.avi", 8000)  # long enough that the swap lands inside the stream
    cfg = station_yaml(tmp_path, "st-cal-swap", extra=f"engine:\n  engines_dir: {engines}\n  max_batch: 1\n"
                                                      "  watch_interval_s: 0.2\n")
    stored_at = calibration_path(tmp_path / "state", "st-cal-swap")
    with Collector(mosquitto, ["anomaly/st-cal-swap/#"]) as col:
        proc = subprocess.Popen([*cli_command("edge-run"), "--config", cfg, "--camera", clip, "--engine", "toy",
                                 "--mqtt", mosquitto, "--calibrate", "30"], stderr=subprocess.PIPE, text=True)
        try:
            assert col.wait_for(lambda ms: any(json.loads(m.payload)["calibration"]["source"] == "on-site"
                                               for m in col.on("/stats")), timeout=60)
            stored = load_site_calibration(stored_at)
            assert stored is not None and stored.model_version == first.name
            time.sleep(0.01)
            second = make_toy_bundle(engines, threshold=0.2)
            assert col.wait_for(lambda ms: any(json.loads(m.payload)["model_version"] == second.name
                                               for m in col.on("/stats")), timeout=60)
            proc.send_signal(signal.SIGTERM)  # swapped: the rest of the clip is not needed
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, err
        wait_stopped(col)
        got = check_payloads(col)
    swapped = next(ln for ln in err.splitlines() if "model swapped" in ln)
    assert f"-> toy {second.name}, threshold 0.2 (the bundle's calibration; the on-site calibration of toy " \
           f"{first.name} does not apply to this version and was cleared" in swapped, swapped
    assert not stored_at.exists()
    last = got["stats"][-1]
    assert last["model_version"] == second.name and last["calibration"]["source"] == "bundle"
    assert last["calibration"]["threshold"] == 0.2 and last["calibration"]["frames"] is None


# -- the problem it solves: stills-trained bundle, MJPEG stream -------------------------------------------
@pytest.fixture(scope="module")
def stills_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PatchCore trained and calibrated on lossless PNG stills of generated parts, without codec-robust training
    (``codec_augment`` off: a bundle from before it, or one a user fitted with it off). tests/test_codec_robust.py
    shows the trainer-side remedy; this file the station's."""
    root = tmp_path_factory.mktemp("stills")
    data = make_dataset(root / "data", n_train=40, n_test_good=8, n_test_defect=8, size=SIZE, seed=11)
    config = root / "train.yaml"
    config.write_text("codec_augment:\n  enabled: false\n")
    proc = subprocess.run([sys.executable, "-m", "trainer.cli", "fit", "--data", str(data), "--config", str(config),
                           "--out", str(root / "engines")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return Path(proc.stdout.strip().splitlines()[-1])


def test_on_site_calibration_makes_a_stills_trained_bundle_work_on_an_mjpeg_stream(
        tmp_path: Path, mosquitto: str, stills_bundle: Path) -> None:
    line = write_clip(tmp_path / "line.avi", SIZE, N_FRAMES, DEFECTS, seed=5, codec="MJPG")
    good = write_clip(tmp_path / "good.avi", SIZE, 100, [], seed=21, codec="MJPG")  # the operator's good parts
    cfg = station_yaml(tmp_path, "st-mjpeg", extra="engine:\n  auto_batch: false\n")  # no batch timing per run
    run = ["--config", cfg, "--engine", stills_bundle]

    proc, before = stream(mosquitto, "st-mjpeg", [*run, "--camera", line])  # the bundle's own threshold
    assert proc.returncode == 0, proc.stderr
    starts = [e for e in before["event"] if e["type"] == "start"]
    false_alarms = [e for e in starts if not any(a <= e["frame"] < b for a, b in DEFECTS)]
    assert false_alarms, f"the stills' threshold no longer fails on MJPEG; this test proves nothing: {starts}"
    with pytest.raises(AssertionError):
        check_events(before["event"], DEFECTS, "cam0")

    proc, _ = stream(mosquitto, "st-mjpeg", [*run, "--camera", good, "--calibrate", "100"])
    assert proc.returncode == 0, proc.stderr
    stored = load_site_calibration(calibration_path(tmp_path / "state", "st-mjpeg"))
    assert stored is not None and stored.model_version == stills_bundle.name
    assert stored.threshold > load_bundle(stills_bundle).threshold  # MJPEG raised good parts' scores

    proc, after = stream(mosquitto, "st-mjpeg", [*run, "--camera", line])
    assert proc.returncode == 0, proc.stderr
    check_events(after["event"], DEFECTS, "cam0")  # one event in each defect stretch, none in clean ones
    assert {e["threshold"] for e in after["event"]} == {stored.threshold}
    assert after["stats"][-1]["calibration"]["source"] == "on-site"
    trained = load_bundle(stills_bundle).manifest["calibration"]
    ends = [(e["frame"], e["reason"]) for e in before["event"] if e["type"] == "end"]
    print(f"\nstills: threshold {trained['threshold']:.4g}, good median {trained['normal_median']:.4g}, "
          f"σ {trained['normal_std']:.3g}; MJPEG good frames: median {stored.baseline:.4g} "
          f"({(stored.baseline - trained['normal_median']) / trained['normal_std']:+.1f} σ), σ {stored.sigma:.3g}, "
          f"on-site threshold {stored.threshold:.4g}; events without it: starts {[e['frame'] for e in starts]}, "
          f"ends {ends}; with it: starts {[e['frame'] for e in after['event'] if e['type'] == 'start']}")


# -- the first minutes on a new station (issue 21, item H) ----------------------------------------------
def uncalibrated_warnings(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if "WARNING" in ln and "no on-site calibration for toy" in ln]


def test_a_version_without_on_site_calibration_is_said_loudly_at_start(tmp_path: Path, mosquitto: str,
                                                                       toy_bundle: Path) -> None:
    clip = write_lit_video(tmp_path / "good.avi", 30, seed=2)
    cfg = station_yaml(tmp_path, "st-loud")
    args = ["--config", cfg, "--camera", clip, "--engine", toy_bundle]
    proc, _ = stream(mosquitto, "st-loud", args)
    assert proc.returncode == 0, proc.stderr
    lines = uncalibrated_warnings(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert toy_bundle.name in lines[0] and "edge-run --calibrate N" in lines[0] and "warm_up_frames" in lines[0]
    proc, _ = stream(mosquitto, "st-loud", [*args, "--calibrate", "20"])  # being calibrated: nothing to warn about
    assert proc.returncode == 0 and uncalibrated_warnings(proc.stderr) == [], proc.stderr
    proc, _ = stream(mosquitto, "st-loud", args)  # calibrated on site now
    assert proc.returncode == 0 and uncalibrated_warnings(proc.stderr) == [], proc.stderr
    high = station_yaml(tmp_path, "st-loud2", extra="engine:\n  threshold: 0.9\n")  # the operator chose a threshold
    proc, _ = stream(mosquitto, "st-loud2", ["--config", high, "--camera", clip, "--engine", toy_bundle])
    assert proc.returncode == 0 and uncalibrated_warnings(proc.stderr) == [], proc.stderr


def run_in_process(tmp_path: Path, bundle_dir: Path, clip: Path, warm_up_frames: int) -> tuple[Station, RunResult]:
    """The station as edge/assembly.py builds it (real ONNX Runtime, real outbox, the real clip), with no sink:
    the events stay in the outbox, counted in the result."""
    cfg = StationConfig(station="st-warm", state_dir=str(tmp_path / "state"),
                        cameras=[CameraConfig(id="cam0", source=str(clip))])
    cfg.calibration.warm_up_frames = warm_up_frames
    cfg.validate()
    bundle = load_bundle(bundle_dir)
    c = cfg.calibration
    site = SiteThreshold(calibration_path(cfg.state_dir, cfg.station), cfg.engine.threshold, c.quantile, c.margin,
                         c.sigmas, warm_up_frames=c.warm_up_frames)
    batch = BatchSize(1)
    backend = create_backend("onnxruntime", bundle, max_batch=1)
    outbox = open_outbox(cfg.state_dir, cfg.station, cfg.sinks, cfg.spool.max_bytes, cfg.spool.max_age_s)
    try:
        station = Station(cfg, bundle, backend, outbox, [], site, batch,
                          StationStats(cfg.station, backend.name, bundle.model_name, bundle.version, batch))
        station.open_cameras()
        site.tell()  # as build_station does once the station has started
        return station, station.run()
    finally:
        backend.close()
        outbox.close()


def event_starts(caplog: pytest.LogCaptureFixture) -> list[int]:
    """The frames at which the station's log says an event started."""
    found = (re.match(r"event start camera 'cam0' seq \d+ frame (\d+)", r.getMessage()) for r in caplog.records)
    return [int(m.group(1)) for m in found if m]


def test_warm_up_frames_calibrate_a_new_station_on_its_first_frames_by_itself(tmp_path: Path,
                                                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    # Calibrated on the trainer's images at 0.05, while this camera's good parts score about 0.08.
    bundle_dir = make_toy_bundle(tmp_path / "engines", threshold=0.05)
    clip = write_lit_video(tmp_path / "line.avi", 200, lit=[(150, 175, 90)], seed=4)  # the light fails at 150
    station, cold = run_in_process(tmp_path / "cold", bundle_dir, clip, 0)
    assert station.choice.source == "bundle" and event_starts(caplog)[0] < 10  # a false event at once
    caplog.clear()
    station, warm = run_in_process(tmp_path / "warm", bundle_dir, clip, 60)
    assert "warming up, the first 60 frames" in caplog.text
    stored = load_site_calibration(calibration_path(tmp_path / "warm" / "state", "st-warm"))
    assert stored is not None and stored.frames == 60 and stored.model_version == bundle_dir.name
    assert station.choice.source == "on-site" and station.threshold == stored.threshold > 0.05
    assert warm.frames == 200 and warm.events == 2  # the lit stretch's start and end, nothing else
    assert [150 <= f < 175 for f in event_starts(caplog)] == [True]
    caplog.clear()
    station, again = run_in_process(tmp_path / "warm", bundle_dir, clip, 60)  # the next run of that version
    assert "warming up" not in caplog.text and station.choice.source == "on-site" and again.events == 2


def test_warm_up_starts_again_for_a_swapped_in_version_and_not_for_the_operators_calibration(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = load_bundle(make_toy_bundle(tmp_path / "engines"))
    second = load_bundle(make_toy_bundle(tmp_path / "engines"))
    site = SiteThreshold(tmp_path / "cal.json", None, 0.99, 0.5, 3.0, warm_up_frames=4)
    assert site.choose(first).source == "bundle" and site.calibrating and site.warming_up
    assert "warm-up calibration on the first 4 frames" in site.startup_text(site.choose(first))
    for score in (0.07, 0.08, 0.09):
        assert site.add(score, first) is None
    assert site.swapped(second).source == "bundle" and site.calibrating  # the new version warms up from scratch
    assert site.calibrator is not None and site.calibrator.scores == []
    for score in (0.07, 0.08, 0.09):
        site.add(score, second)
    choice = site.add(0.08, second)
    assert choice is not None and choice.source == "on-site" and not site.calibrating and not site.warming_up
    operator = SiteThreshold(tmp_path / "op.json", None, 0.99, 0.5, 3.0, calibrate_frames=10, warm_up_frames=4)
    operator.choose(first)
    assert operator.calibrating and not operator.warming_up and operator.calibrator is not None
    assert operator.calibrator.frames == 10  # --calibrate N wins over the warm-up
    with pytest.raises(UserError, match="warm_up_frames 1"):
        SiteThreshold(tmp_path / "x.json", None, 0.99, 0.5, 3.0, warm_up_frames=1)


def test_edge_run_warms_up_by_itself_when_the_config_asks(tmp_path: Path, mosquitto: str) -> None:
    """calibration.warm_up_frames through the real edge-run: the false events of a cold start (good parts score
    0.08 against the trainer's 0.05) do not happen; the first 60 frames set the threshold, stored for the version."""
    bundle_dir = make_toy_bundle(tmp_path / "engines", threshold=0.05)
    clip = write_lit_video(tmp_path / "line.avi", 200, lit=[(150, 175, 90)], seed=4)
    config = station_yaml(tmp_path, "st-warm-run", "calibration:\n  warm_up_frames: 60\n")
    proc, got = stream(mosquitto, "st-warm-run", ["--config", str(config), "--engine", str(bundle_dir),
                                                  "--camera", str(clip)])
    assert proc.returncode == 0, proc.stderr
    assert "warming up, the first 60 frames" in proc.stderr
    starts = [e["frame"] for e in got["event"] if e["type"] == "start"]
    assert starts and all(frame >= 150 for frame in starts), starts
    stored = load_site_calibration(calibration_path(tmp_path / "state", "st-warm-run"))
    assert stored is not None and stored.frames == 60 and stored.model_version == bundle_dir.name


# -- the calibration policy on site (issue 22, part 3) --------------------------------------------------
def policy_bundle(engines: Path, calibration: dict) -> Path:
    """A toy bundle (real ONNX graph) whose manifest records the trainer's calibration policy."""
    bundle_dir = new_version_dir(engines, "toy")
    onnx.save(toy_model((32, 32)), str(bundle_dir / "model.onnx"))
    write_manifest(bundle_dir, model_name="toy", input_spec={"height": 32, "width": 32},
                   outputs=[{"name": "score", "dtype": "float32", "shape": ["N"]},
                            {"name": "anomaly_map", "dtype": "float32", "shape": ["N", 32, 32]}],
                   calibration={"threshold": 0.1, "method": calibration["policy"], **calibration},
                   training_data={"count": 0, "hash": "none"}, metrics={})
    return bundle_dir


def label_defects(collect: Path, bundle: Bundle, scores: list, kind: str = "scratch") -> None:
    """Frames of events an operator labelled as defects, as edge/labels.py leaves them: test/<kind>/ with each
    frame's sidecar (the peak frame's score is the event's); a non-peak frame and another version's peak beside."""
    folder = collect / "test" / kind
    folder.mkdir(parents=True, exist_ok=True)
    for i, score in enumerate(scores):
        for peak, version, s in ((True, bundle.version, score), (False, bundle.version, 0.0),
                                 (True, "19990101T000000Z", 0.0)):
            name = f"20261207T000000.{i:03d}_cam0_{i}_{int(peak)}_{version[:4]}"
            (folder / f"{name}.png").write_bytes(b"")
            (folder / f"{name}.json").write_text(json.dumps(
                {"score": s, "model": "toy", "model_version": version, "kind": "event", "peak": peak,
                 "event_id": f"e{i}"}), encoding="utf-8")


def calibrate_on(site: SiteThreshold, bundle: Bundle, scores: np.ndarray) -> SiteCalibration:
    """Feed ``scores`` as the operator's good frames; the stored calibration."""
    site.choose(bundle)
    for s in scores:
        site.add(float(s), bundle)
    assert not site.calibrating and site.stored is not None
    return site.stored


def test_on_site_calibration_applies_the_bundles_policy(tmp_path: Path, toy_bundle: Path) -> None:
    good = np.random.default_rng(7).normal(0.08, 0.01, 50)
    five = load_bundle(policy_bundle(tmp_path / "engines", {"policy": "false-alarm-rate",
                                                           "target_false_alarm_rate": 0.05}))
    cal = calibrate_on(SiteThreshold(tmp_path / "a.calibration.json", None, calibrate_frames=50), five, good)
    assert (cal.policy, cal.target, cal.defects) == ("false-alarm-rate", 0.05, 0)
    assert cal.threshold == rate_threshold(good, 0.05)[0] and cal.expected_false_alarm_rate == pytest.approx(0.05)
    assert load_site_calibration(tmp_path / "a.calibration.json") == cal
    # a bundle from before policies: the default policy, a 1 % false-alarm rate
    old = calibrate_on(SiteThreshold(tmp_path / "b.calibration.json", None, calibrate_frames=50),
                       load_bundle(toy_bundle), good)
    assert old.policy == "false-alarm-rate" and old.threshold == rate_threshold(good, 0.01)[0] > cal.threshold
    # a station config that sets the quantile rule's keys keeps the rule it had
    rule = calibrate_on(SiteThreshold(tmp_path / "c.calibration.json", None, 0.99, 0.5, 3.0, calibrate_frames=50),
                        five, good)
    assert rule.policy == "quantile" and rule.threshold == quantile_threshold(good, 0.99, 0.5, 3.0)


def test_on_site_recall_policy_uses_the_defects_operators_labelled(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    bundle = load_bundle(policy_bundle(tmp_path / "engines", {"policy": "recall", "target_recall": 0.8}))
    good = np.random.default_rng(8).normal(0.08, 0.01, 40)
    defects = [0.09, 0.2, 0.3, 0.4, 0.5]
    collect = tmp_path / "collect" / "st"
    label_defects(collect, bundle, defects)
    cal = calibrate_on(SiteThreshold(tmp_path / "st.calibration.json", None, calibrate_frames=40), bundle, good)
    assert (cal.policy, cal.target, cal.defects) == ("recall", 0.8, 5)  # peaks of this version only
    assert cal.threshold == recall_threshold(good, np.array(defects), 0.8) and 0.09 < cal.threshold < 0.2
    assert cal.expected_recall == 0.8 and "policy recall" in caplog.text

    caplog.clear()  # nothing labelled: the false-alarm-rate target on the good frames, said loudly
    bare = calibrate_on(SiteThreshold(tmp_path / "bare.calibration.json", None, calibrate_frames=40), bundle, good)
    assert bare.policy == "false-alarm-rate" and bare.threshold == rate_threshold(good, 0.01)[0]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("operators have labelled none of toy" in m and "edge-run label" in m for m in warned), warned


def test_on_site_calibration_warns_when_most_labelled_defects_fall_below(tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    bundle = load_bundle(policy_bundle(tmp_path / "engines", {"policy": "false-alarm-rate",
                                                             "target_false_alarm_rate": 0.01}))
    good = np.random.default_rng(9).normal(0.08, 0.01, 40)
    label_defects(tmp_path / "collect" / "st", bundle, [0.085, 0.09, 0.095, 0.5])  # 3 of 4 among good parts
    cal = calibrate_on(SiteThreshold(tmp_path / "st.calibration.json", None, calibrate_frames=40), bundle, good)
    assert cal.defects == 4 and cal.expected_recall == 0.25
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith("WARNING: 3 of the 4 defects operators labelled") for m in warned), warned


def test_edge_run_calibrates_by_the_bundles_policy_with_the_stations_labels(tmp_path: Path, mosquitto: str) -> None:
    """Through the real edge-run: a bundle fitted with policy best-f1, a station whose operators labelled
    defects of it (in the default collection folder): --calibrate N uses them, the log and the stored file say so."""
    bundle_dir = policy_bundle(tmp_path / "engines", {"policy": "best-f1"})
    label_defects(tmp_path / "state" / "collect" / "st-policy", load_bundle(bundle_dir), [0.3, 0.35, 0.4])
    clip = write_lit_video(tmp_path / "good.avi", 40, seed=3)
    cfg = station_yaml(tmp_path, "st-policy")
    proc, got = stream(mosquitto, "st-policy", ["--config", cfg, "--camera", clip, "--engine", bundle_dir,
                                                "--calibrate", "40"])
    assert proc.returncode == 0, proc.stderr
    stored = load_site_calibration(calibration_path(tmp_path / "state", "st-policy"))
    assert stored is not None and (stored.policy, stored.defects, stored.expected_recall) == ("best-f1", 3, 1.0)
    assert "by policy best-f1" in proc.stderr and "expected recall 100.0% of 3 labelled defects" in proc.stderr
    assert stored.baseline < stored.threshold < 0.3 and got["stats"][-1]["calibration"]["source"] == "on-site"
