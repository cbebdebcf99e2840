"""Public datasets read from local files only (no downloads): Fashion-MNIST, MNIST, CIFAR-10, image folders, the
elpv solar cells and MVTec AD's category folders.

Why here: the accuracy-protocol runner (``benchmarks/protocol.py``) and its tests need the same readers,
and a missing or malformed dataset must be one line saying what to supply, not a traceback. One reader
per format; each returns a ``LabelledImages``: uint8 images ``[N,H,W]`` (grey) or ``[N,H,W,3]`` (BGR,
OpenCV's order, as everywhere in this project), int64 labels ``[N]`` and the class names (index = label).

Formats:

- idx (LeCun's MNIST page; Fashion-MNIST uses it too): big-endian; two zero bytes, a type byte (0x08 =
  uint8), a byte with the number of dimensions, one uint32 per dimension, then the data in C order;
  gzipped or not. Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist``.
- CIFAR-10 *binary* version (``data_batch_1.bin`` … ``data_batch_5.bin``, ``test_batch.bin``): records of
  1 label byte + 3072 pixel bytes (the 32x32 R plane, then G, then B). The Python version is pickles, and
  this project never unpickles files (a pickle can run code), so it is refused with a pointer to the
  binary version.
- image folders: ``ROOT/train/<class>/*`` and ``ROOT/test/<class>/*`` (png, jpg, jpeg, bmp), classes sorted
  by folder name = labels 0, 1, …; accepted for MNIST and CIFAR-10 too.

The surface datasets (defects on one kind of part, not one class against others) are not loaded into memory:
the runner lays their files out (elpv) or hands their folders to the trainer as they are (MVTec AD), so here
they are a label file and a split (elpv) and a checked list of category folders (MVTec AD):

- elpv (Buerhop-Lutz et al. 2018; Deitsch et al. 2019): 2624 solar cells, 300x300 8-bit grey PNGs cut from
  electroluminescence images of modules, from the PyPI package ``elpv-dataset`` (``make elpv``). Its
  ``elpv_dataset/data/labels.csv`` has one cell a line, whitespace-separated: the image path (relative to that
  folder), the experts' defect probability (0, 1/3, 2/3 or 1) and the cell type (mono or poly).
- MVTec AD (Bergmann et al. 2019): ``ROOT/<category>/train/good``, ``ROOT/<category>/test/<good|defect>/`` and
  ``ROOT/<category>/ground_truth/<defect>/<name>_mask.png``: each category folder is already the trainer's layout.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import struct
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import cv2
import numpy as np

from core.errors import UserError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
MNIST_CLASSES = tuple(str(d) for d in range(10))
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DATASETS = ("fashion-mnist", "mnist", "cifar10", "folder")
SPLITS = ("train", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")

_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_IDX_UBYTE = 0x08
_CIFAR_FILES = {"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)), "test": ("test_batch.bin",)}
_CIFAR_SIDE = 32
_CIFAR_RECORD = 1 + 3 * _CIFAR_SIDE * _CIFAR_SIDE


class LabelledImages(NamedTuple):
    """One split of a dataset: uint8 images [N,H,W] or [N,H,W,3] BGR, int64 labels [N], class names."""

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")


# --- idx (MNIST, Fashion-MNIST) ---------------------------------------------------------------------------

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


def _idx_path(folder: Path, stem: str) -> Optional[Path]:
    """``stem.gz`` or ``stem`` in ``folder`` (the gzipped form first), or None."""
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def read_idx_split(folder: str | Path, split: str, classes: tuple[str, ...], install_hint: str) -> LabelledImages:
    """The idx image and label files of ``split`` in ``folder`` (``.gz`` or not) as grey images and labels.

    Missing files are one UserError naming them and ``install_hint``; labels beyond ``classes`` are an error.
    """
    _check_split(split)
    folder = Path(folder)
    stems = _IDX_FILES[split]
    paths = [_idx_path(folder, stem) for stem in stems]
    missing = [f"{stem}[.gz]" for stem, p in zip(stems, paths, strict=True) if p is None]
    if missing:
        raise UserError(f"{folder}: {', '.join(missing)} not found; {install_hint}")
    assert paths[0] is not None and paths[1] is not None
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3:
        raise UserError(f"{paths[0]}: expected images [N,H,W], the file declares {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise UserError(f"{paths[1]}: {labels.shape} labels for {len(images)} images in {paths[0].name}; "
                        "reinstall the dataset")
    if len(labels) and int(labels.max()) >= len(classes):
        raise UserError(f"{paths[1]}: label {int(labels.max())} outside 0..{len(classes) - 1}")
    return LabelledImages(images, labels.astype(np.int64), classes)


def load_fashion_mnist(split: str, root: Optional[str | Path] = None) -> LabelledImages:
    """Fashion-MNIST ``split`` ('train' or 'test'): 28x28 grey images; default folder the Debian package's."""
    folder = Path(root) if root is not None else FASHION_MNIST_DIR
    return read_idx_split(folder, split, FASHION_MNIST_CLASSES,
                          "install them with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or pass "
                          "--data DIR holding the idx files")


