"""Public datasets read from local files (no downloads): Fashion-MNIST in its original idx gz format.

Why here: the accuracy-protocol benchmarks and their slow test need the same reader, and a missing
dataset must be one line saying what to install, not a traceback. The files come from the Debian
package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist/``).

idx format (LeCun's MNIST page): big-endian; two zero bytes, a type byte (0x08 = uint8), a byte with the
number of dimensions, one uint32 per dimension, then the data in C order.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Optional

import numpy as np

from edge.errors import UserError
from edge.sources import resize_frame

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
_IDX_UBYTE = 0x08


def read_idx(path: str | Path) -> np.ndarray:
    """An idx(.gz) file as a uint8 array of its declared shape; a malformed file is a UserError naming it."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as exc:
        raise UserError(f"{path}: cannot read this idx file ({exc}); reinstall the dataset") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != _IDX_UBYTE:
        raise UserError(f"{path}: not an unsigned-byte idx file (bad magic); reinstall the dataset")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(f"{path}: truncated idx header; reinstall the dataset")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    count = int(np.prod(shape)) if shape else 1
    if len(data) - header != count:
        raise UserError(f"{path}: idx header declares {count} bytes of data, file holds {len(data) - header}; "
                        "reinstall the dataset")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def load_fashion_mnist(split: str, root: Optional[str | Path] = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N,28,28], labels uint8 [N]) of ``split`` 'train' or 'test'.

    Missing files are one UserError line naming the folder and the package to install.
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    folder = Path(root) if root is not None else FASHION_MNIST_DIR
    paths = [folder / name for name in _FILES[split]]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"{folder}: Fashion-MNIST file(s) {', '.join(missing)} not found; install them with "
                        "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or point --data-dir at a folder "
                        "holding them")
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise UserError(f"{folder}: {split} images {images.shape} and labels {labels.shape} do not match; "
                        "reinstall the dataset")
    return images, labels


def to_bgr_frames(gray: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Grayscale images [N,h,w] -> uint8 BGR frames [N,H,W,3] at the model input, with the edge's own resize."""
    out = np.empty((len(gray), hw[0], hw[1], 3), np.uint8)
    for i, img in enumerate(gray):
        out[i] = resize_frame(img, hw)
    return out
