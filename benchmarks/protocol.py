"""Accuracy protocols run through `edge-train` as a user runs it: one-class (one class abnormal, one class
normal) and real surfaces (elpv solar cells, MVTec AD).

    python benchmarks/protocol.py --dataset fashion-mnist|cifar10|mnist|folder --protocol one-abnormal|one-normal
        --model NAME [--classes 0,1,...] [--seeds 3] [--epochs E] [--train-limit K] [--test-limit T]
        [--device D] [--data PATH] [--size 32] [--threads N] [--json OUT.json] [--keep DIR] [--set KEY=VALUE ...] [-v]
    python benchmarks/protocol.py --dataset fashion-mnist|... --protocol few-shot [--shots 1,5,10] --models a,b
        [--classes 0,1,...] [--seeds 3] [--test-limit T] ... (as one-normal, without --train-limit)
    python benchmarks/protocol.py --dataset elpv --cell mono|poly|mono,poly [--root DIR] --models a,b | --model A ...
        [--seeds 3] [--first-seed 0] [--train-limit 300] [--size PX] [--threads N] [--set KEY=VALUE ...]
        [--json OUT] [--keep DIR]
    python benchmarks/protocol.py --dataset mvtec --root DIR [--classes bottle,screw] --models a,b ... (as elpv)
    python benchmarks/protocol.py --merge seed0.json seeds12.json [--json OUT]   # one table from several runs

One-class protocols (see benchmarks/README.md):

- ``one-abnormal`` (GANomaly, Skip-GANomaly): train on the training images of every class but the chosen one;
  test on the dataset's test split with the chosen class anomalous and the others good. GANomaly's official
  code instead pools the training and test normals and splits them 80/20 (and reports the best test AUROC
  over epochs); we use the dataset's own train/test split, so its test normals are images no model saw.
- ``one-normal`` (GEOM, Deep SVDD): train on the chosen class's training images; test on the test split with
  that class good and every other class anomalous. ``--labelled-ratio G`` is Deep SAD's scenario: m labelled
  anomalies of one other class (``--labelled-class``, default the next one) join the training set in
  ``train/labelled/`` with G = m / (n + m) of it (the paper's gamma_l: 0.01, 0.05, 0.1, 0.2); the test is the same.
- ``few-shot`` (HTD, Metaformer: a new product with a handful of good images): for each k of ``--shots`` (default
  1, 5, 10) the model is trained on k good images of the chosen class, drawn per (seed, class) from its training
  split (one seeded permutation: the k = 1 image is among the k = 5 ones, and so on); the test is one-normal's (the
  test split, that class good, every other anomalous). The trainer always holds part of DIR/train/good out of the
  model to calibrate the threshold, so 2 more good images of the same draw (the fewest a threshold takes) are laid
  out beside the k, with calibration.holdout_fraction 2 / (k + 2) so that exactly k stay in the model, and
  ``training.select: last`` keeps them from choosing the epoch: they set only the shipped threshold, which no
  AUROC depends on. Several models (``--models``) run on the same draws; the table has one column block per k.
  ``FEW_SHOT_MODEL_OVERRIDES`` (printed in the header): PatchCore keeps its whole memory bank, GEOM scores with its
  simple score at k = 1.

Surface protocols: good parts of one kind against defective ones, what a station is for.

- ``elpv`` (``make elpv``): the chosen cell type's functional cells (defect probability 0) and defective ones
  (probability 1; the uncertain 1/3 and 2/3 are left out); per seed 300 functional cells drawn to train on, the
  other functional cells and every defective one to test on (mono: 300 train, 288 + 313 test).
- ``mvtec``: MVTec AD's category folders as they are; a per-category table beside published image AUROC.

Each surface run reports image AUROC and average precision, F1, recall and the false-alarm rate at the threshold
the bundle ships with, the best F1 over all thresholds (chosen on the test set, for reference: the gap to the F1
at the shipped threshold is the point), the fit time and img/s through the exported graph; mean ± std over seeds.

Why subprocesses: every (class, seed) is laid out as an MVTec-style folder (``train/good``, ``test/good``,
``test/abnormal``; grey datasets as single-channel PNG, colour ones as BGR PNG) and handed to
``python -m trainer.cli fit`` (and, one-class, ``... eval --json``), so the number is what a user of the
trainer gets: the same data reading, calibration hold-out, ONNX export, and scoring through the exported FP32
graph. The surface runs score the test folder in this process with the station's ONNX Runtime backend, which
also times the graph (the fit's own evaluation of the same graph is the cross-check printed under the table).

The one-class trainer config is the trainer's defaults plus ``CONFIG_BASE`` and the model's entry in
``MODEL_OVERRIDES`` below; the surface runs use the shipped settings plus ``SURFACE_CONFIG_BASE``; both are
printed in the table header, with ``--set`` keys. ``--train-limit`` / ``--test-limit`` subsample
(seeded, stratified by class) to fit small machines; the header says SUBSAMPLED when they cut anything.
Published numbers are printed beside ours only where a paper (or its official repository) gives them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar, Union

import cv2
import numpy as np
import yaml
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.cli import positive_int  # noqa: E402
from core.errors import UserError  # noqa: E402
from trainer.config import merge_config, with_overrides  # noqa: E402
from trainer.config import parse_override as parse_config_override  # noqa: E402
from trainer.datasets import (  # noqa: E402
    CIFAR10_CLASSES,
    DATASETS,
    ELPV_CELL_TYPES,
    ELPV_TRAIN,
    FASHION_MNIST_CLASSES,
    IMAGE_EXTENSIONS,
    MNIST_CLASSES,
    MVTEC_CATEGORIES,
    ElpvCell,
    LabelledImages,
    elpv_data_dir,
    elpv_split,
    load_dataset,
    mvtec_categories,
    read_elpv_labels,
)

PROG = "protocol"
PROTOCOLS = ("one-abnormal", "one-normal", "few-shot")
DEFAULT_SHOTS = (1, 5, 10)  # HTD's few-shot settings (Sheynin et al. 2021)
CHANCE = 50.0
DEFAULT_SIZE = 32  # GANomaly's protocol input size (isize 32)
TEST_DRAW_KEY = 1_000_003  # seeds the test subsample, shared by every class of a seed
LABELLED_DRAW_KEY = 1_000_033  # seeds the draw of labelled anomalies (--labelled-ratio)
SHOTS_DRAW_KEY = 1_000_037  # seeds the few-shot draw of training images, one permutation per (seed, class)

# Written into every run's trainer config: the hold-out explicitly (what calibrates the threshold), and no
# FP16 graph (only the FP32 graph is scored; converting costs time).
# codec_augment off: the papers' protocols train and test on the same lossless images (no station codec between).
CONFIG_BASE: dict[str, Any] = {"calibration": {"holdout_fraction": 0.2}, "export": {"fp16": False},
                               "codec_augment": {"enabled": False}}

# Per-model overrides of the trainer's defaults for these datasets, merged over CONFIG_BASE.
MODEL_OVERRIDES: dict[str, dict[str, Any]] = {
    # The defaults' fine taps [2, 4] suit small scratches on parts; telling one object class from another is
    # semantic, so deeper taps (stride 8 and 16). Fashion-MNIST classes 0, 2, 6 at 64 px, 500 training
    # images, seed 0: [4, 10] 88.1 mean AUROC, [2, 4] 83.7 and about 5x slower (benchmarks/README.md).
    "patchcore": {"backbone": {"layers": [4, 10]}},
}
# Merged over CONFIG_BASE for --protocol few-shot: the hold-out (FEW_SHOT_HOLDOUT good images beside the k) sets
# only the threshold; choosing an epoch on two images would be selection on data the k-shot model is not given.
FEW_SHOT_BASE: dict[str, Any] = {"training": {"select": "last"}}
# Good images laid out beside the k for the trainer's calibration hold-out: a threshold needs at least 2 normal
# scores (core/thresholds.py), so calibration.holdout_fraction is 2 / (k + 2) per k.
FEW_SHOT_HOLDOUT = 2
# Few-shot overrides of one model at one k (None: at every k), merged after MODEL_OVERRIDES, with the reason the
# header prints. GEOM's Dirichlet score is a maximum-likelihood fit per transformation to the training normals'
# softmax outputs: with one image it is undefined (Minka's precision divides by E[p] log E[p] - E[log p] = 0, so
# NaN), so at k = 1 GEOM scores with the paper's simple score (the mean of softmax(T_t x)[t]). PatchCore keeps its
# whole memory bank: its 2.5 % coreset of k images' 16 patches (taps [4, 10] at 32 px) is 1, 2 and 4 patches at
# k = 1, 5, 10; Fashion-MNIST classes 0 and 1, seed 0, 300 test images: coreset 72.4 / 36.7 / 68.3 and
# 85.0 / 78.6 / 95.9, whole bank 64.8 / 69.8 / 73.6 and 90.4 / 93.3 / 94.6 (k = 1 / 5 / 10).
FEW_SHOT_MODEL_OVERRIDES: dict[tuple[str, Optional[int]], tuple[dict[str, Any], str]] = {
    ("geom", 1): ({"geom": {"score": "simple"}}, "its Dirichlet score is undefined on one training image"),
    ("patchcore", None): ({"patchcore": {"coreset_ratio": 1.0}},
                          "the whole bank: a 2.5 % coreset of k images' patches keeps 1 to 4 of them"),
}


def few_shot_overrides(model: str, shots: int) -> dict[str, Any]:
    """FEW_SHOT_MODEL_OVERRIDES of ``model`` at k = ``shots``: its every-k entry, then its entry for this k."""
    every = FEW_SHOT_MODEL_OVERRIDES.get((model, None), ({}, ""))[0]
    return merge_config(every, FEW_SHOT_MODEL_OVERRIDES.get((model, shots), ({}, ""))[0])

DATASET_TITLES = {"fashion-mnist": "Fashion-MNIST", "mnist": "MNIST", "cifar10": "CIFAR-10", "folder": "image folder"}
# Class order the published numbers are indexed by; they are shown only when the dataset's names match it.
STANDARD_CLASSES = {"fashion-mnist": FASHION_MNIST_CLASSES, "mnist": MNIST_CLASSES, "cifar10": CIFAR10_CLASSES}


@dataclass(frozen=True)
class Reference:
    """Published image AUROC (%) of one method under one (dataset, protocol), by class in the standard order."""

    method: str
    model: str  # the --model name of our implementation of that method, matched ignoring case, '-' and '_'
    per_class: Optional[tuple[float, ...]]  # None: the paper gives only the mean
    mean: Optional[float]  # the paper's own mean; None: it gives none
    source: str


_GEOM = "Golan & El-Yaniv 2018 (GEOM)"
_DSVDD = "Ruff et al. 2018 (Deep SVDD)"
_GANOMALY = "Akcay et al. 2018 (GANomaly), as tabulated in the Skip-GANomaly paper (Akcay et al. 2019)"
PUBLISHED: dict[tuple[str, str], tuple[Reference, ...]] = {
    ("cifar10", "one-abnormal"): (
        Reference("GANomaly", "ganomaly",
                  (63.3, 63.1, 51.0, 58.7, 59.3, 62.8, 68.3, 60.5, 61.6, 61.7), None, _GANOMALY),
        Reference("Skip-GANomaly", "skipganomaly",
                  (79.7, 95.3, 44.8, 60.7, 60.2, 61.5, 93.1, 78.8, 65.9, 90.7), None,
                  "Akcay et al. 2019 (Skip-GANomaly)"),
    ),
    ("cifar10", "one-normal"): (
        Reference("GEOM", "geom", (74.7, 95.7, 78.1, 72.4, 87.8, 87.8, 83.4, 95.5, 93.3, 91.3), 86.0, _GEOM),
        Reference("Deep SVDD", "deepsvdd",
                  (61.7, 65.9, 50.8, 59.1, 60.9, 65.7, 67.7, 67.3, 75.9, 73.1), 64.8, _DSVDD),
    ),
    ("fashion-mnist", "one-normal"): (
        Reference("GEOM", "geom", (99.4, 97.6, 91.1, 89.9, 92.1, 93.4, 83.3, 98.9, 90.8, 99.2), 93.5, _GEOM),
    ),
    ("mnist", "one-normal"): (Reference("Deep SVDD", "deepsvdd", None, 94.8, _DSVDD),),
}
KNOWN_REFERENCES = "GANomaly, Skip-GANomaly, GEOM, Deep SVDD"


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


@dataclass(frozen=True)
class ShownReference:
    """A published column of the table: the reference and its header label."""

    ref: Reference
    label: str
    same_method: bool


def references_for(dataset: str, protocol: str, model: str,
                   class_names: Sequence[str]) -> tuple[list[ShownReference], list[str]]:
    """Published columns for this run and notes on them.

    The reference whose method is ``model`` is shown alone; otherwise every reference of this (dataset,
    protocol), labelled as another method. None when the dataset's class names are not the standard order.
    """
    refs = PUBLISHED.get((dataset, protocol), ())
    standard = STANDARD_CLASSES.get(dataset)
    if refs and standard is not None and [_norm(c) for c in class_names] != [_norm(c) for c in standard]:
        return [], [f"n/a: the class folders ({', '.join(class_names)}) are not {DATASET_TITLES[dataset]}'s "
                    "standard classes in the standard order, so no published number is matched to them"]
    if not refs:
        return [], [f"n/a: nothing published for {DATASET_TITLES[dataset]}, {protocol}, in the references used "
                    f"here ({KNOWN_REFERENCES})"]
    own = [r for r in refs if r.model == _norm(model)]
    if own:
        return [ShownReference(r, f"{r.method} (paper)", True) for r in own], []
    return [ShownReference(r, f"{r.method} (ref., other method)", False) for r in refs], []


# --- splits -------------------------------------------------------------------------------------------------

def stratified_subsample(labels: np.ndarray, limit: Optional[int], key: Sequence[int]) -> np.ndarray:
    """Sorted indices of at most ``limit`` rows, each class keeping its share of ``labels``; all when it fits.

    Seeded by ``key``; shares are rounded by largest remainder, so the count is exactly ``limit``. Classes
    are drawn in label order from one generator (for a single class: ``rng.choice(rows, limit)``).
    """
    n = len(labels)
    if limit is None or limit >= n:
        return np.arange(n)
    classes, counts = np.unique(labels, return_counts=True)
    exact = limit * counts / n
    quota = np.floor(exact).astype(int)
    quota[np.argsort(-(exact - quota), kind="stable")[: limit - int(quota.sum())]] += 1
    rng = np.random.default_rng(list(key))
    picks = [rng.choice(np.flatnonzero(labels == c), q, replace=False) for c, q in zip(classes, quota, strict=True)]
    return np.sort(np.concatenate(picks))


@dataclass
class Split:
    """Rows of the train and test splits one (class, seed) run uses, and which test rows are anomalous."""

    train_idx: np.ndarray
    test_idx: np.ndarray
    test_anomalous: np.ndarray
    n_train_pool: int
    n_test_pool: int
    labelled_idx: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # training rows, train/labelled/


def normal_classes(protocol: str, chosen: int, n_classes: int) -> list[int]:
    """The classes trained on: the chosen one (one-normal, few-shot) or all the others (one-abnormal)."""
    return [c for c in range(n_classes) if c != chosen] if protocol == "one-abnormal" else [chosen]


def shot_files(shots: int, holdout_fraction: float) -> int:
    """Training images to lay out so that exactly ``shots`` stay in the model after the trainer's calibration
    hold-out of at least FEW_SHOT_HOLDOUT (trainer.calibrate.split_holdout, the trainer's own arithmetic): the
    fewest such counts."""
    from trainer.calibrate import split_holdout

    for n in range(shots + FEW_SHOT_HOLDOUT, 2 * shots + 12):
        if len(split_holdout(n, holdout_fraction, 0)[0]) == shots:
            return n
    raise UserError(f"--shots {shots}: no training-set size leaves exactly {shots} images in the model at "
                    f"calibration.holdout_fraction {holdout_fraction}; choose another k or hold-out fraction")


def labelled_count(ratio: float, n_normal: int) -> int:
    """m labelled anomalies for Deep SAD's gamma_l = m / (n + m) with n normal training images (at least 1)."""
    return max(1, round(ratio * n_normal / (1 - ratio)))


def labelled_class_of(chosen: int, labelled_class: Optional[int], n_classes: int) -> int:
    """The anomaly class the labelled anomalies come from: the given one, else the class after the normal one."""
    return (chosen + 1) % n_classes if labelled_class is None else labelled_class


def plan_split(train_labels: np.ndarray, test_labels: np.ndarray, chosen: int, protocol: str, seed: int,
               train_limit: Optional[int], test_limit: Optional[int], n_classes: int,
               labelled_ratio: Optional[float] = None, labelled_class: Optional[int] = None,
               shot_count: Optional[int] = None) -> Split:
    """The (class, seed) split: seeded training draw over the normal classes, the seed's test draw, the labels,
    and (one-normal with ``labelled_ratio``) the seeded draw of labelled anomalies from the training split.

    few-shot: ``shot_count`` training images (k plus the hold-out, shot_files) are the first of one seeded
    permutation of the class's training rows per (seed, class), so smaller k draw a subset of larger k's images;
    the test is one-normal's."""
    pool = np.flatnonzero(np.isin(train_labels, normal_classes(protocol, chosen, n_classes)))
    if protocol == "few-shot":
        if shot_count is None or shot_count > len(pool):
            raise UserError(f"class {chosen}: few-shot needs {shot_count} training images of it, the training "
                            f"split has {len(pool)}")
        order = np.random.default_rng([seed, chosen, SHOTS_DRAW_KEY]).permutation(pool)
        train_idx = np.sort(order[:shot_count])
    else:
        train_idx = pool[stratified_subsample(train_labels[pool], train_limit, (seed, chosen))]
    test_idx = stratified_subsample(test_labels, test_limit, (seed, TEST_DRAW_KEY))
    chosen_rows = test_labels[test_idx] == chosen
    anomalous = chosen_rows if protocol == "one-abnormal" else ~chosen_rows
    labelled = np.zeros(0, np.int64)
    if labelled_ratio is not None:
        rows = np.flatnonzero(train_labels == labelled_class_of(chosen, labelled_class, n_classes))
        m = min(labelled_count(labelled_ratio, len(train_idx)), len(rows))
        labelled = np.sort(np.random.default_rng([seed, chosen, LABELLED_DRAW_KEY]).choice(rows, m, replace=False))
    return Split(train_idx, test_idx, anomalous, len(pool), len(test_labels), labelled)


def layout_split(folder: Path, train: LabelledImages, test: LabelledImages, split: Split) -> dict[str, int]:
    """Write the split as ``folder/train/good``, ``folder/test/good``, ``folder/test/abnormal`` PNGs.

    Files are named by their row in the dataset's split (``012345.png``); grey images stay single-channel.
    Returns the count per sub-folder.
    """
    plan = [("train/good", train.images, split.train_idx),
            *([("train/labelled", train.images, split.labelled_idx)] if len(split.labelled_idx) else []),
            ("test/good", test.images, split.test_idx[~split.test_anomalous]),
            ("test/abnormal", test.images, split.test_idx[split.test_anomalous])]
    counts: dict[str, int] = {}
    for sub, images, rows in plan:
        out = folder / sub
        out.mkdir(parents=True, exist_ok=True)
        for row in rows:
            path = out / f"{int(row):06d}.png"
            if not cv2.imwrite(str(path), images[row]):
                raise UserError(f"{path}: cannot write this PNG (disk full or folder not writable?)")
        counts[sub] = len(rows)
    return counts


# --- trainer config and the CLI -----------------------------------------------------------------------------

def trainer_config(model: str, size: Optional[int], overrides: Sequence[tuple[str, Any]] = (),
                   base: Optional[dict[str, Any]] = None,
                   model_overrides: Optional[dict[str, dict[str, Any]]] = None) -> dict[str, Any]:
    """The config the runs use: input size (None: the model's own), ``base`` (CONFIG_BASE), the model's entry in
    ``model_overrides`` (MODEL_OVERRIDES), then ``--set`` keys."""
    sized: dict[str, Any] = {"input": {"height": size, "width": size}} if size is not None else {}
    cfg = merge_config(merge_config(sized, CONFIG_BASE if base is None else base),
                       (MODEL_OVERRIDES if model_overrides is None else model_overrides).get(model, {}))
    return with_overrides(cfg, overrides)


def parse_override(text: str) -> tuple[str, Any]:
    """``--set a.b=VALUE`` for argparse (trainer.config.parse_override)."""
    try:
        return parse_config_override(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _flat(cfg: dict[str, Any], prefix: str = "") -> list[str]:
    """``a.b=value`` pairs of a nested dict, for the table header."""
    out: list[str] = []
    for key, value in cfg.items():
        if isinstance(value, dict):
            out += _flat(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={json.dumps(value)}")
    return out


class CliFailure(Exception):
    """An edge-train step exited non-zero; carries its last stderr lines."""

    def __init__(self, step: str, what: str, tail: list[str]) -> None:
        super().__init__(f"edge-train {step} {what}")
        self.step, self.tail = step, tail


def run_cli(args: Sequence[str], verbose: bool, env: Optional[dict[str, str]] = None) -> str:
    """``python -m trainer.cli ARGS`` from the repository root; returns stdout. Stderr is streamed when verbose."""
    cmd = [sys.executable, "-m", "trainer.cli", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    stdout: list[str] = []
    reader = threading.Thread(target=lambda: stdout.append(proc.stdout.read() if proc.stdout else ""), daemon=True)
    reader.start()
    tail: deque[str] = deque(maxlen=15)
    for line in proc.stderr:
        tail.append(line.rstrip("\n"))
        if verbose:
            print(f"    {line}", end="", file=sys.stderr, flush=True)
    proc.wait()
    reader.join()
    if proc.returncode:
        code = proc.returncode
        raise CliFailure(args[0], f"was killed by signal {-code}" if code < 0 else f"exited with status {code}",
                         list(tail))
    return "".join(stdout)


@dataclass
class Cell:
    """One (class, seed) run: its metrics from ``edge-train eval --json`` and what it was trained and tested on."""

    cls: int
    seed: int
    image_auroc: float
    metrics: dict[str, Any]
    n_train: int
    n_train_pool: int
    n_test: int
    n_test_pool: int
    n_test_anomalous: int
    seconds: float
    fit_seconds: float
    eval_seconds: float
    bundle: Optional[str] = None
    device: Optional[str] = None
    n_labelled: int = 0  # labelled anomalies in train/labelled/ (--labelled-ratio)
    model: Optional[str] = None  # few-shot: the model of this cell (several per run); else Settings.model
    shots: Optional[int] = None  # few-shot: k, the good images in the model (n_train - k are the trainer's hold-out)


def _bundle_device(bundle: Path) -> Optional[str]:
    """The device the trainer recorded in the bundle's report.json (what fit used, else the config's), if any."""
    try:
        report = json.loads((bundle / "report.json").read_text())
    except (OSError, ValueError):
        return None
    for section in ("fit", "config"):
        value = report.get(section, {}).get("device") if isinstance(report.get(section), dict) else None
        if value:
            return str(value)
    return None


@dataclass
class Settings:
    """The command line, validated."""

    dataset: str
    protocol: str
    model: str
    classes: Optional[list[int]]
    seeds: int
    epochs: Optional[int]
    train_limit: Optional[int]
    test_limit: Optional[int]
    device: Optional[str]
    data: Optional[Path]
    size: Optional[int]
    json_path: Optional[Path]
    keep: Optional[Path]
    verbose: bool
    overrides: tuple[tuple[str, Any], ...] = ()
    models: tuple[str, ...] = ()  # every model of a surface run (``model`` is the first)
    cells: tuple[str, ...] = ()  # elpv: the cell types
    root: Optional[Path] = None  # elpv: its data folder (default the installed package); mvtec: MVTec AD's folder
    class_names: Optional[list[str]] = None  # mvtec: the chosen categories
    threads: Optional[int] = None  # math-library threads of the trainer and ONNX Runtime's (None: their defaults)
    first_seed: int = 0  # seeds first_seed .. first_seed + seeds - 1 (more seeds for a table run earlier)
    labelled_ratio: Optional[float] = None  # one-normal: Deep SAD's gamma_l of labelled anomalies in training
    labelled_class: Optional[int] = None  # ... drawn from this class (None: the one after the normal class)
    shots: tuple[int, ...] = ()  # few-shot: the k of each column block

    @property
    def run_models(self) -> tuple[str, ...]:
        """The models trained per (class, seed): all of ``models`` for few-shot, else the one ``model``."""
        return (self.models or (self.model,)) if self.protocol == "few-shot" else (self.model,)

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.first_seed, self.first_seed + self.seeds))


def protocol_config(settings: Settings, model: str, shots: Optional[int] = None) -> dict[str, Any]:
    """``model``'s trainer config for a one-class run, or a few-shot one with ``shots`` = k (FEW_SHOT_BASE and a
    hold-out fraction of FEW_SHOT_HOLDOUT / (k + FEW_SHOT_HOLDOUT); ``--set`` keys still come last)."""
    if shots is None:
        return trainer_config(model, settings.size, settings.overrides)
    base = merge_config(merge_config(CONFIG_BASE, FEW_SHOT_BASE),
                        {"calibration": {"holdout_fraction": FEW_SHOT_HOLDOUT / (shots + FEW_SHOT_HOLDOUT)}})
    own = merge_config(MODEL_OVERRIDES.get(model, {}), few_shot_overrides(model, shots))
    return trainer_config(model, settings.size, settings.overrides, base=base, model_overrides={model: own})


def holdout_fraction_of(config: dict[str, Any]) -> float:
    """The trainer's calibration.holdout_fraction under ``config`` (its default where the config names none)."""
    from trainer.config import parse_train_config

    return float(parse_train_config(yaml.safe_dump(config)).calibration.holdout_fraction)


def run_cell(settings: Settings, train: LabelledImages, test: LabelledImages, chosen: int, seed: int,
             workdir: Path, config_path: Path, model: Optional[str] = None, shots: Optional[int] = None,
             shot_count: Optional[int] = None) -> Cell:
    """Lay out one (class, seed[, k]) split under ``workdir`` (once: the models of a few-shot run share it), fit
    a bundle of ``model`` (default Settings.model) on it with edge-train and evaluate it."""
    t0 = time.monotonic()
    model = model or settings.model
    split = plan_split(train.labels, test.labels, chosen, settings.protocol, seed, settings.train_limit,
                       settings.test_limit, len(train.classes), settings.labelled_ratio, settings.labelled_class,
                       shot_count)
    n_bad = int(split.test_anomalous.sum())
    if n_bad == 0 or n_bad == len(split.test_idx):
        raise UserError(f"class {chosen}, seed {seed}: the test set has no {'anomalous' if n_bad == 0 else 'good'} "
                        "images, so AUROC is undefined; raise --test-limit or check the test folders")
    data_dir, engines = workdir / "data", workdir / f"engines-{model}"
    if not data_dir.is_dir():
        layout_split(data_dir, train, test, split)
    fit_args = ["fit", "--data", str(data_dir), "--model", model, "--out", str(engines),
                "--config", str(config_path), "--seed", str(seed)]
    if settings.epochs is not None:
        fit_args += ["--epochs", str(settings.epochs)]
    if settings.device is not None:
        fit_args += ["--device", settings.device]
    env = _thread_env(settings.threads)
    t_fit = time.monotonic()
    lines = [ln for ln in run_cli(fit_args, settings.verbose, env).splitlines() if ln.strip()]
    bundle = Path(lines[-1].strip()) if lines else None
    if bundle is None or not bundle.is_dir():
        raise CliFailure("fit", "printed no bundle folder as its last line", lines[-5:])
    t_eval = time.monotonic()
    out = run_cli(["eval", str(bundle), "--data", str(data_dir), "--json"], settings.verbose, env).strip()
    try:
        metrics = json.loads(out.splitlines()[-1])
        auroc = float(metrics["image_auroc"])
    except (ValueError, IndexError, KeyError, TypeError):
        raise CliFailure("eval", "printed no JSON object with an image_auroc", out.splitlines()[-5:]) from None
    t_end = time.monotonic()
    return Cell(cls=chosen, seed=seed, image_auroc=auroc, metrics=metrics, n_train=len(split.train_idx),
                n_train_pool=split.n_train_pool, n_test=len(split.test_idx), n_test_pool=split.n_test_pool,
                n_test_anomalous=n_bad, seconds=t_end - t0, fit_seconds=t_eval - t_fit, eval_seconds=t_end - t_eval,
                bundle=str(bundle) if settings.keep else None, device=_bundle_device(bundle),
                n_labelled=len(split.labelled_idx), model=model, shots=shots)


def run_protocol(settings: Settings, train: LabelledImages, test: LabelledImages, classes: Sequence[int],
                 workroot: Path, progress: Callable[[Cell], None] = lambda _c: None) -> list[Cell]:
    """Every (class, seed[, k, model]) cell, seeds outermost; each (class, seed[, k]) folder is removed after
    its models unless ``--keep``."""
    few_shot = settings.protocol == "few-shot"
    shot_list: list[Optional[int]] = list(settings.shots) if few_shot else [None]
    configs: dict[tuple[str, Optional[int]], Path] = {}
    counts: dict[Optional[int], Optional[int]] = {None: None}
    for k in shot_list:
        files = set()
        for model in settings.run_models:
            configs[model, k] = workroot / (f"train-{model}" + (f"-k{k}" if k is not None else "") + ".yaml")
            config = protocol_config(settings, model, k)
            configs[model, k].write_text(yaml.safe_dump(config, sort_keys=False))
            if k is not None:
                files.add(shot_files(k, holdout_fraction_of(config)))
        if len(files) > 1:
            raise UserError("the models' calibration.holdout_fraction differ, so their few-shot training folders "
                            "would too; give every model the same hold-out fraction")
        if k is not None:
            counts[k] = files.pop()
    cells: list[Cell] = []
    for seed in settings.seed_list:
        for chosen in classes:
            for k in shot_list:
                workdir = workroot / (f"class{chosen}-seed{seed}" + (f"-k{k}" if k is not None else ""))
                try:
                    for model in settings.run_models:
                        try:
                            cells.append(run_cell(settings, train, test, chosen, seed, workdir, configs[model, k],
                                                  model if few_shot else None, k, counts[k]))
                        except CliFailure as exc:
                            where = f"{model}, k = {k}, " if few_shot else ""
                            exc.args = (f"{where}class {chosen}, seed {seed}: {exc.args[0]}",)
                            raise
                        progress(cells[-1])
                finally:
                    if not settings.keep:
                        shutil.rmtree(workdir, ignore_errors=True)
    return cells


# --- the table ----------------------------------------------------------------------------------------------

def _mean_std(values: Sequence[float]) -> tuple[float, Optional[float]]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _published_mean(ref: Reference, classes: Sequence[int], n_classes: int) -> tuple[Optional[float], Optional[str]]:
    """The reference's value for the mean row, and a note when it is not simply the paper's mean."""
    if len(classes) == n_classes and ref.mean is not None:
        return ref.mean, None
    if ref.per_class is None:
        return None, f"{ref.method}: the paper gives only the mean over all {n_classes} classes"
    value = statistics.fmean(ref.per_class[c] for c in classes)
    if len(classes) == n_classes:
        return value, f"{ref.method} mean: of its per-class numbers (the paper gives no mean)"
    return value, f"{ref.method} mean: of its per-class numbers over the same {len(classes)} class(es)"


def summarise(cells: Sequence[Cell], classes: Sequence[int], seeds: Sequence[int], class_names: Sequence[str],
              refs: Sequence[ShownReference]) -> dict[str, Any]:
    """Every cell of the table in %: rows by class, the mean row, and notes on the published columns."""
    by = {(c.cls, c.seed): 100 * c.image_auroc for c in cells}
    rows = []
    for cls in classes:
        values = [by[(cls, s)] for s in seeds]
        mean, std = _mean_std(values)
        rows.append({"class": cls, "name": class_names[cls], "auroc": values, "mean": mean, "std": std,
                     "published": {r.label: (r.ref.per_class[cls] if r.ref.per_class else None) for r in refs},
                     "chance": CHANCE})
    per_seed = [statistics.fmean(by[(cls, s)] for cls in classes) for s in seeds]
    mean, std = _mean_std(per_seed)
    notes: list[str] = []
    published: dict[str, Optional[float]] = {}
    for r in refs:
        published[r.label], note = _published_mean(r.ref, classes, len(class_names))
        if note:
            notes.append(note)
    return {"rows": rows, "mean_row": {"auroc": per_seed, "mean": mean, "std": std, "published": published,
                                       "chance": CHANCE}, "notes": notes}


def _counts(used: set[int], pool: set[int]) -> str:
    """'all 10000' or '1000 of 6000' (several values joined by '/': per-class pools may differ)."""
    used_s, pool_s = "/".join(map(str, sorted(used))), "/".join(map(str, sorted(pool)))
    return f"all {pool_s}" if used == pool else f"{used_s} of {pool_s}"


def header_lines(settings: Settings, cells: Sequence[Cell], train: LabelledImages,
                 refs: Sequence[ShownReference]) -> list[str]:
    """What was run: protocol, data used (SUBSAMPLED or full sets), model, config, epochs, size, device, refs."""
    title = DATASET_TITLES[settings.dataset]
    n = len(train.classes)
    if settings.protocol == "one-normal":
        what = (f"one class normal (train on that class's training images; test split: that class good, "
                f"the other {n - 1} anomalous)")
        if settings.labelled_ratio is not None:
            source = ("the class after the normal one" if settings.labelled_class is None
                      else f"class {settings.labelled_class}")
            counts = ", ".join(map(str, sorted({c.n_labelled for c in cells})))
            what += (f"; Deep SAD's scenario: labelled anomalies of {source} in train/labelled/, gamma_l = "
                     f"{settings.labelled_ratio} of the training set ({counts} images)")
    else:
        what = (f"one class abnormal (train on the other {n - 1} classes' training images; test split: that class "
                "anomalous, the others good; the dataset's own train/test split, not GANomaly's pooled 80/20)")
    used_train, pool_train = {c.n_train for c in cells}, {c.n_train_pool for c in cells}
    used_test, pool_test = {c.n_test for c in cells}, {c.n_test_pool for c in cells}
    subsampled = used_train != pool_train or used_test != pool_test
    draw = " (drawn stratified over the normal classes)" if settings.protocol == "one-abnormal" else " (drawn)"
    data = (f"{'SUBSAMPLED' if subsampled else 'full sets'}: {_counts(used_train, pool_train)} training images per "
            f"run{draw if used_train != pool_train else ''}, "
            f"{_counts(used_test, pool_test)} test images{' (stratified by class)' if used_test != pool_test else ''}"
            + ("; each seed draws its own subsets" if subsampled else ""))
    shape = train.images.shape
    kind = "grey" if train.images.ndim == 3 else "BGR"
    devices = sorted({c.device for c in cells if c.device})
    device = settings.device or (f"not passed (bundle report: {', '.join(devices)})" if devices else "not passed")
    cfg = trainer_config(settings.model, settings.size, settings.overrides)
    lines = [
        f"{title}, {what}; image AUROC (%) by {'normal' if settings.protocol == 'one-normal' else 'abnormal'} class",
        data,
        f"model {settings.model}: input {settings.size}x{settings.size} (from {shape[2]}x{shape[1]} {kind}), "
        f"epochs {settings.epochs if settings.epochs is not None else 'not passed (model default)'}, device {device}; "
        f"trainer config: defaults + {', '.join(_flat({k: v for k, v in cfg.items() if k != 'input'}))} "
        "(the hold-out is kept out of training to calibrate the threshold)",
        f"seeds {','.join(map(str, settings.seed_list))} (edge-train fit --seed and the subsets); scored by "
        "edge-train eval through the exported ONNX graph (FP32)",
    ]
    for r in refs:
        lines.append(f"{r.label}: {r.ref.source}, published"
                     + ("" if r.same_method else "; a different method, for reference only, not a reproduction"))
    return lines


def _fmt(value: Optional[float], width: int) -> str:
    return f"{'n/a' if value is None else f'{value:.1f}':>{width}}"


def format_table(summary: dict[str, Any], header: Sequence[str], seeds: Sequence[int],
                 refs: Sequence[ShownReference], extra_notes: Sequence[str], footer: str) -> str:
    """The printed table: header, one row per class, the mean row, notes."""
    labels = [r.label for r in refs] or ["published"]
    names = [f"{row['class']} {row['name']}" for row in summary["rows"]]
    name_w = max([len(n) for n in names] + [len("class"), len("mean")]) + 2
    cols = [max(len(label), 5) + 2 for label in labels]

    def line(name: str, values: Sequence[float], mean: float, std: Optional[float], published: dict[str, Any],
             chance: float) -> str:
        spread = f"{mean:.1f} ± {std:.1f}" if std is not None else f"{mean:.1f}"
        pub = "".join(_fmt(published.get(label), w) for label, w in zip(labels, cols, strict=True))
        return f"{name:<{name_w}}" + "".join(f"{v:>8.1f}" for v in values) + f"{spread:>14}" + pub + f"{chance:>8.1f}"

    lines = [*header, "",
             f"{'class':<{name_w}}" + "".join(f"{'seed ' + str(s):>8}" for s in seeds) + f"{'mean ± std':>14}"
             + "".join(f"{label:>{w}}" for label, w in zip(labels, cols, strict=True)) + f"{'chance':>8}"]
    for name, row in zip(names, summary["rows"], strict=True):
        lines.append(line(name, row["auroc"], row["mean"], row["std"], row["published"], row["chance"]))
    m = summary["mean_row"]
    lines.append(line("mean", m["auroc"], m["mean"], m["std"], m["published"], m["chance"]))
    lines += ["", "std: sample std over seeds (the mean row: mean and std of the per-seed means over the classes "
              "shown); chance: a random score's AUROC", *summary["notes"], *extra_notes, footer]
    return "\n".join(lines)


# --- the few-shot table: one column block per k, one column per model in each --------------------------------

def summarise_few_shot(cells: Sequence[Cell], classes: Sequence[int], seeds: Sequence[int],
                       class_names: Sequence[str], models: Sequence[str], shots: Sequence[int]) -> dict[str, Any]:
    """Every cell of the few-shot table in %: rows by class and the mean row, each with one entry per (k, model)
    (the seeds' values, their mean and sample std; the mean row: of the per-seed means over the classes)."""
    by = {(c.shots, c.model, c.cls, c.seed): 100 * c.image_auroc for c in cells}
    columns = [(k, m) for k in shots for m in models]

    def entry(k: int, m: str, values: list[float]) -> dict[str, Any]:
        mean, std = _mean_std(values)
        return {"shots": k, "model": m, "auroc": values, "mean": mean, "std": std}

    rows = [{"class": cls, "name": class_names[cls], "chance": CHANCE,
             "columns": [entry(k, m, [by[(k, m, cls, s)] for s in seeds]) for k, m in columns]} for cls in classes]
    mean_row = {"chance": CHANCE, "columns": [
        entry(k, m, [statistics.fmean(by[(k, m, cls, s)] for cls in classes) for s in seeds]) for k, m in columns]}
    return {"rows": rows, "mean_row": mean_row,
            "notes": ["published: none for a few-shot protocol in the references used here "
                      f"({KNOWN_REFERENCES})"]}


def few_shot_header(settings: Settings, cells: Sequence[Cell], train: LabelledImages) -> list[str]:
    """What was run: the protocol, the draws and the hold-out, the models' configs, the seeds."""
    n = len(train.classes)
    holdout = ", ".join(f"k = {k}: {sorted({c.n_train - k for c in cells if c.shots == k})[0]}"
                        for k in settings.shots)
    used_test, pool_test = {c.n_test for c in cells}, {c.n_test_pool for c in cells}
    shape = train.images.shape
    kind = "grey" if train.images.ndim == 3 else "BGR"
    devices = sorted({c.device for c in cells if c.device})
    device = settings.device or (f"not passed (bundle report: {', '.join(devices)})" if devices else "not passed")
    lines = [
        f"{DATASET_TITLES[settings.dataset]}, few-shot (train on k good images of that class, drawn per seed from "
        f"its training images; test split as one-normal: that class good, the other {n - 1} anomalous); image "
        "AUROC (%) by normal class, one column block per k",
        f"{_counts(used_test, pool_test)} test images{' (stratified by class)' if used_test != pool_test else ''}; "
        f"beside the k, h more good images of the same draw are the trainer's calibration hold-out ({holdout}; "
        "calibration.holdout_fraction h / (k + h)): they set only the shipped threshold (training.select last: no "
        "epoch is chosen on them)",
    ]
    for model in settings.run_models:
        # every k's config but the hold-out fraction (in the line above) and FEW_SHOT_MODEL_OVERRIDES (below)
        cfg = trainer_config(model, settings.size, settings.overrides, base=merge_config(CONFIG_BASE, FEW_SHOT_BASE))
        keys = [kv for kv in _flat({k: v for k, v in cfg.items() if k != "input"})
                if not kv.startswith("calibration.holdout_fraction=") or "calibration.holdout_fraction" in
                dict(settings.overrides)]
        lines.append(f"{model}: input {settings.size}x{settings.size} (from {shape[2]}x{shape[1]} {kind}), epochs "
                     f"{settings.epochs if settings.epochs is not None else 'not passed (model default)'}; trainer "
                     f"config: defaults + {', '.join(keys)}")
        for k in (None, *settings.shots):
            if (model, k) in FEW_SHOT_MODEL_OVERRIDES:
                keys_k, why = FEW_SHOT_MODEL_OVERRIDES[model, k]
                where = "at every k" if k is None else f"at k = {k} only"
                lines.append(f"{model} {where}: {', '.join(_flat(keys_k))} ({why})")
    lines.append(f"seeds {','.join(map(str, settings.seed_list))} (edge-train fit --seed and the draws); device "
                 f"{device}; threads {settings.threads or 'not set (the libraries default)'}; scored by edge-train "
                 "eval through the exported ONNX graph (FP32)")
    return lines


def format_few_shot_table(summary: dict[str, Any], header: Sequence[str], models: Sequence[str],
                          shots: Sequence[int], extra_notes: Sequence[str], footer: str) -> str:
    """The printed few-shot table: a 'k = N' line over each block of model columns, mean ± std over seeds."""
    names = [f"{row['class']} {row['name']}" for row in summary["rows"]]
    name_w = max([len(n) for n in names] + [len("class"), len("mean")]) + 2
    col_w = max([len(m) for m in models] + [11]) + 2
    block_w = col_w * len(models)

    def cell(e: dict[str, Any]) -> str:
        return f"{e['mean']:.1f}" + (f" ± {e['std']:.1f}" if e["std"] is not None else "")

    def line(name: str, row: dict[str, Any]) -> str:
        return f"{name:<{name_w}}" + "".join(f"{cell(e):>{col_w}}" for e in row["columns"]) + f"{row['chance']:>8.1f}"

    lines = [*header, "",
             " " * name_w + "".join(f"{f'k = {k}':>{block_w}}" for k in shots),
             f"{'class':<{name_w}}" + "".join(f"{m:>{col_w}}" for _ in shots for m in models) + f"{'chance':>8}"]
    lines += [line(name, row) for name, row in zip(names, summary["rows"], strict=True)]
    lines.append(line("mean", summary["mean_row"]))
    lines += ["", "mean ± sample std over seeds (the mean row: of the per-seed means over the classes shown); chance: "
              "a random score's AUROC", *summary["notes"], *extra_notes, footer]
    return "\n".join(lines)


# --- surface protocols: elpv solar cells, MVTec AD ----------------------------------------------------------

SURFACE_DATASETS = ("elpv", "mvtec")
# The shipped settings (config/train.yaml's defaults, codec-robust training included), with no FP16 graph: only
# the FP32 graph is scored, and converting costs time. Nothing is tuned per dataset here; --set changes a key.
SURFACE_CONFIG_BASE: dict[str, Any] = {"export": {"fp16": False}}

_PATCHCORE_REPO = ("PatchCore's official repository (amazon-science/patchcore-inspection), "
                   "models/IM224_WR50_L2-3_P01_D1024-1024_PS-3_AN-1/results.csv: WRN-50 layer2+3, 224 px, 10 % "
                   "coreset, instance_auroc; its README gives the mean as 99.2 %")
# Published image AUROC (%) on MVTec AD, per category in MVTEC_CATEGORIES' order where a source gives it.
PUBLISHED_MVTEC: tuple[Reference, ...] = (
    Reference("PatchCore", "patchcore",
              (100.00, 99.68, 97.93, 98.60, 97.91, 100.00, 100.00, 99.90, 96.67, 98.77, 99.49, 100.00, 99.87,
               99.12, 99.50), 99.16, _PATCHCORE_REPO),
    Reference("PaDiM", "padim", None, 95.3,
              "Defard et al. 2020, WR50-Rd550, image ROCAUC over all 15 categories (as recorded by sotaverified.org; "
              "PaDiM has no official repository, and no per-category image AUROC of the paper was confirmed here)"),
)


@dataclass
class SurfaceRun:
    """One (model, cell type or category, seed) run: its metrics and what it cost."""

    model: str
    cls: str
    seed: int
    metrics: dict[str, Any]
    n_train: int
    n_test_good: int
    n_test_defect: int
    fit_seconds: float  # the model's fit stage (report.json metrics.fit_seconds)
    trainer_seconds: float  # the whole `edge-train fit` process: data check, fit, export, calibrate, parity, evaluate
    images_per_second: float  # test images / time through the exported graph (frames already at input size)
    score_batch: int
    input_hw: tuple[int, int]
    report_metrics: dict[str, Any]  # the fit's own evaluate stage (the numbers `edge-train eval` prints)
    bundle: Optional[str] = None
    device: Optional[str] = None


@dataclass(frozen=True)
class SurfaceData:
    """The folder one (cell type or category, seed) is trained and tested from, and its counts."""

    cls: str
    folder: Path
    n_train: int
    n_test_good: int
    n_test_defect: int
    laid_out: bool  # written by the runner (removed afterwards unless --keep), not the user's own folder


def operating_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, Any]:
    """What a station does at ``threshold`` (flag when score >= threshold) and what the ranking allows.

    Image AUROC and average precision (ranking); F1, recall, precision and the false-alarm rate at the threshold;
    the best F1 over every threshold and that threshold, chosen on these very scores, so for reference only.
    """
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels).astype(int)
    if not 0 < labels.sum() < len(labels):
        raise UserError("the test set needs both good and defective images for AUROC and F1")
    flagged = scores >= threshold
    tp = int((flagged & (labels == 1)).sum())
    fp = int((flagged & (labels == 0)).sum())
    fn = int((~flagged & (labels == 1)).sum())
    tn = int((~flagged & (labels == 0)).sum())
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1s = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
    best = int(np.argmax(f1s))
    return {
        "image_auroc": float(roc_auc_score(labels, scores)),
        "average_precision": float(average_precision_score(labels, scores)),
        "threshold": float(threshold),
        "f1": 2 * tp / (2 * tp + fp + fn),
        "recall": tp / (tp + fn),
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "false_alarm_rate": fp / (fp + tn),
        "best_f1": float(f1s[best]),
        "best_f1_threshold": float(thresholds[best]),
        "confusion": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
    }