def load_mnist(split: str, root: str | Path) -> LabelledImages:
    """MNIST ``split`` from the standard idx files in ``root`` (gzipped or not): 28x28 grey digits."""
    return read_idx_split(root, split, MNIST_CLASSES,
                          "put the four standard MNIST idx files there (train-images-idx3-ubyte, "
                          "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, gzipped or not)")


# --- CIFAR-10 binary ---------------------------------------------------------------------------------------

def read_cifar10_binary(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 binary batch file as (BGR images uint8 [N,32,32,3], labels int64 [N])."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read this CIFAR-10 batch ({exc})") from None
    if not data or len(data) % _CIFAR_RECORD:
        raise UserError(f"{path}: {len(data)} bytes is not a whole number of {_CIFAR_RECORD}-byte CIFAR-10 "
                        "records (1 label byte + 3072 pixel bytes); use the binary version's files unchanged")
    records = np.frombuffer(data, np.uint8).reshape(-1, _CIFAR_RECORD)
    labels = records[:, 0].astype(np.int64)
    if int(labels.max()) >= len(CIFAR10_CLASSES):
        raise UserError(f"{path}: label {int(labels.max())} outside 0..9; not a CIFAR-10 binary batch file")
    rgb_planes = records[:, 1:].reshape(-1, 3, _CIFAR_SIDE, _CIFAR_SIDE)  # R, G, B planes
    bgr = np.ascontiguousarray(rgb_planes[:, ::-1].transpose(0, 2, 3, 1))
    return bgr, labels


def _cifar_folder(root: Path) -> Path:
    """The folder holding the binary batches: ``root`` itself or its ``cifar-10-batches-bin`` (as unpacked)."""
    nested = root / "cifar-10-batches-bin"
    return nested if nested.is_dir() and not (root / "data_batch_1.bin").is_file() else root


def _cifar_class_names(folder: Path) -> tuple[str, ...]:
    """Names from the binary version's ``batches.meta.txt`` (one a line) when it lists 10; else the standard."""
    meta = folder / "batches.meta.txt"
    if meta.is_file():
        names = tuple(line.strip() for line in meta.read_text(errors="replace").splitlines() if line.strip())
        if len(names) == len(CIFAR10_CLASSES):
            return names
    return CIFAR10_CLASSES


