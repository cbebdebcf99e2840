"""Training images streamed from disk in batches (torch DataLoader), never all held in memory.

Nightly retraining sees tens of thousands of frames: each batch is read, fitted to the model input with the
station's own ``resize_frame`` and handed over as uint8 BGR [B,H,W,3], exactly what a station sends its
engine. The order of every epoch is a pure function of (seed, epoch), so an interrupted run resumes with the
same batches. Under DistributedDataParallel each rank reads its own part of every batch of the same permutation.
With codec-robust training on (trainer/degrade.py), a loader also yields degraded copies of each still.
With tiling (``input.tiles``, trainer/tiling.py), each image is fitted to the full frame size and cut into the
tiles the exported graph cuts, so a model learns tiles; ``whole=True`` loaders give the frames a station sends.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from core.preprocess import resize_frame
from trainer.data import ImageSet, read_image, read_original
from trainer.degrade import DRAWN, Degradation, expand
from trainer.tiling import frame_size, split_tiles

# (frame uint8 [H,W,3] BGR, rng) -> frame of the same shape: a model's training-time augmentation.
Augment = Callable[[np.ndarray, np.random.Generator], np.ndarray]


class FrameDataset(Dataset):
    """Image files -> uint8 BGR tensors [H,W,3] at the model input (read on demand, in the loader's workers).

    ``items`` are (path, copy): copy 0 is the image as it is, copy k > 0 a seeded draw of ``degradation``
    applied at the image's own resolution before it is fitted to the model input (as a station decodes,
    then resizes). ``tiles`` = (rows, cols): ``hw`` is the frame and an item is its rows*cols tiles
    [R*C, h, w, 3] of ``tile_hw`` every ``stride`` pixels (``collate_tiles`` joins them into one batch of tiles).
    """

    def __init__(self, items: Sequence[tuple[Path, int]], hw: tuple[int, int], resize: str = "stretch",
                 augment: Optional[Augment] = None, seed: int = 0,
                 degradation: Optional[Degradation] = None, degraded_share: float = 0.0,
                 tiles: Optional[tuple[int, int]] = None, tile_hw: Optional[tuple[int, int]] = None,
                 stride: Optional[tuple[int, int]] = None, fixed_draws: bool = False) -> None:
        self.items = list(items)
        self.fixed_draws = fixed_draws  # a degraded copy is the same frame every epoch (models that cache features)
        self.hw = hw
        self.resize = resize
        self.augment = augment
        self.seed = seed
        self.degradation = degradation
        self.degraded_share = degraded_share  # for DRAWN items: the chance an epoch shows the degraded one
        self.tiles = tiles
        self.tile_hw = tile_hw
        self.stride = stride
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> torch.Tensor:
        path, copy = self.items[index]
        if copy == DRAWN:
            draw = np.random.default_rng([self.seed, self.epoch, index, 1 << 20]).random()
            copy = 1 if draw < self.degraded_share else 0
        if copy and self.degradation is not None:
            rng = np.random.default_rng([self.seed, 0 if self.fixed_draws else self.epoch, index, copy])
            image = self.degradation.apply(read_original(path), rng)
            frame = resize_frame(image, self.hw, self.resize)
        else:
            frame = read_image(path, self.hw, self.resize)
        if self.tiles is not None:
            # each tile is a model input: the augmentation (written for one input) sees each on its own
            tiles = split_tiles(frame[None], self.tiles, self.tile_hw, self.stride)
            if self.augment is not None:
                rng = np.random.default_rng([self.seed, self.epoch, index])
                tiles = np.stack([self.augment(t, rng) for t in tiles])
            return torch.from_numpy(tiles)
        if self.augment is not None:
            frame = self.augment(frame, np.random.default_rng([self.seed, self.epoch, index]))
        return torch.from_numpy(np.ascontiguousarray(frame))


def collate_tiles(items: list[torch.Tensor]) -> torch.Tensor:
    """A batch of tiled images: their tiles [R*C, h, w, 3] each, one after the other, as one batch of tiles."""
    return torch.cat(items)


class EpochBatches(Sampler[list[int]]):
    """Batches of a seeded permutation per epoch (or of the plain order); under DDP each rank's part of each.

    The batches are those of one process (``batch_size`` images, the last dropped or kept); with ``world_size``
    ranks, rank r takes images r, r+world, ... of every batch. So every rank runs the same number of steps, and
    step k of all ranks together sees exactly batch k of a one-process run: with gradients averaged over the
    ranks (DDP) and a batch size that is a multiple of the world size, the update equals one process's
    (up to rounding and BatchNorm's per-rank batch statistics).
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int, drop_last: bool = False,
                 rank: int = 0, world_size: int = 1) -> None:
        self.n, self.batch_size, self.shuffle, self.seed, self.drop_last = n, batch_size, shuffle, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        order = (np.random.default_rng([self.seed, self.epoch]).permutation(self.n) if self.shuffle
                 else np.arange(self.n))
        for k in range(len(self)):
            batch = order[k * self.batch_size:(k + 1) * self.batch_size]
            yield batch[self.rank::self.world_size].tolist()

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)