def score_through_graph(bundle_dir: Path, data_dir: Path, threads: Optional[int]) -> tuple[np.ndarray, np.ndarray,
                                                                                           float, int, Any]:
    """Score ``data_dir/test`` through the bundle's model.onnx with the station's ONNX Runtime backend (CPU).

    The images are read and fitted to the input size as ``edge-train eval`` reads them (``trainer.data``), then
    timed through the graph alone in batches of the bundle's max batch after one warm-up batch. Returns scores,
    labels, images per second, the batch and the bundle.
    """
    from core.bundle import load_bundle
    from edge.backends.onnxruntime import OrtBackend
    from trainer.data import load_test

    bundle = load_bundle(bundle_dir)
    test = load_test(data_dir, bundle.input_hw, bundle.input_resize)
    if test is None:
        raise UserError(f"{data_dir / 'test'}: no test folder")
    batch = bundle.max_batch or 16
    backend = OrtBackend(bundle.onnx_path, max_batch=batch, intra_op_threads=threads or 0,
                         providers=["CPUExecutionProvider"], warmup=False)
    backend.infer(test.images[:batch])  # the first run allocates
    t0 = time.perf_counter()
    scores = backend.infer(test.images)["score"]
    seconds = time.perf_counter() - t0
    backend.close()
    return scores, np.asarray(test.labels), len(scores) / seconds, batch, bundle


