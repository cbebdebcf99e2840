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
