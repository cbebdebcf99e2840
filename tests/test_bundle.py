"""The bundle format: what the trainer writes the edge must accept, and anything tampered with it must refuse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.bundle import (
    FORMAT_VERSION,
    MANIFEST,
    load_bundle,
    new_version_dir,
    promote,
    resolve_bundle_dir,
    write_manifest,
)
from core.errors import BundleError


def _make_bundle(root: Path, model: str = "toy") -> Path:
    d = new_version_dir(root, model)
    (d / "model.onnx").write_bytes(b"not really onnx, but bytes to checksum")
    (d / "report.json").write_text("{}")
    write_manifest(
        d,
        model_name=model,
        input_spec={"height": 32, "width": 48},
        outputs=[{"name": "score", "dtype": "float32", "shape": ["N"]}],
        calibration={"threshold": 0.5, "method": "normal_quantile"},
        training_data={"count": 3, "sha256": "0" * 64},
        metrics={},
    )
    return d


def test_written_bundle_loads_with_its_contract(tmp_path: Path) -> None:
    d = _make_bundle(tmp_path)
    b = load_bundle(d)
    assert b.model_name == "toy" and b.version == d.name
    assert b.input_hw == (32, 48) and b.threshold == 0.5 and b.input_name == "frames"
    assert b.manifest["format_version"] == FORMAT_VERSION
    assert set(b.manifest["files"]) == {"model.onnx", "report.json"}
    assert b.manifest["input"]["colour_order"] == "BGR" and b.manifest["input"]["dtype"] == "uint8"
    assert b.max_batch is None and b.score_baseline == 0.0  # optional fields absent: safe defaults


def test_promote_and_resolve_by_model_name(tmp_path: Path) -> None:
    first = _make_bundle(tmp_path)
    second = _make_bundle(tmp_path)
    assert first != second  # two versions in the same second get distinct folders
    promote(first)
    assert load_bundle("toy", engines_root=tmp_path).path == first
    promote(second)
    assert load_bundle(tmp_path / "toy").path == second
    assert (tmp_path / "toy" / "current").read_text().strip() == second.name
    assert first.exists()  # earlier versions stay for rollback


def test_plans_folder_is_not_part_of_the_checksums(tmp_path: Path) -> None:
    d = _make_bundle(tmp_path)
    (d / "plans").mkdir()
    (d / "plans" / "x.plan").write_bytes(b"engine")
    load_bundle(d)


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda d: (d / "model.onnx").write_bytes(b"tampered"), "checksum does not match"),
        (lambda d: (d / "model.onnx").unlink(), "missing"),
        (lambda d: (d / MANIFEST).write_text("{not json"), "corrupt"),
        (lambda d: (d / MANIFEST).unlink(), "neither a bundle"),
    ],
)
def test_damaged_bundles_are_refused_in_one_line(tmp_path: Path, damage, expected: str) -> None:
    d = _make_bundle(tmp_path)
    damage(d)
    with pytest.raises(BundleError, match=expected) as info:
        load_bundle(d)
    assert "\n" not in str(info.value)


def test_other_format_version_is_refused(tmp_path: Path) -> None:
    d = _make_bundle(tmp_path)
    manifest = json.loads((d / MANIFEST).read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (d / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="format version"):
        load_bundle(d)


def test_unknown_reference_names_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="edge-train fit"):
        resolve_bundle_dir("nosuchmodel", engines_root=tmp_path)


def test_current_pointing_nowhere_is_refused(tmp_path: Path) -> None:
    d = _make_bundle(tmp_path)
    (d.parent / "current").write_text("19990101T000000Z\n")
    with pytest.raises(BundleError, match="not a folder"):
        load_bundle(d.parent)
