"""config/train.yaml: loads, every key commented, errors name file:line, model sections generated from the
registry (and checked against it), ``edge-train config --dump/--check`` and ``fit --help``."""

from __future__ import annotations

import copy
import dataclasses
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from core.errors import ConfigError
from trainer.cli import main
from trainer.config import (
    DEFAULT_CONFIG,
    TrainConfig,
    load_train_config,
    parse_override,
    parse_train_config,
    render_train_yaml,
    with_overrides,
    yaml_value,
)
from trainer.models import field_docs, model_sections, section_models, settings_title


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


def test_model_sections_are_generated_from_the_registry() -> None:
    shipped = DEFAULT_CONFIG.read_text()
    assert render_train_yaml(shipped) == shipped, (
        "config/train.yaml's model sections drifted from the models' settings: regenerate them with "
        "`edge-train config --dump > config/train.yaml`")
    for key in model_sections():
        assert f"\n{key}:\n" in shipped, key


def test_a_changed_default_is_drift(tmp_path: Path) -> None:
    shipped = DEFAULT_CONFIG.read_text()
    edited = tmp_path / "train.yaml"
    key, settings = next(iter(model_sections().items()))
    first = dataclasses.fields(settings)[0].name
    lines = shipped.splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if line.startswith(f"  {first}:") and lines.index(f"{key}:\n") < i)
    lines[at] = lines[at].replace(f"  {first}:", f"  {first}: 12345 #", 1)
    edited.write_text("".join(lines))
    assert render_train_yaml(edited.read_text()) == shipped
    assert main(["config", "--check", "--file", str(edited)]) == 1
    assert main(["config", "--check"]) == 0


def test_config_dump_prints_the_shipped_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--dump"]) == 0
    assert capsys.readouterr().out == DEFAULT_CONFIG.read_text()


def test_a_file_without_the_markers_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "train.yaml"
    path.write_text("seed: 1\n")
    assert main(["config", "--dump", "--file", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"edge-train: error: {path}: no generated model sections")


def test_every_model_field_has_a_doc() -> None:
    for key, settings in model_sections().items():
        assert settings_title(settings), f"{key}: the settings class needs a docstring (the section's title)"
        for name, _default, doc in field_docs(settings):
            assert doc, f"{key}.{name} has no doc: declare it with setting(default, doc)"


def test_fit_help_lists_every_model_with_its_keys() -> None:
    proc = subprocess.run([sys.executable, "-m", "trainer.cli", "fit", "--help"], cwd=DEFAULT_CONFIG.parent.parent,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    for key, settings in model_sections().items():
        model = section_models()[key]
        assert f"{model.name} ({model.display_name})" in text or f"{model.name}\n" in proc.stdout, model.name
        keys = ", ".join(f"{n}={yaml_value(d)}" for n, d, _doc in field_docs(settings))
        assert f"{key}: {keys}" in text, key
        assert model.catches in text


def test_a_config_is_one_dataclass_with_every_section() -> None:
    cfg = TrainConfig()
    dumped = dataclasses.asdict(cfg)
    assert set(model_sections()) <= set(dumped)
    assert load_train_config(DEFAULT_CONFIG).settings_for(cfg.model) == cfg.settings_for(cfg.model)
    assert copy.deepcopy(cfg) == cfg and pickle.loads(pickle.dumps(cfg)) == cfg


def test_benchmark_overrides_set_dotted_keys_and_the_schema_checks_them() -> None:
    overrides = [parse_override("input.height=64"), parse_override("stpm.lr=0.4"), parse_override("layers=[2, 4]")]
    assert overrides == [("input.height", 64), ("stpm.lr", 0.4), ("layers", [2, 4])]
    base = {"model": "stpm", "input": {"height": 160, "width": 160}}
    merged = with_overrides(base, overrides[:2])
    assert merged == {"model": "stpm", "input": {"height": 64, "width": 160}, "stpm": {"lr": 0.4}}
    assert base["input"] == {"height": 160, "width": 160}  # the base is not changed
    cfg = parse_train_config(yaml.safe_dump(merged))
    assert cfg.input.hw == (64, 160) and cfg.settings_for("stpm").lr == 0.4
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        parse_override("input.height")
    with pytest.raises(ConfigError, match="stpm.lr"):
        parse_train_config(yaml.safe_dump(with_overrides(base, [parse_override("stpm.lr=fast")])))
