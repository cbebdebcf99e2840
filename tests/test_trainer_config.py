"""config/train.yaml: loads, every key commented, errors name file:line."""

from __future__ import annotations

import dataclasses

import pytest

from core.errors import ConfigError
from trainer.config import DEFAULT_CONFIG, TrainConfig, load_train_config


def test_shipped_config_loads_and_matches_defaults() -> None:
    assert load_train_config(DEFAULT_CONFIG) == TrainConfig()


def test_every_key_commented() -> None:
    for n, line in enumerate(DEFAULT_CONFIG.read_text().splitlines(), 1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and ":" in stripped:
            key = stripped.split(":")[0]
            value = stripped.split(":", 1)[1].strip()
            if value:  # a key with a value must explain itself on its line (sections may be commented above)
                assert "#" in line or DEFAULT_CONFIG.read_text().splitlines()[n - 2].strip().startswith("#"), (n, key)


def test_every_schema_key_in_shipped_file() -> None:
    text = DEFAULT_CONFIG.read_text()

    def walk(obj: object) -> None:
        for f in dataclasses.fields(obj):  # type: ignore[arg-type]
            assert f"{f.name}:" in text, f.name
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value)

    walk(TrainConfig())


def test_unknown_key_names_file_and_line(tmp_path) -> None:
    path = tmp_path / "train.yaml"
    path.write_text("seed: 1\npatchcore:\n  coreset_ration: 0.1\n")
    with pytest.raises(ConfigError, match=rf"{path}:3: unknown key 'patchcore.coreset_ration'"):
        load_train_config(path)


def test_wrong_type_and_range(tmp_path) -> None:
    path = tmp_path / "train.yaml"
    path.write_text("input:\n  height: big\n")
    with pytest.raises(ConfigError, match=rf"{path}:2: key 'input.height' must be an integer"):
        load_train_config(path)
    path.write_text("calibration:\n  quantile: 0.2\n")
    with pytest.raises(ConfigError, match="quantile"):
        load_train_config(path)