def load_cifar10(split: str, root: str | Path) -> LabelledImages:
    """CIFAR-10 ``split`` from the binary version's batch files in ``root``: 32x32 BGR images.

    A folder with the Python (pickle) version instead is a UserError pointing at the binary version.
    """
    _check_split(split)
    root = Path(root)
    folder = _cifar_folder(root)
    paths = [folder / name for name in _CIFAR_FILES[split]]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        pickled = [p for p in (folder / "data_batch_1", folder / "test_batch", root / "cifar-10-batches-py")
                   if p.exists()]
        if pickled:
            raise UserError(f"{pickled[0]}: this is the Python (pickle) version of CIFAR-10, which is not read "
                            "here (files are never unpickled); get the CIFAR-10 binary version and pass its folder "
                            "(data_batch_1.bin ... data_batch_5.bin, test_batch.bin) as --data")
        raise UserError(f"{folder}: CIFAR-10 binary file(s) {', '.join(missing)} not found; pass --data DIR holding "
                        "the binary version (data_batch_1.bin ... data_batch_5.bin, test_batch.bin) or "
                        "DIR/train/<class>/ and DIR/test/<class>/ image folders")
    parts = [read_cifar10_binary(p) for p in paths]
    return LabelledImages(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                          _cifar_class_names(folder))


# --- image folders -----------------------------------------------------------------------------------------

def _read_folder_image(path: Path) -> np.ndarray:
    """One image as uint8 grey [H,W] or BGR [H,W,3] (alpha dropped); an unreadable file names itself."""
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise UserError(f"{path}: cannot read this image (corrupt or not an image); fix or remove the file")
    if img.dtype != np.uint8:
        raise UserError(f"{path}: {img.dtype} pixels; save it as 8-bit (uint8) grey or colour")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    elif img.ndim == 3 and img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
    return img


