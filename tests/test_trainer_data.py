"""Dataset reading: MVTec layout, host-side resize, one-line errors for bad input."""

from __future__ import annotations

import numpy as np
import pytest

from core.errors import UserError
from trainer.data import fingerprint, load_test, load_train, train_paths
from trainer.synthetic import make_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "ds", n_train=4, n_test_good=2, n_test_defect=4,
                        size=80, seed=0)


def test_reads_and_resizes(dataset) -> None:
    train = load_train(dataset, (64, 48))
    assert train.images.shape == (4, 64, 48, 3) and train.images.dtype == np.uint8
    test = load_test(dataset, (64, 48))
    assert test is not None and test.labels.tolist().count(1) == 4
    assert test.masks is not None and test.masks.shape == (6, 64, 48)
    assert set(np.unique(test.masks)) <= {0, 1} and test.masks[test.labels == 1].any()
    assert not test.masks[test.labels == 0].any()


def test_fingerprint_changes_with_content(dataset, tmp_path) -> None:
    paths = train_paths(dataset)
    fp = fingerprint(paths, dataset)
    assert fp["count"] == 4 and len(fp["sha256"]) == 64
    assert fingerprint(paths, dataset) == fp
    assert fingerprint(paths[:3], dataset) != fp


def test_missing_folder(tmp_path) -> None:
    with pytest.raises(UserError, match="data folder not found"):
        load_train(tmp_path / "nope", (64, 64))
    (tmp_path / "ds").mkdir()
    with pytest.raises(UserError, match="train/good: training folder not found"):
        load_train(tmp_path / "ds", (64, 64))


def test_empty_train_good(tmp_path) -> None:
    (tmp_path / "train" / "good").mkdir(parents=True)
    (tmp_path / "train" / "good" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="no images"):
        load_train(tmp_path, (64, 64))


def test_unreadable_image_named(tmp_path) -> None:
    good = tmp_path / "train" / "good"
    good.mkdir(parents=True)
    (good / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(UserError, match=r"broken\.png: cannot read this image"):
        load_train(tmp_path, (64, 64))
