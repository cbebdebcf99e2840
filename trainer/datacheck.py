"""Checks of a dataset a user must see before training: sizes, grayscale, calibration hold-out, masks.

Each check returns one-line warnings (or nothing) for the CLI to print before the minutes of training
start, so that a surprise (stretched images, a hold-out too small to set a threshold on, defect images
without masks) is seen when it can still be fixed. Headers only are read (PIL, no pixel decoding), so tens
of thousands of files scan in seconds; only ``undecodable_images`` decodes, since a file cut short keeps a header
that reads. No torch here: the checks run before any model is built.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import cv2
from PIL import Image

from core.errors import UserError
from core.preprocess import RESIZE_MODES

# PIL modes of single-channel images ("LA"/"La": gray with alpha). "P" (palette) counts as colour, even
# with a gray palette: telling those apart would need the palette, which is more than this check is worth.
GRAYSCALE_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
ASPECT_TOLERANCE = 0.01  # an aspect ratio within 1 % of the input's is not worth a warning
MIN_HOLDOUT = 30  # below about this many scores the mean + k·std floor of the threshold is noise
MAX_NAMED = 5  # file names listed in a warning before "and N more"
MAX_SIZES_LISTED = 3  # image sizes listed one by one in a warning; more are given as a range


@dataclass
class ImageScan:
    """What the image headers of one folder say: how many, which sizes (width, height), which are grayscale."""

    count: int = 0
    sizes: Counter[tuple[int, int]] = field(default_factory=Counter)
    grayscale: list[Path] = field(default_factory=list)


def scan_images(paths: Sequence[Path]) -> ImageScan:
    """Size and mode of every image from its header alone, so a large dataset is checked in seconds.

    A file PIL cannot identify is a UserError naming it, the same line the training reader gives.
    """
    scan = ImageScan()
    for p in paths:
        try:
            with Image.open(p) as im:
                size, mode = (int(im.size[0]), int(im.size[1])), str(im.mode)
        except Image.DecompressionBombError:
            raise UserError(f"{p}: image too large to read safely (over PIL's decompression-bomb limit); "
                            "downscale it or remove the file") from None
        except (OSError, ValueError, SyntaxError):
            raise UserError(f"{p}: cannot read this image (corrupt or not an image); fix or remove the file") from None
        scan.count += 1
        scan.sizes[size] += 1
        if mode in GRAYSCALE_MODES:
            scan.grayscale.append(Path(p))
    return scan


def undecodable_images(paths: Sequence[Path]) -> list[Path]:
    """The files the training reader (cv2.imread in colour, as trainer/data.py reads them) cannot decode.

    A PNG cut short by a failed copy keeps a header that reads, so only a decode finds it; found during training,
    it would stop the fit mid-epoch, inside a DataLoader worker. Decoded on threads (OpenCV releases the GIL).
    """
    def unreadable(path: Path) -> bool:
        return cv2.imread(str(path), cv2.IMREAD_COLOR) is None

    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        return [p for p, bad in zip(paths, pool.map(unreadable, paths), strict=True) if bad]


def undecodable_error(bad: Sequence[Path], where: str) -> UserError:
    """One line naming the files ``undecodable_images`` found (the first few, then how many more)."""
    fix = "fix or remove" + (" the file" if len(bad) == 1 else " them") + " (a copy cut short: copy it again)"
    if len(bad) == 1:
        return UserError(f"{bad[0]}: cannot decode this image (truncated or corrupt: its header reads, its pixels "
                         f"do not); {fix}")
    named = ", ".join(Path(p).name for p in bad[:MAX_NAMED])
    if len(bad) > MAX_NAMED:
        named += f" and {len(bad) - MAX_NAMED} more"
    return UserError(f"{where}: {len(bad)} images cannot decode (truncated or corrupt: their headers read, their "
                     f"pixels do not): {named}; {fix}")


def _aspect(width: int, height: int) -> float:
    return width / height


def _differs(aspect: float, target: float) -> bool:
    return abs(aspect / target - 1.0) > ASPECT_TOLERANCE


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _sizes_phrase(sizes: Counter[tuple[int, int]]) -> str:
    """'3 sizes (64x48 ×5, 48x48 ×1, 80x45 ×1)' for a few, '263 sizes (100x62 to 600x600)' for many."""
    if len(sizes) <= MAX_SIZES_LISTED:
        ranked = sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0]))
        return f"{len(sizes)} sizes (" + ", ".join(f"{sw}x{sh} ×{n}" for (sw, sh), n in ranked) + ")"
    by_area = sorted(sizes, key=lambda s: (s[0] * s[1], s))
    return f"{len(sizes)} sizes ({by_area[0][0]}x{by_area[0][1]} to {by_area[-1][0]}x{by_area[-1][1]})"


def _fitting(resize: str, w: int, h: int, distorts: bool) -> str:
    """What ``resize`` does to images of other shapes than the input's, and the other choice, in one phrase."""
    if not distorts:
        return f"each is scaled to {w}x{h}, whose aspect ratio they all have"
    if resize == "stretch":
        return (f"each is stretched to {w}x{h} (input.resize: stretch), distorting what is on it; "
                "input.resize: letterbox keeps the shapes (black bars), crop too (cuts the edges off)")
    if resize == "letterbox":
        return (f"each is letterboxed into {w}x{h} (input.resize: letterbox): shapes kept, black bars fill the "
                "rest; input.resize: stretch fills the input instead (distorts)")
    return (f"each is cut to {w}x{h}'s aspect ratio around its centre (input.resize: crop): shapes kept, the "
            "edges beyond are never seen; input.resize: letterbox sees the whole image")


