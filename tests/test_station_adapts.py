"""The adaptation loop end to end, nothing stood in: a station collects frames from an MJPEG clip, a nightly
retrain on them promotes a challenger, a running station picks it up (hot swap), a deliberately worse
challenger is refused, and rollback restores the champion, which the running station picks up too.

Drift alarms (a clip whose light changes half way) are tested in tests/test_edge_drift.py.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from edge_helpers import (
    Collector,
    check_payloads,
    cli_command,
    run_cli,
    wait_stopped,
    write_labelled_holdout,
    write_station_frames,
)

from core.bundle import read_current
from trainer.synthetic import make_dataset, write_clip

SIZE = (240, 320)


def _station_yaml(tmp_path: Path, station: str, engines: Path, extra: str = "") -> Path:
    path = tmp_path / f"{station}.yaml"
    path.write_text(f"""station: {station}
state_dir: {tmp_path / 'state'}
engine:
  engines_dir: {engines}
  watch_interval_s: 0.2
  auto_batch: false
mqtt: {{stats_interval_s: 0.2}}
{extra}""", encoding="utf-8")
    return path


def _versions(col: Collector) -> list[str]:
    return [json.loads(m.payload)["model_version"] for m in col.on("/stats")]


def test_collect_retrain_promote_hot_swap_and_rollback(tmp_path: Path, mosquitto: str) -> None:
    engines = tmp_path / "engines"
    stills = make_dataset(tmp_path / "stills", n_train=12, n_test_good=0, n_test_defect=0, size=SIZE, seed=21)
    train_cfg = tmp_path / "train.yaml"
    # a champion that never saw the station's codec; calibrated by the quantile rule (retrain keeps the recipe): the
    # default 1 % false-alarm target estimated from 2-3 held-out stills is noisy enough that one of the eight good
    # frames of the retrain's hold-out crossed the challenger's threshold in one run, and the rule refused it
    train_cfg.write_text("codec_augment:\n  enabled: false\ncalibration:\n  policy: quantile\n")
    proc = subprocess.run([sys.executable, "-m", "trainer.cli", "fit", "--data", str(stills), "--config",
                           str(train_cfg), "--out", str(engines)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    champion = Path(proc.stdout.strip().splitlines()[-1]).name

    # 1. a station collects normal frames of its own MJPEG stream (every frame it may: 10 fps, one per 0.1 s)
    collect_dir = tmp_path / "collect"
    clip = write_clip(tmp_path / "shift.avi", SIZE, 100, [], fps=10.0, seed=61, codec="MJPG")
    cfg = _station_yaml(tmp_path, "st-collect", engines, f"collect:\n  enabled: true\n  dir: {collect_dir}\n"
                        "  normal_every_s: 0.1\n  guard_s: 0.3\n")
    proc = run_cli("edge-run", ["--config", cfg, "--camera", clip, "--engine", "patchcore", "--mqtt", mosquitto],
                   timeout=180)
    assert proc.returncode == 0, proc.stderr
    collected = sorted((collect_dir / "train" / "good").glob("*.png"))
    assert len(collected) >= 30, f"only {len(collected)} normal frames collected"
    assert all(json.loads(p.with_suffix(".json").read_text())["model_version"] == champion for p in collected)

    # 2. a station that follows engines/patchcore runs on a live stream while the nightly job retrains
    loop = write_clip(tmp_path / "loop.avi", SIZE, 30, [], fps=10.0, seed=71, codec="MJPG")
    live = _station_yaml(tmp_path, "st-live", engines, f"""cameras:
  - id: cam0
    source: {loop}
    live: true
    reopen_initial_s: 0.05
    reopen_max_s: 0.05
""")
    with Collector(mosquitto, ["anomaly/st-live/#"]) as col:
        log_path = tmp_path / "st-live.log"  # a file, not a pipe: the looping clip logs every reopen, and a full
        log_file = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 - pipe would block the station's logging
        station = subprocess.Popen([*cli_command("edge-run"), "--config", live, "--engine", "patchcore",
                                    "--mqtt", mosquitto], cwd=tmp_path, stderr=log_file, text=True)
        try:
            assert col.wait_for(lambda ms: champion in _versions(col), timeout=60)
            proc = run_cli("edge-train", ["retrain", "--station-data", collect_dir, "--current",
                                          engines / "patchcore", "--json"], timeout=400)
            assert proc.returncode == 0, proc.stderr
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            assert result["promoted"], result["decision"]
            challenger = result["challenger"]
            assert read_current(engines / "patchcore") == challenger
            assert col.wait_for(lambda ms: _versions(col)[-1:] == [challenger], timeout=60), "not swapped in"

            # a deliberately worse challenger: "normals" collected during a bad batch (every part defective),
            # judged on a labelled hold-out -> refused; current and the running station stay on the good one
            bad = write_clip(tmp_path / "bad.avi", SIZE, 40, [(0, 40)], fps=10.0, seed=81, codec="MJPG")
            write_station_frames(tmp_path / "bad-batch", bad)
            held = write_clip(tmp_path / "held.avi", SIZE, 40, [(10, 30)], fps=10.0, seed=91, codec="MJPG")
            holdout = write_labelled_holdout(tmp_path / "holdout", held, [(10, 30)])
            proc = run_cli("edge-train", ["retrain", "--station-data", tmp_path / "bad-batch", "--current",
                                          engines / "patchcore", "--holdout", holdout, "--json"], timeout=400)
            assert proc.returncode == 0, proc.stderr
            refused = json.loads(proc.stdout.strip().splitlines()[-1])
            assert not refused["promoted"] and refused["champion"] == challenger, refused["decision"]
            assert read_current(engines / "patchcore") == challenger

            proc = run_cli("edge-train", ["rollback", "patchcore", "--out", engines])
            assert proc.returncode == 0 and read_current(engines / "patchcore") == champion, proc.stderr
            assert col.wait_for(lambda ms: _versions(col)[-1:] == [champion], timeout=60), "rollback not taken"
            station.send_signal(signal.SIGTERM)
            station.wait(60)
        except AssertionError as exc:  # say what the station logged, not only that it did not swap
            station.kill()
            station.wait()
            log = [ln for ln in log_path.read_text().splitlines() if "reopen" not in ln]
            raise AssertionError(f"{exc}; station's log: {log[-30:]}") from None
        finally:
            if station.poll() is None:
                station.kill()
            log_file.close()
        err = log_path.read_text()
        assert station.returncode == 0, err[-3000:]
        wait_stopped(col)
        check_payloads(col)  # every payload of the run against the shipped schemas
    assert f"model swapped: patchcore {champion} -> patchcore {challenger}" in err
    assert f"model swapped: patchcore {challenger} -> patchcore {champion}" in err
    assert refused["challenger"] not in err  # never swapped in
