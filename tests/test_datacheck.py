"""trainer.datacheck: the dataset checks shown before training, on real image files written with cv2."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from core.errors import UserError
from trainer.datacheck import (
    ImageScan,
    grayscale_warning,
    holdout_needed,
    holdout_warning,
    missing_masks_warning,
    scan_images,
    size_warnings,
    undecodable_error,
    undecodable_images,
)

REPO = Path(__file__).resolve().parents[1]


def _write(path: Path, h: int, w: int, gray: bool = False, dtype: type = np.uint8) -> Path:
    rng = np.random.default_rng(len(str(path)))
    top = 65535 if dtype is np.uint16 else 255
    shape = (h, w) if gray else (h, w, 3)
    assert cv2.imwrite(str(path), rng.integers(0, top, size=shape, dtype=dtype)), path
    return path


@pytest.fixture
def mixed(tmp_path: Path) -> list[Path]:
    """Colour and grayscale png/jpg/bmp files in three sizes (width x height: 64x48, 48x48, 80x45)."""
    return [
        _write(tmp_path / "c1.png", 48, 64),
        _write(tmp_path / "c2.jpg", 48, 64),
        _write(tmp_path / "c3.bmp", 48, 64),
        _write(tmp_path / "g1.png", 48, 64, gray=True),
        _write(tmp_path / "g2.jpg", 48, 48, gray=True),
        _write(tmp_path / "g3.bmp", 45, 80, gray=True),
        _write(tmp_path / "g16.png", 48, 64, gray=True, dtype=np.uint16),
    ]


def test_scan_counts_sizes_and_grayscale_files(mixed: list[Path], tmp_path: Path) -> None:
    Image.new("P", (64, 48)).save(tmp_path / "pal.png")  # palette images count as colour
    Image.new("LA", (64, 48)).save(tmp_path / "la.png")  # gray + alpha counts as grayscale
    scan = scan_images([*mixed, tmp_path / "pal.png", tmp_path / "la.png"])
    assert scan.count == 9
    assert scan.sizes == Counter({(64, 48): 7, (48, 48): 1, (80, 45): 1})
    assert [p.name for p in scan.grayscale] == ["g1.png", "g2.jpg", "g3.bmp", "g16.png", "la.png"]
    assert scan_images([]) == ImageScan(0, Counter(), [])


def test_scan_reads_headers_only(tmp_path: Path) -> None:
    """A file whose pixel data is cut off still scans: the header is all that is read (decoding is later)."""
    full = _write(tmp_path / "full.png", 300, 400)
    cut = tmp_path / "cut.png"
    cut.write_bytes(full.read_bytes()[:200])
    assert cv2.imread(str(cut)) is None  # not decodable...
    assert scan_images([cut]).sizes == Counter({(400, 300): 1})  # ...yet its size is known


@pytest.mark.parametrize("content", [b"", b"this is not an image", b"\x89PNG\r\n\x1a\n\x00\x00"])
def test_unreadable_file_is_one_user_error_line(tmp_path: Path, content: bytes) -> None:
    good = _write(tmp_path / "good.png", 8, 8)
    bad = tmp_path / "bad.png"
    bad.write_bytes(content)
    with pytest.raises(UserError) as info:
        scan_images([good, bad])
    assert str(info.value) == f"{bad}: cannot read this image (corrupt or not an image); fix or remove the file"


# -- sizes -----------------------------------------------------------------------------------------
def _scan(sizes: dict[tuple[int, int], int], gray: int = 0) -> ImageScan:
    count = sum(sizes.values())
    return ImageScan(count=count, sizes=Counter(sizes), grayscale=[Path(f"g{i}.png") for i in range(gray)])


def test_several_sizes_under_stretch(mixed: list[Path]) -> None:
    got = size_warnings(scan_images(mixed), "train/good", (160, 160), "stretch")
    assert got == ["train/good: images come in 3 sizes (64x48 ×5, 48x48 ×1, 80x45 ×1), aspect ratios 1.00 to 1.78; "
                   "each is stretched to 160x160 (input.resize: stretch), distorting what is on it; input.resize: "
                   "letterbox keeps the shapes (black bars), crop too (cuts the edges off)"]


def test_many_sizes_are_given_as_a_range_in_one_line() -> None:
    scan = _scan({(640, 480): 37, (1280, 720): 80, (500, 500): 3, (320, 240): 2, (800, 600): 2, (1920, 1080): 1,
                  (100, 100): 1})
    got = size_warnings(scan, "train/good", (160, 160), "letterbox")
    assert got == ["train/good: images come in 7 sizes (100x100 to 1920x1080), aspect ratios 1.00 to 1.78; each is "
                   "letterboxed into 160x160 (input.resize: letterbox): shapes kept, black bars fill the rest; "
                   "input.resize: stretch fills the input instead (distorts)"]
    many = _scan({(100 + i, 100 + 2 * i): 1 for i in range(300)})
    (line,) = size_warnings(many, "train/good", (160, 160), "stretch")
    assert "\n" not in line and len(line) < 300 and "300 sizes (100x100 to 399x698)" in line


def test_several_sizes_with_the_inputs_aspect_ratio_or_an_aspect_keeping_mode() -> None:
    same = _scan({(640, 480): 4, (320, 240): 2})
    for mode in ("stretch", "letterbox", "crop"):
        assert size_warnings(same, "train/good", (120, 160), mode) == [
            "train/good: images come in 2 sizes (640x480 ×4, 320x240 ×2), aspect ratio 1.33; each is scaled to "
            "160x120, whose aspect ratio they all have"]
    mixed = _scan({(640, 480): 4, (500, 500): 2})
    assert size_warnings(mixed, "w", (64, 64), "crop") == [
        "w: images come in 2 sizes (640x480 ×4, 500x500 ×2), aspect ratios 1.00 to 1.33; each is cut to 64x64's "
        "aspect ratio around its centre (input.resize: crop): shapes kept, the edges beyond are never seen; "
        "input.resize: letterbox sees the whole image"]


def test_one_size_warns_only_when_stretch_distorts_it_by_more_than_one_percent() -> None:
    wide = _scan({(640, 480): 10})
    assert size_warnings(wide, "test/good", (160, 160), "stretch") == [
        "test/good: images are 640x480 (aspect ratio 1.33) and are stretched to the model input 160x160 (aspect "
        "ratio 1.00); input.resize: letterbox keeps their shape (black bars), crop too (cuts the edges off)"]
    assert size_warnings(wide, "test/good", (160, 160), "letterbox") == []
    assert size_warnings(wide, "test/good", (160, 160), "crop") == []
    assert size_warnings(wide, "test/good", (480, 640), "stretch") == []  # same aspect ratio, other scale
    assert size_warnings(_scan({(160, 161): 3}), "w", (160, 160), "stretch") == []  # 0.6 %
    assert len(size_warnings(_scan({(160, 158): 3}), "w", (160, 160), "stretch")) == 1  # 1.3 %
    assert size_warnings(ImageScan(), "w", (160, 160), "stretch") == []


def test_size_warnings_refuse_an_unknown_mode() -> None:
    with pytest.raises(ValueError, match="stretch, letterbox, crop"):
        size_warnings(_scan({(64, 48): 1}), "w", (32, 32), "fit")


# -- grayscale -------------------------------------------------------------------------------------
def test_grayscale_warning(mixed: list[Path]) -> None:
    assert grayscale_warning(scan_images(mixed), "train/good") == (
        "train/good: 4 of 7 images are grayscale; read as BGR with B = G = R, as the station does a grey camera's "
        "frames: pretrained backbones see grey in all three channels, models trained from scratch learn colour "
        "(input.channels: auto; gray makes them learn grey)")
    assert grayscale_warning(_scan({(8, 8): 120}, gray=120), "train/good") == (
        "train/good: all 120 images are grayscale; read as BGR with B = G = R, as the station does a grey camera's "
        "frames: pretrained backbones see grey in all three channels, models trained from scratch learn one grey "
        "channel (input.channels: auto; colour keeps three)")
    one = str(grayscale_warning(_scan({(8, 8): 120}, gray=1), "test"))
    assert one.startswith("test: 1 of 120 images is grayscale;")
    assert str(grayscale_warning(_scan({(8, 8): 1}, gray=1), "val")).startswith("val: the one image is grayscale;")
    assert grayscale_warning(_scan({(8, 8): 120}), "train/good") is None


# -- calibration hold-out --------------------------------------------------------------------------
@pytest.mark.parametrize("quantile, needed", [(0.99, 100), (0.995, 200), (0.999, 1000), (0.967, 31),
                                              (0.95, 30), (0.9, 30), (0.5, 30), (1.0, 30), (0.0, 30)])
def test_holdout_needed(quantile: float, needed: int) -> None:
    assert holdout_needed(quantile) == needed


@pytest.mark.parametrize("quantile, needed", [(0.99, 100), (0.999, 1000), (0.967, 31)])
def test_holdout_warning_at_the_quantile_boundary(quantile: float, needed: int) -> None:
    assert holdout_warning(needed, quantile, 3.0) is None
    assert holdout_warning(needed + 50, quantile, 3.0) is None
    assert holdout_warning(needed - 1, quantile, 3.0) == (
        f"calibration hold-out has {needed - 1} images; a {quantile:g} quantile threshold needs at least {needed} "
        "to be more than their maximum: add normal images to train/good or raise calibration.holdout_fraction")


def test_holdout_warning_default_config_wording() -> None:
    assert holdout_warning(20, 0.99, 3.0) == (
        "calibration hold-out has 20 images; a 0.99 quantile threshold needs at least 100 to be more than their "
        "maximum: add normal images to train/good or raise calibration.holdout_fraction")


@pytest.mark.parametrize("quantile", [0.95, 0.9, 1.0])
def test_holdout_warning_where_thirty_images_are_the_floor(quantile: float) -> None:
    assert holdout_warning(30, quantile, 3.0) is None
    msg = holdout_warning(29, quantile, 3.0)
    assert msg == (f"calibration hold-out has 29 images; a {quantile:g} quantile threshold and its mean + 3 std "
                   "floor need at least 30 to be stable: add normal images to train/good or raise "
                   "calibration.holdout_fraction")
    assert holdout_warning(29, quantile, 0.0) == (
        f"calibration hold-out has 29 images; a {quantile:g} quantile threshold needs at least 30 to be stable: "
        "add normal images to train/good or raise calibration.holdout_fraction")
    assert holdout_warning(0, quantile, 3.0) is not None


def test_holdout_warning_refuses_impossible_settings() -> None:
    with pytest.raises(ValueError):
        holdout_warning(10, 1.5, 3.0)
    with pytest.raises(ValueError):
        holdout_warning(10, 0.99, -1.0)


# -- masks -----------------------------------------------------------------------------------------
def test_missing_masks_named(tmp_path: Path) -> None:
    paths = [tmp_path / "test" / "crack" / "003.png", tmp_path / "test" / "crack" / "007.png",
             tmp_path / "test" / "scratch" / "011.png"]
    assert missing_masks_warning(paths, 40, "test") == (
        "test: 3 of 40 defect images have no mask in ground_truth/ (crack/003.png, crack/007.png, "
        "scratch/011.png); pixel AUROC is not computed")
    assert missing_masks_warning(paths[:1], 40, "test") == (
        "test: 1 of 40 defect images has no mask in ground_truth/ (crack/003.png); pixel AUROC is not computed")
    assert missing_masks_warning([], 40, "test") is None


@pytest.mark.parametrize("n, more", [(5, ""), (6, " and 1 more"), (12, " and 7 more")])
def test_missing_masks_list_is_truncated_after_five(n: int, more: str) -> None:
    paths = [Path("test") / "crack" / f"{i:03d}.png" for i in range(n)]
    five = ", ".join(f"crack/{i:03d}.png" for i in range(5))
    assert missing_masks_warning(paths, 40, "test") == (
        f"test: {n} of 40 defect images have no mask in ground_truth/ ({five}{more}); pixel AUROC is not computed")


def test_importing_datacheck_does_not_import_torch() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", "import trainer.datacheck, sys; assert 'torch' not in sys.modules"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_undecodable_images_finds_a_png_cut_short_whose_header_still_reads(tmp_path: Path) -> None:
    whole = _write(tmp_path / "whole.png", 48, 64)
    cut = _write(tmp_path / "cut.png", 48, 64)
    cut.write_bytes(cut.read_bytes()[:cut.stat().st_size // 2])
    assert scan_images([whole, cut]).count == 2  # the header check passes it
    assert undecodable_images([whole, cut]) == [cut]
    assert undecodable_images([whole]) == []
    message = str(undecodable_error([cut], "train/good"))
    assert message.startswith(f"{cut}: cannot decode") and "fix or remove the file" in message
    many = str(undecodable_error([tmp_path / f"{i}.png" for i in range(7)], "train/good"))
    assert many.startswith("train/good: 7 images cannot decode") and "0.png, 1.png" in many and "and 2 more" in many