def _copy_cells(paths: Sequence[Path], out: Path) -> None:
    """Copy elpv's PNGs as they are (8-bit grey, single channel) into ``out``; a missing file names itself."""
    out.mkdir(parents=True, exist_ok=True)
    for path in paths:
        try:
            shutil.copyfile(path, out / path.name)
        except OSError as exc:
            raise UserError(f"{path}: cannot copy this image ({exc.strerror}); reinstall the dataset "
                            "(make elpv) or check --root") from None


def elpv_data(cells: Sequence[ElpvCell], cell_type: str, seed: int, n_train: int, folder: Path) -> SurfaceData:
    """Lay out seed ``seed``'s elpv split as ``folder/train/good``, ``folder/test/good``, ``folder/test/defect``."""
    split = elpv_split(cells, cell_type, seed, n_train)
    for sub, paths in (("train/good", split.train), ("test/good", split.test_good), ("test/defect", split.test_defect)):
        _copy_cells(paths, folder / sub)
    return SurfaceData(cell_type, folder, len(split.train), len(split.test_good), len(split.test_defect), True)


def _count_images(folder: Path) -> int:
    return sum(1 for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def mvtec_data(root: Path, category: str) -> SurfaceData:
    """MVTec AD's category folder as it is: the trainer reads its layout (train/good, test/*, ground_truth/*)."""
    folder = (root / category).resolve()
    test = folder / "test"
    good = _count_images(test / "good")
    defect = sum(_count_images(p) for p in test.iterdir() if p.is_dir() and p.name != "good")
    return SurfaceData(category, folder, _count_images(folder / "train" / "good"), good, defect, False)


def _thread_env(threads: Optional[int]) -> Optional[dict[str, str]]:
    """The trainer's environment with its math libraries held to ``threads`` (None: the trainer's own defaults)."""
    if threads is None:
        return None
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[key] = str(threads)
    return env


def _report_of(bundle: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((bundle / "report.json").read_text()))
    except (OSError, ValueError):
        raise CliFailure("fit", f"wrote no readable report.json in {bundle}", []) from None


def run_surface(settings: Settings, model: str, data: SurfaceData, seed: int, workdir: Path,
                config_path: Path) -> SurfaceRun:
    """Fit ``model`` on ``data`` with edge-train (seed ``seed``), then score its test set through the graph."""
    engines = workdir / "engines"
    fit_args = ["fit", "--data", str(data.folder), "--model", model, "--out", str(engines), "--config",
                str(config_path), "--seed", str(seed)]
    if settings.epochs is not None:
        fit_args += ["--epochs", str(settings.epochs)]
    if settings.device is not None:
        fit_args += ["--device", settings.device]
    t0 = time.monotonic()
    lines = [ln for ln in run_cli(fit_args, settings.verbose, _thread_env(settings.threads)).splitlines()
             if ln.strip()]
    trainer_seconds = time.monotonic() - t0
    bundle = Path(lines[-1].strip()) if lines else None
    if bundle is None or not bundle.is_dir():
        raise CliFailure("fit", "printed no bundle folder as its last line", lines[-5:])
    report = _report_of(bundle)
    scores, labels, per_second, batch, loaded = score_through_graph(bundle, data.folder, settings.threads)
    metrics = operating_metrics(scores, labels, loaded.threshold)
    report_metrics = dict(report.get("metrics") or {})
    metrics["pixel_auroc"] = report_metrics.get("pixel_auroc")
    return SurfaceRun(model=model, cls=data.cls, seed=seed, metrics=metrics, n_train=data.n_train,
                      n_test_good=data.n_test_good, n_test_defect=data.n_test_defect,
                      fit_seconds=float(report_metrics.get("fit_seconds") or 0.0), trainer_seconds=trainer_seconds,
                      images_per_second=per_second, score_batch=batch, input_hw=loaded.input_hw,
                      report_metrics=report_metrics, bundle=str(bundle) if settings.keep else None,
                      device=_bundle_device(bundle))


def surface_config(settings: Settings, model: str) -> dict[str, Any]:
    """``model``'s trainer config for the surface runs: shipped settings, SURFACE_CONFIG_BASE, ``--size``, ``--set``."""
    return trainer_config(model, settings.size, settings.overrides, base=SURFACE_CONFIG_BASE, model_overrides={})


def run_surface_protocol(settings: Settings, classes: Sequence[str], workroot: Path,
                         progress: Callable[[SurfaceRun], None] = lambda _r: None) -> list[SurfaceRun]:
    """Every (seed, class, model) run, seeds outermost; a seed's laid-out data is shared by the models."""
    configs = {}
    for model in settings.models:
        configs[model] = workroot / f"train-{model}.yaml"
        configs[model].write_text(yaml.safe_dump(surface_config(settings, model), sort_keys=False))
    cells = read_elpv_labels(elpv_data_dir(settings.root) / "labels.csv") if settings.dataset == "elpv" else []
    runs: list[SurfaceRun] = []
    for seed in settings.seed_list:
        for cls in classes:
            folder = workroot / f"{cls}-seed{seed}"
            if settings.dataset == "elpv":
                data = elpv_data(cells, cls, seed, settings.train_limit or ELPV_TRAIN, folder / "data")
            else:
                assert settings.root is not None
                data = mvtec_data(settings.root, cls)
            try:
                for model in settings.models:
                    try:
                        runs.append(run_surface(settings, model, data, seed, folder / model, configs[model]))
                    except CliFailure as exc:
                        exc.args = (f"{model}, {cls}, seed {seed}: {exc.args[0]}",)
                        raise
                    progress(runs[-1])
            finally:
                if not settings.keep:
                    shutil.rmtree(folder, ignore_errors=True)
    return runs


# Columns of the surface table: run metric key, header; values in %.
SURFACE_COLUMNS = (("image_auroc", "AUROC"), ("average_precision", "AP"), ("f1", "F1@thr"), ("best_f1", "best F1"),
                   ("recall", "recall@thr"), ("false_alarm_rate", "false al.@thr"), ("pixel_auroc", "pixel AUROC"))


def _spread(values: Sequence[Optional[float]]) -> dict[str, Any]:
    """Mean and sample std (None for one value) of values in %; all None when any value is missing."""
    if any(v is None for v in values):
        return {"values": list(values), "mean": None, "std": None}
    pct = [100 * float(v) for v in values if v is not None]
    mean, std = _mean_std(pct)
    return {"values": pct, "mean": mean, "std": std}


def surface_references(dataset: str, model: str) -> Optional[Reference]:
    """The published MVTec AD reference of ``model``'s method, if any (elpv: none in the references used here)."""
    if dataset != "mvtec":
        return None
    return next((r for r in PUBLISHED_MVTEC if r.model == _norm(model)), None)


def summarise_surface(runs: Sequence[SurfaceRun], models: Sequence[str], classes: Sequence[str],
                      seeds: Sequence[int], dataset: str) -> list[dict[str, Any]]:
    """The table's rows: per model, one per class (mean ± std over seeds), then its mean over classes (the mean and
    std of the per-seed means) when there are several, each with the published image AUROC where one exists."""
    by = {(r.model, r.cls, r.seed): r for r in runs}
    rows: list[dict[str, Any]] = []
    for model in models:
        ref = surface_references(dataset, model)
        for cls in classes:
            mine = [by[(model, cls, s)] for s in seeds]
            published = (ref.per_class[MVTEC_CATEGORIES.index(cls)]
                         if ref and ref.per_class and cls in MVTEC_CATEGORIES else None)
            rows.append({"model": model, "class": cls, "published": published,
                         **{key: _spread([r.metrics.get(key) for r in mine]) for key, _ in SURFACE_COLUMNS},
                         "fit_seconds": statistics.fmean(r.fit_seconds for r in mine),
                         "trainer_seconds": statistics.fmean(r.trainer_seconds for r in mine),
                         "images_per_second": statistics.fmean(r.images_per_second for r in mine)})
        if len(classes) > 1:
            mean_row: dict[str, Any] = {"model": model, "class": "mean"}
            for key, _ in SURFACE_COLUMNS:
                per_seed = [[by[(model, c, s)].metrics.get(key) for c in classes] for s in seeds]
                mean_row[key] = _spread([None if any(v is None for v in vs)
                                         else statistics.fmean(float(v) for v in vs if v is not None)
                                         for vs in per_seed])
            whole = ref is not None and ref.mean is not None and set(classes) == set(MVTEC_CATEGORIES)
            subset = (ref is not None and ref.per_class is not None
                      and all(c in MVTEC_CATEGORIES for c in classes))
            mean_row["published"] = (ref.mean if whole and ref is not None else
                                     statistics.fmean(ref.per_class[MVTEC_CATEGORIES.index(c)] for c in classes)
                                     if subset and ref is not None and ref.per_class is not None else None)
            for key in ("fit_seconds", "trainer_seconds", "images_per_second"):
                mean_row[key] = statistics.fmean(row[key] for row in rows if row["model"] == model)
            rows.append(mean_row)
    return rows


def _cell_text(spread: dict[str, Any]) -> str:
    if spread["mean"] is None:
        return "n/a"
    return f"{spread['mean']:.1f}" + (f" ± {spread['std']:.1f}" if spread["std"] is not None else "")


def format_surface_table(rows: Sequence[dict[str, Any]], header: Sequence[str], notes: Sequence[str],
                         footer: str, with_published: bool) -> str:
    """The printed table: the header (the command first), one row per (model, class), notes."""
    columns = [(k, h) for k, h in SURFACE_COLUMNS if any(row[k]["mean"] is not None for row in rows)]
    model_w = max(len("model"), *(len(r["model"]) for r in rows)) + 2
    class_w = max(len("class"), *(len(r["class"]) for r in rows)) + 2
    widths = [max(len(h), 11) + 2 for _, h in columns]
    cols = zip(columns, widths, strict=True)
    title = (f"{'model':<{model_w}}{'class':<{class_w}}" + "".join(f"{h:>{w}}" for (_, h), w in cols)
             + f"{'fit s':>8}{'total s':>9}{'img/s':>8}" + (f"{'published AUROC':>17}" if with_published else ""))
    lines = [*header, "", title]
    for row in rows:
        pub = ("n/a" if row.get("published") is None else f"{row['published']:.1f}") if with_published else ""
        lines.append(f"{row['model']:<{model_w}}{row['class']:<{class_w}}"
                     + "".join(f"{_cell_text(row[k]):>{w}}" for (k, _), w in zip(columns, widths, strict=True))
                     + f"{row['fit_seconds']:>8.1f}{row['trainer_seconds']:>9.1f}{row['images_per_second']:>8.1f}"
                     + (f"{pub:>17}" if with_published else ""))
    return "\n".join([*lines, "", *notes, footer])


def surface_header(settings: Settings, command: Sequence[str], runs: Sequence[SurfaceRun],
                   classes: Sequence[str]) -> list[str]:
    """What was run, in words: the command, the data and its split, the models' settings, how it was scored."""
    n_train = sorted({r.n_train for r in runs})
    lines = [f"command: {shlex.join(command)}"]
    if settings.dataset == "elpv":
        cells = read_elpv_labels(elpv_data_dir(settings.root) / "labels.csv")
        parts = []
        for cls in classes:
            split = elpv_split(cells, cls, 0, settings.train_limit or ELPV_TRAIN)
            parts.append(f"{cls}: {len(split.train)} train, {len(split.test_good)} functional + "
                         f"{len(split.test_defect)} defective test ({split.n_uncertain} rated 1/3 or 2/3 left out)")
        lines += [f"elpv solar cells ({settings.root or 'the installed elpv-dataset package'}): functional = defect "
                  "probability 0, defective = 1.0; the uncertain 1/3 and 2/3 are left out; each seed draws its own "
                  "functional training cells, the other functional cells and every defective one are the test",
                  "; ".join(parts)]
    else:
        lines += [f"MVTec AD ({settings.root}): each category folder as it is (its train/good, its test/ split; "
                  "nothing drawn); seeds vary only the trainer's seed (hold-out draw, coreset, channel draw)",
                  f"categories: {', '.join(classes)}"]
    lines.append(f"training: of each run's {'/'.join(map(str, n_train))} training images the trainer holds "
                 "calibration.holdout_fraction (0.2) out of the model to calibrate the threshold the bundle ships "
                 "with, on normal images only (no defects seen)")
    for model in settings.models:
        cfg = surface_config(settings, model)
        hw = {tuple(r.input_hw) for r in runs if r.model == model}
        lines.append(f"{model}: input {', '.join(f'{h}x{w}' for h, w in sorted(hw))}; trainer config: shipped "
                     f"defaults + {', '.join(_flat(cfg))}")
    devices = sorted({r.device for r in runs if r.device})
    lines += [
        f"seeds {','.join(map(str, settings.seed_list))}; device {settings.device or 'not passed'}"
        + (f" (bundle report: {', '.join(devices)})" if devices else "")
        + f"; {os.cpu_count()} CPUs, threads {settings.threads or 'not set (the libraries default)'}",
        "scored through each bundle's exported FP32 ONNX graph with the station's ONNX Runtime backend (CPU) in "
        f"batches of the bundle's max batch ({'/'.join(map(str, sorted({r.score_batch for r in runs})))}): "
        "AUROC, AP; F1, recall and false alarms at the threshold the bundle ships with (edge-train eval's "
        "operating point); best F1 over all thresholds, chosen on the test set, for reference only",
        "values in %, mean ± sample std over seeds; fit s: the model's fit stage; total s: the whole edge-train "
        "fit (data check to manifest); img/s: test images through the graph alone (already at input size)",
    ]
    return lines


def surface_notes(settings: Settings, runs: Sequence[SurfaceRun], classes: Sequence[str]) -> list[str]:
    """The published references' sources and the cross-check against the fit's own evaluation."""
    notes: list[str] = []
    if settings.dataset == "mvtec":
        for model in settings.models:
            ref = surface_references(settings.dataset, model)
            if ref is None:
                notes.append(f"{model}: no published MVTec AD number in the references used here (PatchCore, PaDiM)")
                continue
            notes.append(f"{model}: published column = {ref.method}, {ref.source}; another backbone and input size "
                         "and the whole train/good in the model, so for reference, not a reproduction")
            if ref.per_class is None and set(classes) != set(MVTEC_CATEGORIES):
                notes.append(f"{ref.method}: only the mean over all 15 categories is published; not shown for a "
                             "subset")
    else:
        notes.append("published: none for this protocol in the references used here")
    diffs = [abs(r.metrics[key] - float(r.report_metrics[key])) for r in runs for key in ("image_auroc", "f1")
             if isinstance(r.report_metrics.get(key), (int, float))]
    if diffs:
        notes.append(f"cross-check: AUROC and F1 here vs the fit's own evaluate stage (edge-train eval's numbers) "
                     f"differ by at most {max(diffs):.2g}")
    return notes


def surface_main(settings: Settings, command: Sequence[str], started: datetime) -> int:
    """Run a surface protocol and print (and keep) its table; 0, or 2 on a user error or a failed trainer step."""
    t0 = time.monotonic()

    def progress(r: SurfaceRun) -> None:
        m = r.metrics
        print(f"{r.model} {r.cls} seed {r.seed}: AUROC {100 * m['image_auroc']:.1f}, AP "
              f"{100 * m['average_precision']:.1f}, F1@thr {100 * m['f1']:.1f} (best {100 * m['best_f1']:.1f}); "
              f"fit {r.fit_seconds:.1f} s, {r.images_per_second:.1f} img/s", file=sys.stderr, flush=True)

    try:
        if settings.dataset == "elpv":
            classes = list(settings.cells)
        else:
            assert settings.root is not None
            classes = mvtec_categories(settings.root, settings.class_names)
        runs = in_work_dir(settings.keep, lambda work: run_surface_protocol(settings, classes, work, progress))
        header = surface_header(settings, command, runs, classes)
    except CliFailure as exc:
        for line in exc.tail:
            print(f"  | {line}", file=sys.stderr)
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except UserError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    seconds = time.monotonic() - t0
    seeds = settings.seed_list
    rows = summarise_surface(runs, settings.models, classes, seeds, settings.dataset)
    notes = surface_notes(settings, runs, classes)
    footer = f"{len(runs)} runs in {seconds / 60:.1f} min"
    print(format_surface_table(rows, header, notes, footer, settings.dataset == "mvtec"))
    if settings.json_path is not None:
        doc = {"command": list(command), "command_line": shlex.join(command),
               "started_utc": started.isoformat(timespec="seconds"), "seconds": round(seconds, 1),
               "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()},
               "trainer_config": {m: surface_config(settings, m) for m in settings.models},
               "classes": classes, "header": header, "notes": notes, "rows": rows,
               "runs": [asdict(r) for r in runs]}
        settings.json_path.write_text(json.dumps(doc, indent=1, default=_json_default) + "\n")
    return 0


@dataclass(frozen=True)
class Merge:
    """``--merge``: the JSON files of surface runs to print as one table (and ``--json``, where to keep it)."""

    paths: tuple[Path, ...]
    json_path: Optional[Path]


def merge_surface_runs(merge: Merge) -> str:
    """One table from the runs of several ``--json`` files (more seeds of a table run earlier): the same dataset,
    the same trainer settings per model, no run twice, every (model, class, seed) present."""
    docs = []
    for path in merge.paths:
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"--merge {path}: cannot read it as JSON ({exc}); give files written by --json") from None
        if not isinstance(doc, dict) or "runs" not in doc or doc.get("settings", {}).get("dataset") not in \
                SURFACE_DATASETS:
            raise UserError(f"--merge {path}: not the --json file of an elpv or mvtec run")
        docs.append(doc)
    dataset = docs[0]["settings"]["dataset"]
    configs: dict[str, Any] = {}
    runs: dict[tuple[str, str, int], SurfaceRun] = {}
    for path, doc in zip(merge.paths, docs, strict=True):
        if doc["settings"]["dataset"] != dataset:
            raise UserError(f"--merge {path}: dataset {doc['settings']['dataset']}, the first file's is {dataset}")
        for model, config in doc["trainer_config"].items():
            if configs.setdefault(model, config) != config:
                raise UserError(f"--merge {path}: {model} was trained with other settings than in an earlier file; "
                                "merge only runs of the same settings")
        for raw in doc["runs"]:
            run = SurfaceRun(**{**raw, "input_hw": tuple(raw["input_hw"])})
            key = (run.model, run.cls, run.seed)
            if key in runs:
                raise UserError(f"--merge {path}: {run.model} {run.cls} seed {run.seed} is in an earlier file too")
            runs[key] = run
    models = list(dict.fromkeys(k[0] for k in runs))
    classes = list(dict.fromkeys(k[1] for k in runs))
    seeds = sorted({k[2] for k in runs})
    missing = [f"{m} {c} seed {s}" for m in models for c in classes for s in seeds if (m, c, s) not in runs]
    if missing:
        raise UserError(f"--merge: no run of {', '.join(missing)}; every model needs every class and seed")
    rows = summarise_surface(list(runs.values()), models, classes, seeds, dataset)
    header = [f"merged: {path} ({doc['command_line']})" for path, doc in zip(merge.paths, docs, strict=True)]
    seed_text = f"seeds {','.join(map(str, seeds))}"
    header += list(dict.fromkeys(re.sub(r"^seeds [0-9,]+", seed_text, line) for doc in docs
                                 for line in doc["header"] if not line.startswith("command:")))
    notes = list(docs[0]["notes"])
    table = format_surface_table(rows, header, notes, f"{len(runs)} runs from {len(docs)} files", dataset == "mvtec")
    if merge.json_path is not None:
        merge.json_path.write_text(json.dumps({"merged": [str(p) for p in merge.paths], "header": header,
                                               "notes": notes, "rows": rows,
                                               "runs": [asdict(r) for r in runs.values()]},
                                              indent=1, default=_json_default) + "\n")
    return table


