"""edge-train retrain / promote / rollback on a station's collected frames, through the real CLI.

The champion is fitted on a dozen PNG stills with codec augmentation off, so a station's MJPEG frames of good
parts cross its threshold; the station's collected frames (decoded from an MJPEG clip, written in the
collection layout with sidecars) teach a challenger what the station sees. A challenger fitted on frames that
carry defects is refused on a labelled hold-out; rollback walks back through the promotions.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from edge_helpers import assert_one_line_error, make_toy_bundle, run_cli, write_labelled_holdout, write_station_frames

from core.bundle import load_bundle, promotion_history, read_current
from trainer.retrain import drop_near_duplicates, retrain_lock, thumbnail
from trainer.synthetic import make_dataset, render_frame, write_clip

SIZE = (240, 320)


@pytest.fixture(scope="module")
def champion(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("retrain")
    data = make_dataset(root / "stills", n_train=12, n_test_good=0, n_test_defect=0, size=SIZE, seed=21)
    cfg = root / "train.yaml"
    cfg.write_text("codec_augment:\n  enabled: false\n")
    proc = subprocess.run([sys.executable, "-m", "trainer.cli", "fit", "--data", str(data), "--config", str(cfg),
                           "--out", str(root / "engines")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return root, Path(proc.stdout.strip().splitlines()[-1])


def test_retrain_promotes_a_better_challenger_refuses_a_worse_one_and_rollback_walks_back(
        champion: tuple[Path, Path], tmp_path: Path) -> None:
    root, champ_dir = champion
    model_dir = champ_dir.parent
    good_clip = write_clip(tmp_path / "good.avi", SIZE, 48, [], fps=10.0, seed=31, codec="MJPG")
    station = tmp_path / "station"
    write_station_frames(station, good_clip, still_every=4)

    # 1. a challenger that learnt the station's frames: fewer false alarms on its fresh frames -> promoted
    proc = run_cli("edge-train", ["retrain", "--station-data", station, "--current", model_dir, "--json"],
                   timeout=300)
    assert proc.returncode == 0, proc.stderr
    first = json.loads(proc.stdout.strip().splitlines()[-1])
    assert first["promoted"], first["decision"]
    assert first["champion"] == champ_dir.name and read_current(model_dir) == first["challenger"]
    d = first["data"]
    assert "planted" in first["holdout"]  # no labelled defects: synthetic ones in the fresh frames
    assert (d["collected"], d["near_duplicates"], d["champion_images"]) == (60, 12, 12)  # 12 parts stood still
    assert d["held_out"] == 12 and d["trained_on"] == 36  # the newest 25 % of the 48 distinct frames
    comparison = json.loads((Path(first["folder"]) / "comparison.json").read_text())
    champ, chall = comparison["scores"]["champion"], comparison["scores"]["challenger"]
    assert chall["false_alarm_rate"] < champ["false_alarm_rate"]  # the stills-only champion fires on MJPEG parts
    assert comparison["plots"] == ["comparison_scores.png", "comparison_roc.png"]  # planted defects: a ROC too
    for png in comparison["plots"]:
        assert cv2.imread(str(Path(first["folder"]) / png)) is not None
    load_bundle(model_dir)  # what a station follows: current verifies

    # 2. the same inputs again: nothing new, no third bundle
    versions = sorted(d.name for d in model_dir.iterdir() if (d / "manifest.json").is_file())
    again = run_cli("edge-train", ["retrain", "--station-data", station, "--current", model_dir], timeout=120)
    assert again.returncode == 0 and "nothing new" in again.stderr, again.stderr
    # what a nightly log shows for a run that trained nothing: not the earlier decision as if made again
    said = again.stdout.strip()
    assert said.startswith("nothing new since the retrain of ") and not said.startswith(("promoted", "refused"))
    assert f"{load_bundle(model_dir).version} stays current" in said, said
    assert sorted(d.name for d in model_dir.iterdir() if (d / "manifest.json").is_file()) == versions

    # 3. "normals" collected during a bad batch (every part defective), judged on a labelled hold-out: the
    # challenger learnt defects as normal and misses them -> refused, current stays
    bad_clip = write_clip(tmp_path / "bad.avi", SIZE, 40, [(0, 40)], fps=10.0, seed=41, codec="MJPG")
    bad_station = tmp_path / "bad-station"
    write_station_frames(bad_station, bad_clip)
    holdout = write_labelled_holdout(tmp_path / "holdout", write_clip(tmp_path / "hold.avi", SIZE, 40, [(10, 30)],
                                                                  fps=10.0, seed=51, codec="MJPG"), [(10, 30)])
    current_before = read_current(model_dir)
    proc = run_cli("edge-train", ["retrain", "--station-data", bad_station, "--current", model_dir,
                                  "--holdout", holdout, "--json"], timeout=300)
    assert proc.returncode == 0, proc.stderr
    refused = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not refused["promoted"] and refused["decision"].startswith("refused"), refused["decision"]
    assert read_current(model_dir) == current_before
    assert (model_dir / refused["challenger"] / "manifest.json").is_file()  # kept for inspection, not current

    # 4. rollback: back to the stills-only champion; a second rollback has nowhere to go
    proc = run_cli("edge-train", ["rollback", model_dir])
    assert proc.returncode == 0, proc.stderr
    assert read_current(model_dir) == champ_dir.name
    assert promotion_history(model_dir) == [champ_dir.name]
    proc = run_cli("edge-train", ["rollback", model_dir])
    assert proc.returncode == 2 and "no version promoted before" in proc.stderr
    proc = run_cli("edge-train", ["promote", model_dir / first["challenger"]])
    assert proc.returncode == 0 and read_current(model_dir) == first["challenger"]


def test_a_second_retrain_of_the_same_model_is_refused_while_one_runs(champion: tuple[Path, Path],
                                                                      tmp_path: Path) -> None:
    _, champ_dir = champion
    station = tmp_path / "station"
    (station / "train" / "good").mkdir(parents=True)
    with retrain_lock(champ_dir.parent):
        proc = run_cli("edge-train", ["retrain", "--station-data", station, "--current", champ_dir])
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "another retrain of this model is running" in proc.stderr


def test_a_failing_retrain_leaves_current_untouched(champion: tuple[Path, Path], tmp_path: Path) -> None:
    _, champ_dir = champion
    model_dir = champ_dir.parent
    before = read_current(model_dir)
    station = tmp_path / "station"
    rng = np.random.default_rng(0)
    for i in range(8):
        path = station / "train" / "good" / f"20261201T1300{i:02d}.000_cam0_{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), render_frame(rng, SIZE, False))
    (station / "train" / "good" / "20261201T130009.000_cam0_9.png").write_bytes(b"not a png")  # a torn write
    proc = run_cli("edge-train", ["retrain", "--station-data", station, "--current", model_dir], timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 or "error:" in proc.stderr.strip().splitlines()[-1]
    assert "cannot read this image" in proc.stderr and "Traceback" not in proc.stderr
    assert read_current(model_dir) == before


def test_near_duplicates_are_dropped_and_distinct_frames_kept(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    a, b = render_frame(rng, SIZE, False), render_frame(rng, SIZE, False)
    noisy = np.clip(a.astype(int) + rng.integers(-2, 3, a.shape), 0, 255).astype(np.uint8)
    paths = []
    for name, img in (("a", a), ("a_again", noisy), ("b", b)):
        paths.append(tmp_path / f"{name}.png")
        cv2.imwrite(str(paths[-1]), img)
    assert np.abs(thumbnail(a) - thumbnail(noisy)).mean() < 0.5 < np.abs(thumbnail(a) - thumbnail(b)).mean()
    assert drop_near_duplicates(paths, 1.5) == [paths[0], paths[2]]
    assert drop_near_duplicates(paths, 0.0) == paths  # 0: exact duplicates only


def test_the_nightly_units_run_a_retrain_command_the_cli_accepts() -> None:
    import configparser
    import shlex

    from trainer.cli import _parser

    deploy = Path(__file__).resolve().parents[1] / "deploy"
    units = {}
    for name in ("edge-retrain.service", "edge-retrain.timer"):
        unit = configparser.ConfigParser(strict=False, interpolation=None)
        unit.optionxform = str  # type: ignore[assignment,method-assign]
        unit.read(deploy / name)
        units[name] = unit
    service = units["edge-retrain.service"]["Service"]
    assert service["Type"] == "oneshot"
    argv = shlex.split(service["ExecStart"])
    assert argv[0].endswith("/edge-train")
    args = _parser().parse_args(argv[1:])  # the unit's command line is one this CLI takes
    assert args.command == "retrain" and args.station_data and args.current
    timer = units["edge-retrain.timer"]["Timer"]
    assert timer["OnCalendar"] and timer["Persistent"] == "true"


def test_promote_refuses_a_bundle_of_another_model_with_one_line(tmp_path: Path) -> None:
    """A bundle of model B copied into model A's folder never becomes A's current (issue 21 C)."""
    engines = tmp_path / "engines"
    mine = make_toy_bundle(engines, "toy-a")  # promoted: toy-a's current
    other = make_toy_bundle(engines, "toy-b", promote_it=False)
    stray = engines / "toy-a" / "20990101T000000Z"
    shutil.copytree(other, stray)
    proc = run_cli("edge-train", ["promote", stray])
    assert_one_line_error(proc, "edge-train", str(stray), "toy-b", "toy-a")
    assert read_current(engines / "toy-a") == mine.name
    second = make_toy_bundle(engines, "toy-a", promote_it=False)  # its own model's bundle still promotes
    proc = run_cli("edge-train", ["promote", second])
    assert proc.returncode == 0, proc.stderr
    assert read_current(engines / "toy-a") == second.name


def test_promote_into_a_model_folder_without_a_current_checks_the_other_versions(tmp_path: Path) -> None:
    engines = tmp_path / "engines"
    make_toy_bundle(engines, "toy-a", promote_it=False)
    stray = engines / "toy-a" / "20990101T000000Z"
    shutil.copytree(make_toy_bundle(engines, "toy-b", promote_it=False), stray)
    assert_one_line_error(run_cli("edge-train", ["promote", stray]), "edge-train", "toy-b", "toy-a")
    assert not (engines / "toy-a" / "current").exists()


@pytest.mark.parametrize("command", [["retrain", "--station-data", "{station}", "--current", "{missing}"],
                                     ["eval", "{missing}", "--data", "{station}"],
                                     ["rerun", "{missing}", "--data", "{station}"],
                                     ["check-engine", "{missing}"], ["promote", "{missing}"]])
def test_a_missing_bundle_is_named_with_the_flag_this_command_has(tmp_path: Path, command: list[str]) -> None:
    """No trainer command tells the user to pass --engine, a flag of edge-run only (issue 21 D)."""
    station = tmp_path / "station"
    (station / "train" / "good").mkdir(parents=True)
    missing = tmp_path / "engines" / "nothing"
    args = [a.format(station=station, missing=missing) for a in command]
    line = assert_one_line_error(run_cli("edge-train", args), "edge-train", str(missing), "edge-train fit")
    assert "--engine " not in line, line
    if command[0] == "retrain":
        assert "--current" in line, line


def test_station_data_errors_say_what_is_missing_and_what_to_do(tmp_path: Path) -> None:
    """A missing folder, or a station's state_dir or the folder of all its stations' collections passed for one
    station's collection folder (issue 21 E)."""
    engines = tmp_path / "engines"
    make_toy_bundle(engines, "toy-a")
    missing = tmp_path / "state" / "collect" / "line1"
    line = assert_one_line_error(
        run_cli("edge-train", ["retrain", "--station-data", missing, "--current", engines / "toy-a"]),
        "edge-train", str(missing), "collect")
    assert "edge-run" in line, line  # who fills the folder
    state = tmp_path / "state"
    (state / "collect" / "line1" / "train" / "good").mkdir(parents=True)
    line = assert_one_line_error(
        run_cli("edge-train", ["retrain", "--station-data", state, "--current", engines / "toy-a"]),
        "edge-train", str(state / "collect" / "line1"))
    assert "state_dir" in line, line
    # the folder above the stations' collections (what the deploy samples once named): one station's, please
    line = assert_one_line_error(
        run_cli("edge-train", ["retrain", "--station-data", state / "collect", "--current", engines / "toy-a"]),
        "edge-train", str(state / "collect" / "line1"))
    assert "every station's collection" in line, line


