"""Bad input through the real CLI: one line ``edge-run: error: ...``, exit 2, never a traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from edge_helpers import assert_one_line_error, make_toy_bundle, run_cli, write_video


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_video(tmp_path_factory.mktemp("video") / "clean.avi", [], 10)


def _run(tmp_path: Path, *args: object) -> object:
    return run_cli("edge-run", [*args, "--state-dir", tmp_path / "state", "--mqtt", "mqtt://127.0.0.1:1"],
                   cwd=tmp_path, timeout=30)


def test_missing_bundle(tmp_path: Path, video: Path) -> None:
    proc = _run(tmp_path, "--camera", video, "--engine", "nosuchmodel")
    assert_one_line_error(proc, "edge-run", "nosuchmodel", "no bundle here")  # type: ignore[arg-type]


def test_corrupt_bundle_checksum(tmp_path: Path, toy_bundle: Path, video: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(toy_bundle, bundle)
    with open(bundle / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    proc = _run(tmp_path, "--camera", video, "--engine", bundle)
    assert_one_line_error(proc, "edge-run", "checksum does not match")  # type: ignore[arg-type]


def test_wrong_bundle_format_version(tmp_path: Path, video: Path) -> None:
    bundle = make_toy_bundle(tmp_path / "engines", promote_it=False)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["format_version"] = 99
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    proc = _run(tmp_path, "--camera", video, "--engine", bundle)
    assert_one_line_error(proc, "edge-run", "format version 99")  # type: ignore[arg-type]


@pytest.mark.parametrize("current, expected", [
    (b"\xff\xfe\x00garbage", "unreadable"),  # non-UTF-8 bytes
    (b"../../etc\n", "not a folder here"),
])
def test_garbage_in_current_is_one_line(tmp_path: Path, video: Path, current: bytes, expected: str) -> None:
    engines = tmp_path / "engines"
    make_toy_bundle(engines)
    (engines / "toy" / "current").write_bytes(current)
    proc = _run(tmp_path, "--camera", video, "--engine", engines / "toy")
    assert_one_line_error(proc, "edge-run", "current", expected)  # type: ignore[arg-type]


@pytest.mark.parametrize("field, value, expected", [
    ("files", ["model.onnx"], "'files' missing or not a JSON object"),
    ("files", {"../model.onnx": "0" * 64}, "paths inside the bundle"),
    ("outputs", {"score": 1}, "'outputs' missing or not a JSON list"),
    ("model", "toy", "'model' missing or not a JSON object"),
    ("calibration", {"threshold": "high"}, "threshold"),
])
def test_garbage_in_a_manifest_is_one_line(tmp_path: Path, video: Path, field: str, value: object,
                                           expected: str) -> None:
    bundle = make_toy_bundle(tmp_path / "engines", promote_it=False)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest[field] = value
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    proc = _run(tmp_path, "--camera", video, "--engine", bundle)
    assert_one_line_error(proc, "edge-run", expected)  # type: ignore[arg-type]


def test_no_model_given(tmp_path: Path, video: Path) -> None:
    proc = _run(tmp_path, "--camera", video)
    assert_one_line_error(proc, "edge-run", "no model")  # type: ignore[arg-type]


def test_camera_file_that_does_not_exist(tmp_path: Path, toy_bundle: Path) -> None:
    proc = _run(tmp_path, "--camera", tmp_path / "nope.avi", "--engine", toy_bundle)
    assert_one_line_error(proc, "edge-run", "camera 'cam0'", "not found")  # type: ignore[arg-type]


def test_camera_index_that_will_not_open_with_fail_fast(tmp_path: Path, toy_bundle: Path) -> None:
    cfg = tmp_path / "st.yaml"
    cfg.write_text("cameras:\n  - id: cam0\n    source: '97'\n    wait_at_start: false\n    stale_timeout_s: 2\n")
    proc = _run(tmp_path, "--config", cfg, "--engine", toy_bundle)
    line = assert_one_line_error(proc, "edge-run", "camera 'cam0'", "cannot open 97",  # type: ignore[arg-type]
                                 "wait_at_start is false")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr  # type: ignore[attr-defined]
    assert line


def test_file_that_is_not_a_video(tmp_path: Path, toy_bundle: Path) -> None:
    junk = tmp_path / "junk.avi"
    junk.write_bytes(b"not a video at all" * 100)
    proc = _run(tmp_path, "--camera", junk, "--engine", toy_bundle)
    assert_one_line_error(proc, "edge-run", "cannot open")  # type: ignore[arg-type]


@pytest.mark.parametrize("url", ["http://broker:1883", "mqtt://", "mqtt://host:99999", "broker:1883"])
def test_bad_mqtt_url(tmp_path: Path, toy_bundle: Path, video: Path, url: str) -> None:
    proc = run_cli("edge-run", ["--camera", video, "--engine", toy_bundle, "--mqtt", url,
                                "--state-dir", tmp_path / "state"], cwd=tmp_path)
    assert_one_line_error(proc, "edge-run", "MQTT URL")


def test_bad_arguments_are_one_line(tmp_path: Path) -> None:
    proc = run_cli("edge-run", ["--max-frames", "zero"], cwd=tmp_path)
    assert_one_line_error(proc, "edge-run", "--max-frames")
    proc = run_cli("edge-run", ["--engine", "x"], cwd=tmp_path)
    assert_one_line_error(proc, "edge-run", "no camera")
    proc = run_cli("edge-run", ["--camera", "a/b=x.avi", "--engine", "x"], cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    proc = run_cli("edge-events", ["--mqtt", "mqtt://127.0.0.1:1", "--timeout", "1"], cwd=tmp_path)
    assert_one_line_error(proc, "edge-events", "cannot connect")