# --- command line -------------------------------------------------------------------------------------------

def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}': expected comma-separated class indices, e.g. 0,1,2") from None
    if not values or any(v < 0 for v in values) or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"'{text}': expected distinct class indices >= 0")
    return values


def _name_list(text: str) -> list[str]:
    values = [x.strip() for x in text.split(",") if x.strip()]
    if not values or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"'{text}': expected distinct comma-separated names, e.g. patchcore,padim")
    return values


def parse_args(argv: Optional[Sequence[str]]) -> Union[Settings, Merge]:
    """The command line as Settings; a bad argument is argparse's one-line error and exit 2."""
    ap = argparse.ArgumentParser(prog=PROG, description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--dataset", choices=(*DATASETS, *SURFACE_DATASETS), help="required, except with --merge")
    ap.add_argument("--protocol", choices=PROTOCOLS, help="one-class datasets only (the surface datasets, elpv and "
                    "mvtec, have one protocol: good parts against defective ones)")
    ap.add_argument("--shots", help="few-shot: the k good training images of each column block, comma-separated "
                    f"(default {','.join(map(str, DEFAULT_SHOTS))})")
    ap.add_argument("--model", action="append", default=[], dest="model_list",
                    help="registered model name (edge-train fit --model); repeatable for elpv and mvtec")
    ap.add_argument("--models", type=_name_list, default=[],
                    help="comma-separated model names, e.g. patchcore,padim (elpv, mvtec, few-shot)")
    ap.add_argument("--classes", help="chosen classes: indices, e.g. 0,1,2 (one-class datasets), or MVTec AD "
                    "category names, e.g. bottle,screw (default: all)")
    ap.add_argument("--cell", type=_name_list, dest="cells",
                    help=f"elpv: the cell type(s), {' or '.join(ELPV_CELL_TYPES)} (comma-separated for both)")
    ap.add_argument("--root", type=Path, help="mvtec: the MVTec AD folder (bottle/, cable/, ...); elpv: a folder "
                    "with its labels.csv and images/ (default: the installed elpv-dataset package, make elpv)")
    ap.add_argument("--seeds", type=positive_int, default=3, help="number of seeds, 0..N-1 (default 3)")
    ap.add_argument("--first-seed", type=int, default=0, help="start the seeds here: --first-seed 1 --seeds 2 runs "
                    "seeds 1 and 2, e.g. to add seeds to a table run earlier (--merge joins the JSON files)")
    ap.add_argument("--epochs", type=positive_int, help="edge-train fit --epochs (default: not passed)")
    ap.add_argument("--train-limit", type=positive_int, help="at most K training images per run (default all); "
                    f"elpv: the functional cells trained on per seed (default {ELPV_TRAIN})")
    ap.add_argument("--test-limit", type=positive_int, help="at most T test images, stratified by class (default all)")
    ap.add_argument("--device", help="edge-train fit --device, e.g. auto, cpu, cuda (default: not passed)")
    ap.add_argument("--data", type=Path, help="dataset folder (default for fashion-mnist: the Debian package's)")
    ap.add_argument("--size", type=int, help=f"model input px, a multiple of 16, >= 32 (default {DEFAULT_SIZE}, "
                    "GANomaly's, for the one-class datasets; the model's own shipped size for elpv and mvtec)")
    ap.add_argument("--threads", type=positive_int, help="math-library threads of the trainer and ONNX Runtime "
                    "threads of the scoring (default: the libraries' own); the img/s column depends on it")
    ap.add_argument("--json", type=Path, dest="json_path", help="also write every cell and the settings here")
    ap.add_argument("--keep", type=Path, help="keep the laid-out folders and bundles in this new or empty folder")
    ap.add_argument("--set", type=parse_override, action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                    help="a trainer config key for every run, e.g. patchcore.coreset_ratio=0.1 or "
                    "backbone.layers=[2,4] (repeatable)")
    ap.add_argument("--labelled-ratio", type=float, help="one-normal: Deep SAD's gamma_l, the share m / (n + m) of "
                    "labelled anomalies in the training set, e.g. 0.05 (default none)")
    ap.add_argument("--labelled-class", type=int, help="with --labelled-ratio: the class the labelled anomalies "
                    "come from (default the class after the normal one)")
    ap.add_argument("-v", "--verbose", action="store_true", help="stream the trainer's log to stderr")
    ap.add_argument("--merge", nargs="+", type=Path, metavar="JSON", help="print one table from the --json files of "
                    "surface runs (e.g. seed 0 run first, then --first-seed 1 --seeds 2); nothing is trained")
    a = ap.parse_args(argv)
    if a.merge:
        return Merge(tuple(a.merge), a.json_path)
    if a.dataset is None:
        ap.error("the following arguments are required: --dataset (or --merge JSON ...)")
    if a.first_seed < 0:
        ap.error(f"--first-seed {a.first_seed}: must be >= 0")
    surface = a.dataset in SURFACE_DATASETS
    models = list(dict.fromkeys([*a.model_list, *a.models]))
    if not models:
        ap.error("give the model(s): --model NAME (repeatable) or --models a,b")
    if a.size is not None and (a.size < 32 or a.size % 16):
        ap.error(f"--size {a.size}: must be a multiple of 16 and at least 32")
    if a.keep is not None and a.keep.exists() and (not a.keep.is_dir() or any(a.keep.iterdir())):
        ap.error(f"--keep {a.keep}: exists and is not an empty folder; give a new or empty one")
    if a.json_path is not None and not a.json_path.parent.resolve().is_dir():
        ap.error(f"--json {a.json_path}: folder {a.json_path.parent} does not exist")
    classes: Optional[list[int]] = None
    class_names: Optional[list[str]] = None
    shots: tuple[int, ...] = ()
    if surface:
        if a.protocol is not None:
            ap.error(f"--protocol is for the one-class datasets; --dataset {a.dataset} has one protocol")
        if a.dataset == "elpv":
            if not a.cells or any(c not in ELPV_CELL_TYPES for c in a.cells):
                ap.error(f"--dataset elpv needs --cell {' or '.join(ELPV_CELL_TYPES)} (or mono,poly)")
            if a.classes:
                ap.error("--classes is not for elpv; choose the cell type with --cell")
        elif a.root is None:
            ap.error("--dataset mvtec needs --root DIR, the MVTec AD folder holding bottle/, cable/, ...")
        elif a.cells:
            ap.error("--cell is for elpv only")
        class_names = _name_list(a.classes) if a.classes and a.dataset == "mvtec" else None
        if a.shots is not None:
            ap.error("--shots needs --protocol few-shot")
    else:
        if a.protocol is None:
            ap.error(f"--dataset {a.dataset} needs --protocol {' or '.join(PROTOCOLS)}")
        if len(models) > 1 and a.protocol != "few-shot":
            ap.error("one model per one-class run; several models (--models) are for --dataset elpv or mvtec and "
                     "--protocol few-shot")
        if a.protocol == "few-shot":
            if a.train_limit is not None:
                ap.error("--train-limit is not for few-shot: the k of --shots are the training images")
            try:
                shots = tuple(_int_list(a.shots)) if a.shots is not None else DEFAULT_SHOTS
            except argparse.ArgumentTypeError:
                ap.error(f"--shots {a.shots}: expected distinct counts >= 1, e.g. 1,5,10")
            if min(shots) < 1:
                ap.error(f"--shots {a.shots}: expected distinct counts >= 1, e.g. 1,5,10")
        elif a.shots is not None:
            ap.error("--shots needs --protocol few-shot")
        if a.cells or a.root is not None:
            ap.error("--cell and --root are for --dataset elpv and mvtec; the one-class datasets take --data")
        if a.labelled_ratio is not None and (a.protocol != "one-normal" or not 0 < a.labelled_ratio < 1):
            ap.error(f"--labelled-ratio {a.labelled_ratio}: needs --protocol one-normal and a share in (0, 1), "
                     "e.g. 0.05")
        if a.labelled_class is not None and a.labelled_ratio is None:
            ap.error("--labelled-class needs --labelled-ratio")
        if a.classes is not None:
            try:
                classes = _int_list(a.classes)
            except argparse.ArgumentTypeError as exc:
                ap.error(f"--classes: {exc}")
    return Settings(dataset=a.dataset, protocol=a.protocol or "surface", model=models[0], classes=classes,
                    seeds=a.seeds, epochs=a.epochs, train_limit=a.train_limit, test_limit=a.test_limit,
                    device=a.device, data=a.data, size=a.size if surface or a.size is not None else DEFAULT_SIZE,
                    json_path=a.json_path, keep=a.keep, verbose=a.verbose, overrides=tuple(a.overrides),
                    models=tuple(models), cells=tuple(a.cells or ()), root=a.root, class_names=class_names,
                    threads=a.threads, first_seed=a.first_seed, labelled_ratio=a.labelled_ratio,
                    labelled_class=a.labelled_class, shots=shots)


def load_splits(settings: Settings) -> tuple[LabelledImages, LabelledImages, list[int]]:
    """Both splits of the dataset and the chosen classes, checked against each other."""
    train = load_dataset(settings.dataset, "train", settings.data)
    test = load_dataset(settings.dataset, "test", settings.data)
    if train.classes != test.classes:
        raise UserError(f"{settings.data}: test classes ({', '.join(test.classes)}) differ from the training "
                        f"classes ({', '.join(train.classes)}); give both splits the same class folders")
    if train.images.shape[1:] != test.images.shape[1:]:
        raise UserError(f"{settings.data}: training images are {train.images.shape[1:]}, test images "
                        f"{test.images.shape[1:]}; give both splits one size and channel count")
    n = len(train.classes)
    classes = settings.classes if settings.classes is not None else list(range(n))
    bad = [c for c in classes if c >= n]
    if bad:
        raise UserError(f"--classes {','.join(map(str, bad))}: the dataset has {n} classes (0..{n - 1})")
    return train, test, classes


def report_document(settings: Settings, command: Sequence[str], started: datetime, seconds: float,
                    classes: Sequence[int], class_names: Sequence[str], refs: Sequence[ShownReference],
                    ref_notes: Sequence[str], cells: Sequence[Cell], summary: dict[str, Any],
                    header: Sequence[str]) -> dict[str, Any]:
    """The --json document: the command line, settings, trainer config, every cell and every table cell."""
    return {"command": list(command), "command_line": shlex.join(command),
            "started_utc": started.isoformat(timespec="seconds"), "seconds": round(seconds, 1),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()},
            "trainer_config": (protocol_config(settings, settings.model) if settings.protocol != "few-shot"
                               else {f"{m} k={k}": protocol_config(settings, m, k) for m in settings.run_models
                                     for k in settings.shots}),
            "classes": list(classes),
            "class_names": list(class_names), "header": list(header),
            "references": [{"label": r.label, "same_method": r.same_method, **asdict(r.ref)} for r in refs],
            "cells": [asdict(c) for c in cells], "rows": summary["rows"], "mean_row": summary["mean_row"],
            "notes": [*summary["notes"], *ref_notes], "chance": CHANCE}