def read_image_folder(split_dir: str | Path) -> LabelledImages:
    """``split_dir/<class>/*`` images as one array; classes sorted by folder name are labels 0, 1, ….

    All images must share one size; grey ones are turned into BGR when any image is colour.
    """
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise UserError(f"{split_dir}: folder not found; lay the images out as DIR/train/<class>/*.png and "
                        "DIR/test/<class>/*.png")
    class_dirs = sorted(p for p in split_dir.iterdir() if p.is_dir())
    if not class_dirs:
        raise UserError(f"{split_dir}: no class sub-folders; put each class's images in {split_dir}/<class>/")
    images: list[np.ndarray] = []
    labels: list[int] = []
    first: Optional[Path] = None
    for label, class_dir in enumerate(class_dirs):
        files = sorted(p for p in class_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise UserError(f"{class_dir}: no images (png, jpg, jpeg, bmp); add some or remove the folder")
        for path in files:
            img = _read_folder_image(path)
            if first is None:
                first = path
            elif img.shape[:2] != images[0].shape[:2]:
                raise UserError(f"{path}: {img.shape[1]}x{img.shape[0]} px, but {first} is "
                                f"{images[0].shape[1]}x{images[0].shape[0]}; give all images one size")
            images.append(img)
            labels.append(label)
    if any(img.ndim == 3 for img in images):
        images = [cv2.cvtColor(img, cv2.COLOR_GRAY2BGR) if img.ndim == 2 else img for img in images]
    return LabelledImages(np.stack(images), np.asarray(labels, np.int64), tuple(p.name for p in class_dirs))


def load_image_folder(split: str, root: str | Path) -> LabelledImages:
    """``root/<split>/<class>/*`` (see ``read_image_folder``)."""
    _check_split(split)
    return read_image_folder(Path(root) / split)


def has_folder_layout(root: str | Path) -> bool:
    """Whether ``root`` holds ``train/<class>/`` and ``test/<class>/`` sub-folders (the folder layout)."""
    root = Path(root)
    return all((root / s).is_dir() and any(p.is_dir() for p in (root / s).iterdir()) for s in SPLITS)


def load_dataset(name: str, split: str, root: Optional[str | Path] = None) -> LabelledImages:
    """``split`` of dataset ``name`` (one of DATASETS) from local files; the folder layout is accepted for all.

    ``root`` is required except for fashion-mnist (default: the Debian package's folder). The test split's
    class names must be the training split's (the caller checks when it holds both).
    """
    if name not in DATASETS:
        raise UserError(f"unknown dataset '{name}'; known: {', '.join(DATASETS)}")
    if root is not None and not Path(root).is_dir():
        raise UserError(f"{root}: --data folder not found")
    if root is not None and (name == "folder" or has_folder_layout(root)):
        return load_image_folder(split, root)
    if name == "fashion-mnist":
        return load_fashion_mnist(split, root)
    if root is None:
        what = {"mnist": "the four standard MNIST idx files (train-images-idx3-ubyte[.gz] ...)",
                "cifar10": "the CIFAR-10 binary version (data_batch_1.bin ... data_batch_5.bin, test_batch.bin)",
                "folder": "DIR/train/<class>/*.png and DIR/test/<class>/*.png"}[name]
        alt = "" if name == "folder" else ", or DIR/train/<class>/ and DIR/test/<class>/ image folders"
        raise UserError(f"--dataset {name} is read from local files only (nothing is downloaded): pass --data DIR "
                        f"holding {what}{alt}")
    if name == "mnist":
        return load_mnist(split, root)
    if name == "cifar10":
        return load_cifar10(split, root)
    return load_image_folder(split, root)



# --- elpv solar cells ----------------------------------------------------------------------------------------

ELPV_PACKAGE = "elpv-dataset==1.0.0.post1"  # what `make elpv` installs
ELPV_MODULE = "elpv_dataset"
ELPV_CELL_TYPES = ("mono", "poly")
ELPV_TRAIN = 300  # functional cells trained on per seed; mono then tests on the other 288 and all 313 defective
ELPV_FUNCTIONAL = 0.0  # experts' defect probability of a functional cell ...
ELPV_DEFECTIVE = 1.0  # ... and of a defective one; the uncertain 1/3 and 2/3 are left out of the protocol
_ELPV_INSTALL = f"install it with `make elpv` (pip install {ELPV_PACKAGE} into the venv)"


class ElpvCell(NamedTuple):
    """One line of elpv's labels.csv: the image (absolute), the experts' defect probability, mono or poly."""

    path: Path
    probability: float
    cell_type: str


class ElpvSplit(NamedTuple):
    """One seed's elpv split of one cell type: images to train on and to test on, and what was left out."""

    train: list[Path]
    test_good: list[Path]
    test_defect: list[Path]
    n_uncertain: int  # cells of this type with probability 1/3 or 2/3, in neither split


def elpv_data_dir(root: Optional[str | Path] = None, module: str = ELPV_MODULE) -> Path:
    """The folder holding elpv's labels.csv: ``root`` when given, else the installed package's ``data`` folder.

    Found without importing the package (its import pulls in Pillow). Neither there: one UserError saying how
    to install it.
    """
    if root is not None:
        folder = Path(root)
        if not (folder / "labels.csv").is_file():
            raise UserError(f"{folder}: no labels.csv; pass --root the elpv data folder (labels.csv and images/), or "
                            f"leave --root out to use the installed package ({_ELPV_INSTALL})")
        return folder
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the elpv dataset (Python package {module}) is not installed; {_ELPV_INSTALL}, or pass "
                        "--root DIR holding its labels.csv and images/")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    if not (folder / "labels.csv").is_file():
        raise UserError(f"{folder}: the installed {module} package has no labels.csv; reinstall it ({_ELPV_INSTALL})")
    return folder


