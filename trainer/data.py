"""Reading an MVTec-AD-like dataset folder into uint8 BGR arrays at the model input size.

Layout: DIR/train/good/*, optional DIR/test/good/*, DIR/test/<defect>/*,
DIR/ground_truth/<defect>/<name>_mask.png, and optional labelled validation data DIR/val/good/*,
DIR/val/<defect>/* (used for an F1-optimal threshold). Images are read with cv2 (BGR) and resized with
cv2.resize on the host, exactly as the edge does, so training sees what the station sends.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import cv2
import numpy as np

from core.errors import UserError
from core.preprocess import resize_frame  # the one resize, shared with the station
from trainer.datacheck import missing_masks_warning

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")


@dataclass
class ImageSet:
    """Images of one split: frames [N,H,W,3] uint8 BGR, labels (0 good, 1 defect), optional masks [N,H,W]."""

    paths: list[Path]
    images: np.ndarray
    labels: np.ndarray
    masks: Optional[np.ndarray] = None
    kinds: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, idx: np.ndarray) -> ImageSet:
        """Rows ``idx`` of this set."""
        return ImageSet(paths=[self.paths[i] for i in idx], images=self.images[idx], labels=self.labels[idx],
                        masks=None if self.masks is None else self.masks[idx],
                        kinds=[self.kinds[i] for i in idx] if self.kinds else [])


def list_images(folder: Path) -> list[Path]:
    """Image files in ``folder`` (not recursive), sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def read_original(path: Path) -> np.ndarray:
    """One image as uint8 BGR [H,W,3] at its own size; an unreadable file is a UserError naming it."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise UserError(f"{path}: cannot read this image (corrupt or not an image); fix or remove the file")
    return img


def read_image(path: Path, hw: tuple[int, int], resize: str = "stretch") -> np.ndarray:
    """One image as uint8 BGR [H,W,3] at ``hw`` fitted by ``resize``; an unreadable file is a UserError naming it."""
    return resize_frame(read_original(path), hw, resize)


def read_mask(path: Path, hw: tuple[int, int], resize: str = "stretch") -> np.ndarray:
    """A ground-truth mask as uint8 0/1 at ``hw``, fitted like its image (stretch, letterbox or crop)."""
    m = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if m is None:
        raise UserError(f"{path}: cannot read this mask (corrupt or not an image); fix or remove the file")
    return (resize_frame(m, hw, resize)[..., 0] > 127).astype(np.uint8)


def _read_all(paths: list[Path], hw: tuple[int, int], resize: str = "stretch") -> np.ndarray:
    if not paths:
        return np.zeros((0, hw[0], hw[1], 3), np.uint8)
    return np.stack([read_image(p, hw, resize) for p in paths])


def _require_dir(path: Path, what: str, fix: str) -> None:
    if not path.is_dir():
        raise UserError(f"{path}: {what} not found; {fix}")


def train_paths(root: Path) -> list[Path]:
    """The training files (DIR/train/good); errors name the folder and what to put there."""
    root = Path(root)
    _require_dir(root, "data folder", "pass --data DIR with DIR/train/good/*.png (MVTec AD layout)")
    good = root / "train" / "good"
    _require_dir(good, "training folder", "put normal images in DIR/train/good/ (png, jpg, jpeg, bmp)")
    paths = list_images(good)
    if not paths:
        raise UserError(f"{good}: no images (png, jpg, jpeg, bmp); add normal training images there")
    return paths


def known_defect_paths(root: Path) -> dict[str, list[Path]]:
    """DIR/train/<kind>/ images, every sub-folder of train/ but good: labelled defects a site already has (operators'
    labels, ``edge-run label``). Models that learn from labelled defects (``AnomalyModel.learns_from_defects``) train
    on them; the others learn from train/good alone."""
    train = Path(root) / "train"
    if not train.is_dir():
        return {}
    found = {sub.name: list_images(sub) for sub in sorted(train.iterdir()) if sub.is_dir() and sub.name != "good"}
    return {kind: paths for kind, paths in found.items() if paths}


def load_train(root: Path, hw: tuple[int, int], resize: str = "stretch") -> ImageSet:
    """DIR/train/good as an ImageSet (all labels 0), in memory: for small sets (tests); fit streams from disk."""
    paths = train_paths(root)
    return ImageSet(paths=paths, images=_read_all(paths, hw, resize), labels=np.zeros(len(paths), np.int64),
                    kinds=["good"] * len(paths))


def _load_labelled(split_dir: Path, hw: tuple[int, int], gt_dir: Optional[Path], resize: str = "stretch",
                   warn: Callable[[str], None] = lambda _m: None) -> Optional[ImageSet]:
    """A labelled split (good + defect folders) with masks where ground truth exists for every defect image."""
    if not split_dir.is_dir():
        return None
    paths: list[Path] = []
    labels: list[int] = []
    kinds: list[str] = []
    for sub in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        files = list_images(sub)
        paths += files
        labels += [0 if sub.name == "good" else 1] * len(files)
        kinds += [sub.name] * len(files)
    if not paths:
        raise UserError(f"{split_dir}: no images in its sub-folders; add {split_dir.name}/good/ and "
                        f"{split_dir.name}/<defect>/ images or remove the folder")
    images = _read_all(paths, hw, resize)
    masks = None
    if gt_dir is not None and gt_dir.is_dir():
        masks = np.zeros((len(paths), hw[0], hw[1]), np.uint8)
        missing: list[Path] = []
        for i, p in enumerate(paths):
            kind = kinds[i]
            if kind == "good":
                continue
            candidates = (gt_dir / kind / f"{p.stem}_mask{ext}" for ext in IMAGE_EXTENSIONS)
            mp = next((c for c in candidates if c.is_file()), None)
            if mp is None:
                missing.append(p.relative_to(split_dir))
            else:
                masks[i] = read_mask(mp, hw, resize)
        defects = sum(labels)
        if len(missing) == defects:
            masks = None
        elif missing:
            # Pixel metrics need a mask for every defect image: a missing one would count as all-good.
            masks = None
            message = missing_masks_warning(missing, defects, split_dir.name)
            if message:
                warn(message)
    return ImageSet(paths=paths, images=images, labels=np.asarray(labels, np.int64), masks=masks, kinds=kinds)


def load_test(root: Path, hw: tuple[int, int], resize: str = "stretch",
              warn: Callable[[str], None] = lambda _m: None) -> Optional[ImageSet]:
    """DIR/test (good + defect folders) with ground-truth masks when every defect image has one; None if absent.

    ``warn`` hears one line when some defect images have masks and others do not (which ones).
    """
    root = Path(root)
    _require_dir(root, "data folder", "pass --data DIR (MVTec AD layout: DIR/test/good, DIR/test/<defect>)")
    return _load_labelled(root / "test", hw, root / "ground_truth", resize, warn)


def load_val(root: Path, hw: tuple[int, int], resize: str = "stretch") -> Optional[ImageSet]:
    """Optional labelled validation data DIR/val (good + defect folders); None if absent."""
    return _load_labelled(Path(root) / "val", hw, None, resize)


def fingerprint(paths: list[Path], root: Path) -> dict[str, object]:
    """Training-data fingerprint for the manifest: file count and one sha256 over (relative name, content)."""
    digest = hashlib.sha256()
    for p in sorted(paths):
        digest.update(str(p.relative_to(root)).replace("\\", "/").encode() + b"\0")
        digest.update(hashlib.sha256(p.read_bytes()).digest())
    return {"count": len(paths), "sha256": digest.hexdigest()}