def test_state_dir_errors_say_what_is_missing_and_what_to_do(tmp_path: Path) -> None:
    """--state-dir names a station's state_dir, whose on-site calibration judges the champion (issue 21 E, H)."""
    engines = tmp_path / "engines"
    make_toy_bundle(engines, "toy-a")
    station = tmp_path / "collect"
    (station / "train" / "good").mkdir(parents=True)
    base = ["retrain", "--station-data", station, "--current", engines / "toy-a"]
    line = assert_one_line_error(run_cli("edge-train", [*base, "--state-dir", tmp_path / "state"]), "edge-train",
                                 f"--state-dir {tmp_path / 'state'}: no such folder", "state_dir in station.yaml")
    assert "leave --state-dir out" in line, line
    state = tmp_path / "state"
    state.mkdir()
    for name in ("line1", "line2"):
        (state / f"{name}.calibration.json").write_text("{}")
    assert_one_line_error(run_cli("edge-train", [*base, "--state-dir", state]), "edge-train", "line1, line2",
                          "--station ID")
    assert_one_line_error(run_cli("edge-train", [*base, "--station", "line1"]), "edge-train", "needs --state-dir")
    assert_one_line_error(run_cli("edge-train", [*base, "--state-dir", state, "--station", "line1"]), "edge-train",
                          "line1.calibration.json: not a valid on-site calibration")