def size_warnings(scan: ImageScan, where: str, hw: tuple[int, int], resize: str) -> list[str]:
    """One line when images come in several sizes, or in one whose aspect ratio ``resize`` = stretch distorts:
    what will happen to them and which key changes it.

    Every image is fitted to the frame the station sends (``hw`` = (height, width): the model input, or the
    whole tiled frame with input.tiles) by the bundle's input.resize; stretch changes the shape of parts
    whose aspect ratio differs from the input's, which the user should choose knowingly. Sizes are written
    width x height, as image viewers show them.
    """
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, not {resize!r}")
    h, w = hw
    target = _aspect(w, h)
    if not scan.sizes:
        return []
    aspects = sorted({_aspect(sw, sh) for sw, sh in scan.sizes})
    distorts = any(_differs(a, target) for a in aspects)
    if len(scan.sizes) > 1:
        if aspects[-1] / aspects[0] - 1.0 <= ASPECT_TOLERANCE:
            shapes = f"aspect ratio {aspects[0]:.2f}"
        else:
            shapes = f"aspect ratios {aspects[0]:.2f} to {aspects[-1]:.2f}"
        return [f"{where}: images come in {_sizes_phrase(scan.sizes)}, {shapes}; "
                f"{_fitting(resize, w, h, distorts)}"]
    sw, sh = next(iter(scan.sizes))
    if resize == "stretch" and distorts:
        return [f"{where}: images are {sw}x{sh} (aspect ratio {_aspect(sw, sh):.2f}) and are stretched to the "
                f"model input {w}x{h} (aspect ratio {target:.2f}); input.resize: letterbox keeps their shape "
                "(black bars), crop too (cuts the edges off)"]
    return []


def grayscale_warning(scan: ImageScan, where: str) -> Optional[str]:
    """Say how many images are grayscale and what the models make of them: read as BGR with B = G = R, as the
    station converts a grey camera's frames (core/preprocess.py), so the pretrained backbones see grey in all
    three ImageNet channels; the models trained from scratch learn one grey channel when every training image
    is grey (input.channels: auto)."""
    n = len(scan.grayscale)
    if n == 0:
        return None
    if n == scan.count:
        what = "the one image is grayscale" if n == 1 else f"all {n} images are grayscale"
        scratch = "models trained from scratch learn one grey channel (input.channels: auto; colour keeps three)"
    else:
        what = f"{n} of {scan.count} images {'is' if n == 1 else 'are'} grayscale"
        scratch = "models trained from scratch learn colour (input.channels: auto; gray makes them learn grey)"
    return (f"{where}: {what}; read as BGR with B = G = R, as the station does a grey camera's frames: pretrained "
            f"backbones see grey in all three channels, {scratch}")


def holdout_needed(quantile: float) -> int:
    """Held-out normal images a ``quantile`` threshold needs: its q-quantile is more than their maximum
    only from 1/(1-q) images on, and the mean + k·std floor is noise below about MIN_HOLDOUT."""
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], not {quantile}")
    if quantile >= 1.0:
        return MIN_HOLDOUT
    # round first: 1 / (1 - 0.99) is 99.99999999999991 in floating point, and 1 / (1 - 0.9) 10.000000000000002
    return max(MIN_HOLDOUT, math.ceil(round(1.0 / (1.0 - quantile), 9)))


def holdout_warning(n_holdout: int, quantile: float, sigmas: float) -> Optional[str]:
    """Warn when the calibration hold-out (held-out normal images that set the threshold) is too small to trust.

    Below 1/(1-q) images the q-quantile is just their maximum, so the threshold is one sample; below
    MIN_HOLDOUT images the mean + ``sigmas``·std floor is noisy. None when there are enough.
    """
    if sigmas < 0:
        raise ValueError(f"sigmas must be >= 0, not {sigmas}")
    needed = holdout_needed(quantile)
    if n_holdout >= needed:
        return None
    fix = "add normal images to train/good or raise calibration.holdout_fraction"
    if quantile < 1.0 and math.ceil(round(1.0 / (1.0 - quantile), 9)) >= MIN_HOLDOUT:
        return (f"calibration hold-out has {n_holdout} images; a {quantile:g} quantile threshold needs at least "
                f"{needed} to be more than their maximum: {fix}")
    floor = f" and its mean + {sigmas:g} std floor need" if sigmas > 0 else " needs"
    return (f"calibration hold-out has {n_holdout} images; a {quantile:g} quantile threshold{floor} at least "
            f"{needed} to be stable: {fix}")


def missing_masks_warning(defect_paths_without_mask: Sequence[Path], n_defect: int, where: str) -> Optional[str]:
    """Name defect images without a ground-truth mask: pixel AUROC needs a mask for every one of them
    (a missing mask would count the defect as all good), so without them it is not computed."""
    missing = list(defect_paths_without_mask)
    if not missing:
        return None
    names = [f"{Path(p).parent.name}/{Path(p).name}" for p in missing]
    named = ", ".join(names[:MAX_NAMED])
    if len(names) > MAX_NAMED:
        named += f" and {len(names) - MAX_NAMED} more"
    verb = "has" if len(missing) == 1 else "have"
    return (f"{where}: {len(missing)} of {n_defect} defect images {verb} no mask in ground_truth/ ({named}); "
            "pixel AUROC is not computed")