def _quiet_worker(_worker_id: int) -> None:
    """Workers ignore Ctrl-C: the main process decides when to stop, after the current step."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@dataclass
class TrainingData:
    """What a model is fitted on: normal images to learn from, held-out normals, optional labelled val data.

    ``holdout_paths`` never enter training: they choose the epoch (models trained by epochs) and set the
    threshold. ``val`` is DIR/val (good + defect images) when the user supplied one. ``degraded_copies`` > 0
    (with ``degradation``): every loader also yields that many degraded copies of each still (the model's
    memory and statistics, the loop's validation and the calibration hold-out all see the station's codec).
    ``hw`` is the model's input. ``tiles`` = (rows, cols) (trainer/tiling.py): the station's frame is
    ``frame_hw`` (rows*h x cols*w, less the overlaps when ``tile_stride`` is less than the tile), cut into tiles
    of ``hw`` inside the graph; a loader then gives each image's tiles (what the model learns from and scores),
    ``whole=True`` the frames (what the tiled graph scores), and ``read`` the frames.
    """

    fit_paths: list[Path]
    holdout_paths: list[Path]
    hw: tuple[int, int]
    resize: str = "stretch"
    val: Optional[ImageSet] = None
    workers: int = 0
    seed: int = 0
    degradation: Optional[Degradation] = None
    degraded_copies: int = 0
    tiles: Optional[tuple[int, int]] = None
    tile_stride: Optional[tuple[int, int]] = None  # None: the tile's size (tiles side by side)
    known_defects: list[Path] = field(default_factory=list)  # DIR/train/<kind>/: for models that learn from them

    @property
    def has_val_defects(self) -> bool:
        """DIR/val holds labelled defects: the loop can keep the epoch with the best validation AUROC."""
        return self.val is not None and bool(self.val.labels.max(initial=0) == 1)

    @property
    def frame_hw(self) -> tuple[int, int]:
        """The frame a station sends: ``hw`` without tiling, the tiles' extent with it."""
        return frame_size(self.hw, self.tiles, self.tile_stride)

    def loader(self, paths: Sequence[Path], batch_size: int, shuffle: bool = False, drop_last: bool = False,
               augment: Optional[Augment] = None, pin_memory: bool = False,
               shard: tuple[int, int] = (0, 1), per_epoch: bool = False, whole: bool = False,
               fixed_draws: bool = False) -> DataLoader:
        """Batches of uint8 [B,H,W,3] model inputs of ``paths`` (and their degraded copies, see the class);
        call ``set_epoch(loader, e)`` before each epoch.

        ``shard`` = (rank, world size): this rank's part of every batch (``EpochBatches``). ``per_epoch``
        (the training loader of models trained by epochs): stills are drawn clean or degraded each epoch
        instead of adding copies, so an epoch costs the same with codec-robust training on. With ``tiles``
        a batch of ``batch_size`` images is their rows*cols tiles each, unless ``whole``: the frames
        [B, *frame_hw, 3] the exported (tiled) graph takes. ``fixed_draws``: each degraded copy is the same
        frame every epoch (models training on cached backbone features: a fresh draw each epoch defeats the cache).
        """
        copies = self.degraded_copies if self.degradation is not None else 0
        tiles = None if whole else self.tiles
        dataset = FrameDataset(expand(paths, copies, per_epoch), self.frame_hw, self.resize, augment, self.seed,
                               self.degradation, copies / (1 + copies), tiles, self.hw, self.tile_stride,
                               fixed_draws)
        batches = EpochBatches(len(dataset), batch_size, shuffle, self.seed, drop_last, *shard)
        workers = min(self.workers, max(0, len(dataset) // max(batch_size, 1)))
        return DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                          collate_fn=collate_tiles if tiles is not None else None,
                          worker_init_fn=_quiet_worker if workers else None, pin_memory=pin_memory,
                          persistent_workers=False)

    def read(self, paths: Sequence[Path]) -> np.ndarray:
        """A few images as one uint8 array of frames at ``frame_hw``, as a station sends them (parity frames,
        plots): not for whole training sets. ``model_inputs`` cuts them into what the model scores."""
        if not paths:
            return np.zeros((0, *self.frame_hw, 3), np.uint8)
        return np.stack([read_image(p, self.frame_hw, self.resize) for p in paths])

    def model_inputs(self, frames: np.ndarray) -> np.ndarray:
        """Frames at ``frame_hw`` as the model's inputs: their tiles with tiling, else the frames themselves."""
        return frames if self.tiles is None else split_tiles(frames, self.tiles, self.hw, self.tile_stride)


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Make ``loader``'s next pass the permutation (and augmentation draws) of ``epoch``."""
    batches = loader.batch_sampler
    if isinstance(batches, EpochBatches):
        batches.set_epoch(epoch)
    dataset = loader.dataset
    if isinstance(dataset, FrameDataset):
        dataset.epoch = epoch