T = TypeVar("T")


def in_work_dir(keep: Optional[Path], run: Callable[[Path], T]) -> T:
    """``run(folder)`` in ``keep`` (created; absolute, since the trainer runs from the repository root), or in a
    temporary folder removed afterwards."""
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        return run(keep.resolve())
    with tempfile.TemporaryDirectory(prefix="protocol-") as tmp:
        return run(Path(tmp))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the protocol; 0 on success, 2 on a user error or a failed edge-train step (one line naming it)."""
    settings = parse_args(argv)
    if isinstance(settings, Merge):
        try:
            print(merge_surface_runs(settings))
        except UserError as exc:
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            return 2
        return 0
    started = datetime.now(timezone.utc)
    if settings.dataset in SURFACE_DATASETS:
        command = ["python", "benchmarks/protocol.py", *(sys.argv[1:] if argv is None else argv)]
        return surface_main(settings, command, started)
    t0 = time.monotonic()

    def progress(c: Cell) -> None:
        which = "" if c.shots is None else f"{c.model} k = {c.shots} "
        print(f"{which}class {c.cls} seed {c.seed}: AUROC {100 * c.image_auroc:.1f} ({c.n_train} train, "
              f"{c.n_test} test images; {c.seconds:.1f} s)", file=sys.stderr, flush=True)

    try:
        train, test, classes = load_splits(settings)
        refs, ref_notes = references_for(settings.dataset, settings.protocol, settings.model, train.classes)
        cells = in_work_dir(settings.keep, lambda work: run_protocol(settings, train, test, classes, work, progress))
    except CliFailure as exc:
        for line in exc.tail:
            print(f"  | {line}", file=sys.stderr)
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except UserError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    seconds = time.monotonic() - t0
    seeds = settings.seed_list
    footer = (f"{len(cells)} runs in {seconds / 60:.1f} min ({statistics.fmean(c.seconds for c in cells):.1f} s per "
              "run: lay out, fit, export, eval)")
    if settings.protocol == "few-shot":
        summary = summarise_few_shot(cells, classes, seeds, train.classes, settings.run_models, settings.shots)
        header = few_shot_header(settings, cells, train)
        print(format_few_shot_table(summary, header, settings.run_models, settings.shots, [], footer))
    else:
        summary = summarise(cells, classes, seeds, train.classes, refs)
        header = header_lines(settings, cells, train, refs)
        print(format_table(summary, header, seeds, refs, ref_notes, footer))
    if settings.json_path is not None:
        doc = report_document(settings, sys.argv if argv is None else [PROG, *argv], started, seconds, classes,
                              train.classes, refs, ref_notes, cells, summary, header)
        settings.json_path.write_text(json.dumps(doc, indent=1, default=_json_default) + "\n")
    return 0


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


if __name__ == "__main__":
    sys.exit(main())
