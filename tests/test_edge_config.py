"""Station config: the shipped file loads, and mistakes are one line naming file, line and key."""

from __future__ import annotations

from pathlib import Path

import pytest
from edge_helpers import REPO, assert_one_line_error, run_cli

from core.errors import ConfigError
from edge.config import StationConfig, load_station_config


def test_shipped_station_yaml_loads_with_documented_defaults() -> None:
    cfg = load_station_config(REPO / "config" / "station.yaml")
    defaults = StationConfig()
    assert cfg.engine == defaults.engine and cfg.events == defaults.events and cfg.mqtt == defaults.mqtt
    assert cfg.calibration == defaults.calibration and cfg.drift == defaults.drift
    assert cfg.sinks == defaults.sinks == ["mqtt"] and cfg.webhook == defaults.webhook and cfg.spool == defaults.spool
    assert [c.id for c in cfg.cameras] == ["cam0"]


def test_every_key_in_station_yaml_is_commented() -> None:
    lines = (REPO / "config" / "station.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip().lstrip("- ").strip()
        if not stripped or stripped.startswith("#") or ":" not in stripped:
            continue
        above = lines[i - 1].strip()
        assert above.startswith("#") or above.startswith("- #") or "#" in line or \
            lines[i - 2].strip().startswith("#"), f"station.yaml:{i + 1}: key without a comment: {line}"


@pytest.mark.parametrize("text, needle", [
    ("station: s1\nengine:\n  max_batchh: 4\n", ":3: unknown key 'engine.max_batchh'"),
    ("station: s1\nevents:\n  k: three\n", ":3: key 'events.k' must be an integer"),
    ("cameras:\n  - id: a\n    source: x.avi\n  - id: a\n    source: y.avi\n", "camera ids must be unique"),
    ("station: a/b\n", "station id 'a/b'"),
    ("events:\n  k: 6\n  n: 5\n", "need 1 <= k <= n"),
    ("engine:\n  backend: cuda\n", "engine.backend must be one of"),
    ("drift:\n  window: 0\n", "drift.window at least 1"),
    ("drift:\n  sigma: 2\n", "drift.sigma"),
    ("calibration:\n  quantile: 2.0\n", "calibration.quantile must be in [0.5, 1]"),
    ("mqtt: [1, 2\n", "invalid YAML"),
    ("webhook:\n  url: http://h/x\n  retries: 3\n", ":3: unknown key 'webhook.retries'"),
    ("webhook:\n  url: ftp://u:s3cret@h/x\n", "webhook.url must be an http:// or https:// URL"),
    ("webhook:\n  url: https://user:s3cret@h/x\n  timeout_s: 0\n", "webhook.timeout_s must be > 0"),
    ("sinks: [mqtt, kafka]\n", "sinks: unknown sink 'kafka'; choose from mqtt, webhook"),
    ("sinks: [webhook]\n", "webhook.url is empty"),
    ("sinks: []\n", "sinks must name at least one sink"),
    ("cameras:\n  - id: a\n    source: x\n    kind: kinect\n", "camera 'a': kind must be one of"),
])
def test_config_mistakes_name_file_line_and_key(tmp_path: Path, text: str, needle: str) -> None:
    f = tmp_path / "station.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_station_config(f)
    msg = str(err.value)
    assert msg.startswith(str(f)) and needle in msg, msg
    assert "\n" not in msg and "s3cret" not in msg


def test_bad_config_through_the_cli_is_one_line(tmp_path: Path, toy_engines: Path) -> None:
    f = tmp_path / "station.yaml"
    f.write_text("station: s1\nmqtt:\n  keepalive_s: soon\n")
    proc = run_cli("edge-run", ["--config", f, "--camera", "x.avi", "--engine", "toy"], cwd=tmp_path)
    assert_one_line_error(proc, "edge-run", f"{f}:3:", "mqtt.keepalive_s")
    proc = run_cli("edge-run", ["--config", tmp_path / "missing.yaml", "--camera", "x.avi"], cwd=tmp_path)
    assert_one_line_error(proc, "edge-run", "config file not found")


def test_a_camera_kind_is_one_of_the_registered_source_kinds(tmp_path: Path) -> None:
    f = tmp_path / "station.yaml"
    f.write_text("cameras:\n  - id: line\n    source: /data/drop\n    kind: folder\n")
    cfg = load_station_config(f)
    assert cfg.cameras[0].kind == "folder"