def test_retrain_judges_the_champion_at_its_stations_on_site_threshold(champion: tuple[Path, Path],
                                                                       tmp_path: Path) -> None:
    """With --state-dir, the champion's false alarms and misses are counted at the threshold the station calibrated
    it to (edge-run --calibrate), not at the bundle's (issue 21 H)."""
    from core.bundle import promote
    from core.site_calibration import calibration_path
    from edge.calibration import save_site_calibration, site_calibration

    _, champ_dir = champion
    model_dir = tmp_path / "engines" / champ_dir.parent.name
    shutil.copytree(champ_dir, model_dir / champ_dir.name)
    promote(model_dir / champ_dir.name)
    champ = load_bundle(model_dir)
    state = tmp_path / "state"
    state.mkdir()
    cal = site_calibration(np.full(30, champ.threshold * 2.0), champ, quantile=0.99, margin=0.0, sigmas=0.0)
    save_site_calibration(calibration_path(state, "line1"), cal)
    station = tmp_path / "station"
    write_station_frames(station, write_clip(tmp_path / "good.avi", SIZE, 24, [], fps=10.0, seed=32, codec="MJPG"),
                         still_every=4)
    proc = run_cli("edge-train", ["retrain", "--station-data", station, "--current", model_dir, "--state-dir", state,
                                  "--json"], timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "champion at station line1's on-site threshold (on-site calibration of 30 frames" in report["decision"]
    comparison = json.loads((Path(report["folder"]) / "comparison.json").read_text())
    judged = comparison["scores"]["champion"]
    assert judged["threshold"] == pytest.approx(cal.threshold) and judged["threshold_from"].startswith("station line1")
    labels, scores = np.asarray(comparison["labels"]), np.asarray(judged["scores"])
    assert judged["false_alarm_rate"] == pytest.approx(float((scores[labels == 0] >= cal.threshold).mean()))
