"""Config errors name the file, the line and the key; good values arrive typed."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest

from core.configfile import load_config, parse_config
from core.errors import ConfigError


@dataclass
class _Mqtt:
    url: str = "mqtt://localhost:1883"
    keepalive_s: int = 30


@dataclass
class _Station:
    station: str = "st"
    threshold: Optional[float] = None
    mqtt: _Mqtt = field(default_factory=_Mqtt)
    cameras: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if not self.station:
            raise ValueError("key 'station' must not be empty")


def test_values_are_typed_and_defaults_kept() -> None:
    cfg = parse_config("station: a\nthreshold: 2\nmqtt:\n  keepalive_s: 5\ncameras: [0, b.avi]\n", _Station)
    assert cfg == _Station(station="a", threshold=2.0, mqtt=_Mqtt(keepalive_s=5), cameras=["0", "b.avi"])
    assert parse_config("", _Station) == _Station()
    assert parse_config("threshold: 1.0e9\n", _Station).threshold == 1e9  # YAML 1.1 reads this as a string
    with pytest.raises(ConfigError, match="must be a number"):
        parse_config("threshold: '1.0e9'\n", _Station)  # quoted: the user wrote a string


@pytest.mark.parametrize(
    "text, message",
    [
        ("station: a\nmqtt:\n  keepalive: 5\n", "f.yaml:3: unknown key 'mqtt.keepalive'"),
        ("mqtt:\n  keepalive_s: soon\n", "f.yaml:2: key 'mqtt.keepalive_s' must be an integer"),
        ("threshold: [1]\n", "f.yaml:1: key 'threshold' must be a number"),
        ("mqtt: 3\n", "f.yaml:1: key 'mqtt' must be a mapping"),
        ("station: a\nstation: b\n", "f.yaml:2: key 'station' appears twice"),
        ("station: ''\n", "f.yaml:1: key 'station' must not be empty"),
        ("station: [\n", "f.yaml:2: invalid YAML"),
    ],
)
def test_errors_name_file_line_and_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, _Station, source="f.yaml")
    assert str(info.value).startswith(message), str(info.value)


def test_missing_file_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml", _Station)


@dataclass
class _Calibration:
    quantile: float = 0.99
    method: str = "auto"
    margin: float = 0.0

    def validate(self) -> None:
        if self.method not in ("auto", "f1", "quantile"):
            raise ValueError("calibration.method must be auto, f1 or quantile")


@dataclass
class _Train:
    seed: int = 0
    calibration: _Calibration = field(default_factory=_Calibration)
    batch_size: Optional[int] = None

    def validate(self) -> None:
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")


@pytest.mark.parametrize(
    "text, message",
    [
        # the wrong value is on line 4, not on line 3 where the section's first key is
        ("seed: 1\ncalibration:\n  quantile: 0.9\n  method: best\n  margin: 0.1\n",
         "f.yaml:4: calibration.method must be auto, f1 or quantile"),
        ("seed: 1\n\nbatch_size: 0\n", "f.yaml:3: batch_size must be >= 1"),
    ],
)
def test_a_value_refused_by_validate_points_at_its_own_line(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, _Train, source="f.yaml")
    assert str(info.value).startswith(message), str(info.value)


def test_a_validate_error_about_a_key_left_at_its_default_points_at_the_section() -> None:
    @dataclass
    class _Checked:
        low: int = 5
        high: int = 1

        def validate(self) -> None:
            if self.low > self.high:
                raise ValueError("high must be >= low")

    with pytest.raises(ConfigError) as info:
        parse_config("\n\nlow: 3\n", _Checked, source="f.yaml")  # 'high' is not in the file: the section's line
    assert str(info.value).startswith("f.yaml:3: high must be >= low"), str(info.value)
