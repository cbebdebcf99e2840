"""SPADE (Cohen & Hoshen, "Sub-Image Anomaly Detection with Deep Pyramid Correspondences", 2020) on Lite0.

Image score: the frame's global feature (average pool of each of ``spade.stages``, default the last two stages
and the head of EfficientNet-Lite0, 192 + 320 + 1280 dims, concatenated) against the same features of every
training image: the mean Euclidean distance to the ``k`` nearest (50, the paper's; all of them when there are
fewer training images). Anomaly map: each patch of the frame (``spade.map_layers``, default blocks 4 and 7:
40 + 80 channels, the coarser upsampled to the stride-8 grid) against the patches of its nearest training
images only (the paper's pyramid correspondence, kappa = 1: the distance to the nearest such patch),
upsampled to the input and Gaussian-blurred.

The exact form, in one graph: the image kNN (a matmul and TopK) picks the neighbours of each frame; the map
then gathers, one neighbour at a time, that training image's patches from a constant bank of every training
image's patch features [M, C + 1, P], so the largest intermediates are batch x P x P (distances) and
batch x (C + 1) x P (the gathered patches), checked at the export batch, never batch x k x P x P. One
simplification, for cost: the map uses the nearest ``spade.map_neighbours`` (default 10) of the k images,
since its work grows as neighbours x P^2 (at 160 px and all 50 it would cost five times the backbone);
set it to 50 for the paper's form. The patch bank grows with the training set (at 160 px, 400 patches x
121 floats = 194 KB an image; 800 images = 155 MB); a bank too large for an ONNX file is refused at export
with what to lower.

Distances use ``||a||^2 - 2ab + ||b||^2`` on features centred on the training mean, with the squared norms
folded into the matmul as in PatchCore's BankDistance; both distance scopes stay FP32 in model.fp16.onnx (the
expansion cancels in FP16).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import UserError
from trainer.backbones import check_tap_list, load_backbone, resolve_taps
from trainer.features import BackboneTaps, pooled
from trainer.ingraph import MapBlur
from trainer.models import (
    FEATURE_MEMORY,
    FOREIGN_OBJECTS,
    AnomalyModel,
    ModelDefaults,
    ModelSettings,
    RunOptions,
    register_model,
    setting,
)

if TYPE_CHECKING:
    from trainer.frames import TrainingData

PROTOBUF_LIMIT = 2**31 - 1  # an ONNX file (one protobuf) cannot exceed 2 GB


class SpadeFeatures(nn.Module):
    """frames -> (image features [N, D], patch features [N, P, C]) from one backbone pass."""

    def __init__(self, taps: BackboneTaps, stages: tuple[int, ...], map_layers: tuple[int, ...]) -> None:
        super().__init__()
        self.taps = taps
        self.stage_at = [taps.taps.index(t) for t in stages]
        self.map_at = [taps.taps.index(t) for t in map_layers]

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.taps(frames)
        image = torch.cat(pooled([maps[i] for i in self.stage_at]), 1)
        fine = maps[self.map_at[0]]
        size = (int(fine.shape[-2]), int(fine.shape[-1]))
        patch = torch.cat([fine] + [F.interpolate(maps[i], size=size, mode="bilinear", align_corners=False)
                                    for i in self.map_at[1:]], 1)
        return image, patch.flatten(2).transpose(1, 2)


def augmented_bank(bank: torch.Tensor) -> torch.Tensor:
    """[..., M, C] -> [..., C + 1, M]: -2 x the rows transposed, their squared norms under them.

    ``[q, 1] @ that = ||b||^2 - 2 q.b``: with ``||q||^2`` added, the squared distances in one matmul.
    """
    return torch.cat([-2.0 * bank.transpose(-1, -2), (bank * bank).sum(-1).unsqueeze(-2)], -2).contiguous()


def with_ones(q: torch.Tensor) -> torch.Tensor:
    return torch.cat([q, torch.ones_like(q[..., :1])], -1)


class ImageNeighbours(nn.Module):
    """Image features [N, D] -> (distances to the k nearest training images [N, k], their indices [N, k])."""

    mu: torch.Tensor
    bank_aug: torch.Tensor

    def __init__(self, bank: torch.Tensor, k: int) -> None:
        super().__init__()
        mu = bank.mean(0)
        self.register_buffer("mu", mu.clone())
        self.register_buffer("bank_aug", augmented_bank(bank - mu))
        self.k = k

    def forward(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = q - self.mu
        d2 = (q * q).sum(-1, keepdim=True) + torch.matmul(with_ones(q), self.bank_aug)  # [N, M]
        nearest, idx = torch.topk(d2, self.k, dim=1, largest=False, sorted=True)
        return nearest.clamp_min(0.0).sqrt(), idx


class NeighbourPatches(nn.Module):
    """Patches [N, P, C] and neighbour indices [N, k] -> distance of each patch to the nearest patch of its
    frame's first ``n`` neighbours [N, P], gathering one neighbour's patches at a time."""

    mu: torch.Tensor
    bank_aug: torch.Tensor

    def __init__(self, patches: torch.Tensor, n: int) -> None:
        super().__init__()
        mu = patches.reshape(-1, patches.shape[-1]).mean(0)
        self.register_buffer("mu", mu.clone())
        self.register_buffer("bank_aug", augmented_bank(patches - mu))  # [M, C + 1, P]
        self.n = n

    def forward(self, q: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        q = q - self.mu
        q_aug = with_ones(q)
        best: Optional[torch.Tensor] = None
        for j in range(self.n):
            part = torch.matmul(q_aug, self.bank_aug[idx[:, j]]).amin(-1)  # [N, P, C+1] x [N, C+1, P] -> [N, P]
            best = part if best is None else torch.minimum(best, part)
        assert best is not None
        return ((q * q).sum(-1) + best).clamp_min(0.0).sqrt()


class SpadeExport(nn.Module):
    """frames uint8 [N,H,W,3] BGR -> (score float32 [N], anomaly_map float32 [N,H,W])."""

    def __init__(self, features: SpadeFeatures, images: torch.Tensor, patches: torch.Tensor, k: int,
                 map_neighbours: int, grid: tuple[int, int], hw: tuple[int, int], blur_sigma: float) -> None:
        super().__init__()
        self.features = features
        self.image_distance = ImageNeighbours(images, k)
        self.patch_distance = NeighbourPatches(patches, map_neighbours)
        self.grid = grid
        self.hw = hw
        self.blur = MapBlur(blur_sigma, hw) if blur_sigma > 0 else None

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image, patch = self.features(frames)
        nearest, idx = self.image_distance(image)
        d = self.patch_distance(patch, idx)
        amap = F.interpolate(d.reshape(-1, 1, self.grid[0], self.grid[1]), size=self.hw, mode="bilinear",
                             align_corners=False)
        if self.blur is not None:
            amap = self.blur(amap)
        # The mean outside the FP32 scope: a graph output made by a node kept FP32 gets a wrong Cast from the
        # FP16 converter (onnxconverter-common).
        return nearest.mean(1), amap.squeeze(1)


@dataclass
class SpadeSettings(ModelSettings):
    """SPADE (Cohen & Hoshen 2020): kNN of whole-image features; the map from patch kNN among the nearest images."""

    stages: Union[List[int], str] = setting(
        "auto", "taps globally average-pooled and concatenated into the image feature, or auto: the deepest levels "
        "(Lite0: the last two stages and the head, [14, 15, 16], 192 + 320 + 1280 dims)")
    k: int = setting(50, "nearest training images averaged into the score (the paper's 50; all when fewer)")
    map_layers: Union[List[int], str] = setting(
        "auto", "taps of the patch features for the map, or auto: stride 8 and 16 (Lite0: [4, 7], 40 + 80 "
        "channels on the stride-8 grid)")
    map_neighbours: int = setting(
        10, "the map compares each patch with the patches of this many nearest images (at most k): its cost grows "
        "as neighbours x patches^2; 50 is the paper's form")
    blur_sigma: float = setting(4.0, "Gaussian blur of the anomaly map, in input pixels; 0 = off")

    def validate(self) -> None:
        check_tap_list(self.stages, "spade.stages")
        check_tap_list(self.map_layers, "spade.map_layers")
        if self.k < 1 or self.map_neighbours < 1:
            raise ValueError("spade.k and spade.map_neighbours must be >= 1")
        if self.blur_sigma < 0:
            raise ValueError("spade.blur_sigma must be >= 0")


@register_model("spade", settings=SpadeSettings)
class Spade(AnomalyModel):
    """SPADE: kNN of whole-image features for the score; patch correspondences to the neighbours for the map."""

    catches = FOREIGN_OBJECTS
    family = FEATURE_MEMORY
    trains_with_epochs = False
    display_name = "SPADE"
    defaults = ModelDefaults(input_size=160, batch_size=16, epochs=None)
    fp32_scopes = ("/image_distance/", "/patch_distance/")  # ||a||^2 - 2ab + ||b||^2 cancels in FP16

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.cfg: SpadeSettings = config.settings_for(self.name)
        self.hw = config.input.hw
        name = config.backbone.name
        stages = tuple(resolve_taps(name, self.cfg.stages, "top", "spade.stages"))
        map_layers = tuple(resolve_taps(name, self.cfg.map_layers, "map", "spade.map_layers"))
        both = sorted(set(stages) | set(map_layers))
        taps = BackboneTaps(load_backbone(name, config.backbone.weights, both), both)
        self.features = SpadeFeatures(taps, stages, map_layers).eval()
        with torch.no_grad():
            image, patch = self.features(torch.zeros(1, *self.hw, 3, dtype=torch.uint8))
        fine = taps(torch.zeros(1, *self.hw, 3, dtype=torch.uint8))[self.features.map_at[0]]
        self.grid = (int(fine.shape[-2]), int(fine.shape[-1]))
        self.image_dim, self.patch_dim = int(image.shape[1]), int(patch.shape[2])
        self.images: Optional[torch.Tensor] = None
        self.patches: Optional[torch.Tensor] = None
        self._export: Optional[SpadeExport] = None

    def map_shape(self) -> tuple[int, int]:
        return self.hw

    def _k(self) -> tuple[int, int]:
        assert self.images is not None
        k = min(self.cfg.k, len(self.images))
        return k, min(self.cfg.map_neighbours, k)

    def fit(self, data: TrainingData, log: Callable[[str], None] = lambda _m: None,
            run: Optional[RunOptions] = None) -> dict[str, Any]:
        """Extract every training image's global and patch features: they are the model."""
        t0 = time.monotonic()
        images, patches = [], []
        with torch.no_grad():
            for frames in data.loader(data.fit_paths, int(self.config.batch_size)):
                image, patch = self.features(frames)
                images.append(image)
                patches.append(patch)
        if not images:
            raise UserError("spade: no training images to fit on; add images to train/good")
        self.images, self.patches = torch.cat(images), torch.cat(patches)
        self._export = None
        k, n_map = self._k()
        seconds = time.monotonic() - t0
        log(f"spade: {len(self.images)} images: {self.image_dim}-dim image features, {self.patches.shape[1]} "
            f"patches x {self.patch_dim} channels each; k {k}, map from the nearest {n_map} ({seconds:.1f}s)")
        if k < self.cfg.k:
            log(f"spade: only {len(self.images)} training images: k lowered from {self.cfg.k} to {k}")
        return {"n_train_images": len(self.images), "image_dim": self.image_dim, "patch_dim": self.patch_dim,
                "patch_grid": list(self.grid), "k": k, "map_neighbours": n_map, "feature_seconds": round(seconds, 3)}

    def export_batch_limit(self, max_elements: int, n_images: Optional[int] = None) -> Optional[int]:
        """Every distance grows with the batch: at 160 px ([4, 7] map taps, 400 patches a frame) the 400 x 400
        patch distances of a batch of 16 exceed the default bound, and 13 fit. Known before the fit: the
        patches come from the input size, the bank's images from the data."""
        if n_images is None:
            assert self.images is not None
            n_images = len(self.images)
        patches = self.grid[0] * self.grid[1]
        return max_elements // max(n_images, patches * patches, (self.patch_dim + 1) * patches)

    def size_checks(self, n_images: int) -> None:
        """The feature banks are graph constants: ``n_images`` of them must fit an ONNX file."""
        constants = self._bank_constants(n_images)
        if 4 * constants > PROTOBUF_LIMIT * 0.9:
            raise UserError(f"spade: the feature banks of {n_images} training images ({4 * constants / 1e9:.1f} GB) "
                            "do not fit an ONNX file; train on fewer images (at most "
                            f"{int(PROTOBUF_LIMIT * 0.9 / 4 / self._bank_constants(1))}) or lower the input size")

    def _bank_constants(self, n_images: int) -> int:
        return n_images * (self.image_dim + 1 + (self.patch_dim + 1) * self.grid[0] * self.grid[1])

    def export_checks(self, max_batch: int, max_elements: int) -> dict[str, Any]:
        """Distances batch x M (images) and batch x P x P (patches) within ``max_elements``; the banks in a file."""
        assert self.images is not None and self.patches is not None
        n_images, patches = len(self.images), int(self.patches.shape[1])
        largest = max(max_batch * n_images, max_batch * patches * patches, max_batch * (self.patch_dim + 1) * patches)
        if largest > max_elements:
            raise UserError(f"spade: export.max_batch {max_batch} gives a {largest}-element distance tensor "
                            f"({n_images} training images, {patches} patches a frame), above "
                            f"export.max_distance_elements {max_elements}; lower export.max_batch or the input size")
        self.size_checks(n_images)
        constants = self._bank_constants(n_images)
        k, n_map = self._k()
        return {"max_batch": max_batch, "bank_images": n_images, "patches_per_frame": patches, "k": k,
                "map_neighbours": n_map, "largest_distance_tensor_elements": largest,
                "max_distance_elements": max_elements, "bank_constant_mb_fp32": round(4 * constants / 1e6, 1)}

    def export_module(self) -> nn.Module:
        if self.images is None or self.patches is None:
            raise RuntimeError("Spade.export_module() called before fit()")
        if self._export is None:
            k, n_map = self._k()
            self._export = SpadeExport(self.features, self.images, self.patches, k, n_map, self.grid, self.hw,
                                       self.cfg.blur_sigma).eval()
        return self._export