def read_elpv_labels(path: str | Path) -> list[ElpvCell]:
    """elpv's labels.csv (``images/cell0001.png  1.0  mono`` a line) as cells; a bad line is one UserError at
    file:line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read this label file ({exc}); reinstall the dataset "
                        f"({_ELPV_INSTALL})") from None
    cells: list[ElpvCell] = []
    for number, line in enumerate(lines, 1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{number}"
        if len(fields) != 3:
            raise UserError(f"{where}: expected 3 fields (image path, defect probability, mono|poly), found "
                            f"{len(fields)}: {line.strip()!r}")
        name, prob_text, cell_type = fields
        try:
            probability = float(prob_text)
        except ValueError:
            raise UserError(f"{where}: defect probability {prob_text!r} is not a number") from None
        if not 0.0 <= probability <= 1.0:
            raise UserError(f"{where}: defect probability {probability} outside 0..1")
        if cell_type not in ELPV_CELL_TYPES:
            raise UserError(f"{where}: cell type {cell_type!r} is not one of {', '.join(ELPV_CELL_TYPES)}")
        cells.append(ElpvCell(path.parent / name, probability, cell_type))
    if not cells:
        raise UserError(f"{path}: no cells listed; reinstall the dataset ({_ELPV_INSTALL})")
    return cells


def elpv_split(cells: Sequence[ElpvCell], cell_type: str, seed: int, n_train: int = ELPV_TRAIN) -> ElpvSplit:
    """Seed ``seed``'s split of ``cell_type``: ``n_train`` functional cells drawn at random to train on, the other
    functional cells and every defective one to test on; cells rated 1/3 or 2/3 are in neither.

    The draw is over the functional cells sorted by path, so it depends on the seed and the label file only.
    """
    if cell_type not in ELPV_CELL_TYPES:
        raise UserError(f"--cell {cell_type}: expected one of {', '.join(ELPV_CELL_TYPES)}")
    mine = [c for c in cells if c.cell_type == cell_type]
    good = sorted(c.path for c in mine if math.isclose(c.probability, ELPV_FUNCTIONAL, abs_tol=1e-6))
    bad = sorted(c.path for c in mine if math.isclose(c.probability, ELPV_DEFECTIVE, abs_tol=1e-6))
    if len(good) <= n_train or not bad:
        raise UserError(f"elpv {cell_type}: {len(good)} functional and {len(bad)} defective cells; the protocol needs "
                        f"more than {n_train} functional (to train on {n_train} and test on the rest) and at least one "
                        "defective; lower --train-limit or check labels.csv")
    order = np.random.default_rng(seed).permutation(len(good))
    train = [good[i] for i in sorted(order[:n_train])]
    test_good = [good[i] for i in sorted(order[n_train:])]
    return ElpvSplit(train, test_good, bad, len(mine) - len(good) - len(bad))


# --- MVTec AD ------------------------------------------------------------------------------------------------

MVTEC_CATEGORIES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill",
                    "screw", "tile", "toothbrush", "transistor", "wood", "zipper")


def mvtec_categories(root: str | Path, wanted: Optional[Sequence[str]] = None) -> list[str]:
    """The category folders of an MVTec AD folder to run (all, sorted, or ``wanted`` in its order), each checked
    for ``train/good``, ``test/good`` and at least one defect folder in ``test/``."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--root {root}: folder not found; pass the MVTec AD folder holding bottle/, cable/, ...")
    found = sorted(p.name for p in root.iterdir() if (p / "train" / "good").is_dir())
    if not found:
        raise UserError(f"--root {root}: no category folders (CATEGORY/train/good); pass the MVTec AD folder holding "
                        "bottle/, cable/, ...")
    chosen = list(wanted) if wanted else found
    unknown = [c for c in chosen if c not in found]
    if unknown:
        raise UserError(f"--classes {','.join(unknown)}: not a category folder of {root} (found: {', '.join(found)})")
    for name in chosen:
        test = root / name / "test"
        subs = sorted(p.name for p in test.iterdir() if p.is_dir()) if test.is_dir() else []
        if "good" not in subs or len(subs) < 2:
            raise UserError(f"{test}: needs good/ and at least one defect folder (MVTec AD's layout: "
                            f"{name}/test/good, {name}/test/<defect>/)")
    return chosen
