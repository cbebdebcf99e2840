"""Synthetic parts: deterministic, defects visible but small, MVTec layout written."""

from __future__ import annotations

import cv2
import numpy as np

from trainer.synthetic import DEFECT_KINDS, make_dataset, plant_on_frame, render_frame, render_part


def test_deterministic_by_seed() -> None:
    a = render_frame(np.random.default_rng(3), 96, defect=True)
    b = render_frame(np.random.default_rng(3), 96, defect=True)
    c = render_frame(np.random.default_rng(4), 96, defect=True)
    assert a.dtype == np.uint8 and a.shape == (96, 96, 3)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_frame_size_height_width() -> None:
    frame = render_frame(np.random.default_rng(0), (120, 200), defect=False)
    assert frame.shape == (120, 200, 3)


def test_defects_visible_not_huge() -> None:
    rng = np.random.default_rng(0)
    for kind in DEFECT_KINDS:
        for _ in range(5):
            state = rng.bit_generator.state
            img, mask = render_part(rng, 128, kind)
            area = float((mask > 0).mean())
            assert 0.0008 < area < 0.05, (kind, area)
            # Same seed without the defect: the defect region must differ visibly.
            rng2 = np.random.default_rng()
            rng2.bit_generator.state = state
            good, _ = render_part(rng2, 128, None)
            diff = np.abs(img.astype(int) - good.astype(int)).max(axis=2)
            assert diff[mask > 0].mean() > 20, kind
            outside = cv2.dilate(mask, np.ones((5, 5), np.uint8)) == 0  # anti-aliased rims and blur spill over
            assert diff[outside].max() <= 8, kind


def test_make_dataset_layout(tmp_path) -> None:
    root = make_dataset(tmp_path / "ds", n_train=3, n_test_good=2, n_test_defect=4, size=64, seed=1, n_val_defect=2)
    assert len(list((root / "train" / "good").glob("*.png"))) == 3
    assert len(list((root / "test" / "good").glob("*.png"))) == 2
    for kind in DEFECT_KINDS:
        imgs = sorted((root / "test" / kind).glob("*.png"))
        assert len(imgs) == 1
        mask = cv2.imread(str(root / "ground_truth" / kind / f"{imgs[0].stem}_mask.png"), cv2.IMREAD_GRAYSCALE)
        assert mask.shape == (64, 64) and mask.max() == 255
    assert (root / "val" / "good").is_dir()


def test_defects_planted_in_any_frame_always_show() -> None:
    """A retrain with no labelled defects compares models on defects planted in collected frames; one that does
    not show (a 180-degree turn of brushed metal pasted on itself) made the comparison turn on label noise."""
    rng = np.random.default_rng(5)
    frames = [render_frame(rng, (240, 320), defect=False) for _ in range(6)]
    frames.append(np.full((240, 320, 3), 128, np.uint8))  # a uniform frame: nothing to paste that would show
    for i in range(300):
        frame = frames[i % len(frames)]
        planted, mask = plant_on_frame(rng, frame)
        inside = mask > 0
        assert 0.0005 < inside.mean() < 0.05, i
        diff = np.abs(planted.astype(int) - frame.astype(int)).mean(axis=2)
        assert diff[inside].mean() >= 25, (i, diff[inside].mean())
        outside = cv2.dilate(mask, np.ones((5, 5), np.uint8)) == 0
        assert diff[outside].max() == 0, i
