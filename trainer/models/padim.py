"""PaDiM (Defard et al., "PaDiM: a Patch Distribution Modeling Framework", ICPR 2021) on Lite0 features.

Embedding: the feature maps of ``padim.layers`` (default blocks 2, 4 and 7 of EfficientNet-Lite0: 24 + 40 + 80
channels at stride 4, 8 and 16; PatchCore's default taps [2, 4] plus the stride-16 block, as the paper takes
three ResNet stages), the coarser maps upsampled (nearest) to the finest grid and concatenated, then
``padim.channels`` of the 144 channels kept by a seeded random selection (the paper's 100). Model: one Gaussian
per grid position, covariance regularised by ``covariance_eps`` x I (0.01, the paper's). Score: max over
positions of the Mahalanobis distance; anomaly map: the distances upsampled to the input and Gaussian-blurred
(sigma 4, the paper's).

Export: the per-position Gaussians are graph constants, mean [P, d] and A = G^-1 [P, d, d] (G the Cholesky
factor of the covariance), and the distance is ``||A (x - mu)||`` (trainer/gaussian.py): P x d x d floats, at
160 px 40 x 40 x 100 x 100 = 16 M (64 MB); at 224 px 125 MB, at 256 px 164 MB, in each of model.onnx and
model.fp16.onnx (the distance and its constants stay FP32 there: see ``fp32_scopes``). The largest
intermediate is P x batch x d (at 256 px and batch 16: 6.6 M elements), checked against
``export.max_distance_elements`` at the export batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import UserError
from trainer.backbones import check_tap_list
from trainer.features import BackboneTaps, config_taps
from trainer.gaussian import GaussianSums, MahalanobisDistance, whitening
from trainer.ingraph import MapBlur
from trainer.models import (
    FEATURE_MEMORY,
    SURFACE_DEFECTS,
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


class PositionFeatures(nn.Module):
    """frames uint8 [N,H,W,3] BGR -> PaDiM embeddings [N, d, h, w] (taps concatenated on the finest grid)."""

    index: torch.Tensor

    def __init__(self, taps: BackboneTaps, index: torch.Tensor) -> None:
        super().__init__()
        self.taps = taps
        self.register_buffer("index", index.clone())

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        maps = self.taps(frames)
        size = (int(maps[0].shape[-2]), int(maps[0].shape[-1]))
        emb = torch.cat([maps[0]] + [F.interpolate(m, size=size, mode="nearest") for m in maps[1:]], 1)
        return emb.index_select(1, self.index)


class PadimExport(nn.Module):
    """frames uint8 [N,H,W,3] BGR -> (score float32 [N], anomaly_map float32 [N,H,W])."""

    def __init__(self, features: PositionFeatures, mu: torch.Tensor, whiten: torch.Tensor, grid: tuple[int, int],
                 hw: tuple[int, int], blur_sigma: float) -> None:
        super().__init__()
        self.features = features
        self.distance = MahalanobisDistance(mu, whiten)
        self.grid = grid
        self.hw = hw
        self.blur = MapBlur(blur_sigma, hw) if blur_sigma > 0 else None

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.features(frames).flatten(2).transpose(1, 2)  # [N, P, d]
        d = self.distance(x)  # [N, P]
        amap = F.interpolate(d.reshape(-1, 1, self.grid[0], self.grid[1]), size=self.hw, mode="bilinear",
                             align_corners=False)
        if self.blur is not None:
            amap = self.blur(amap)
        return d.amax(1), amap.squeeze(1)


@dataclass
class PadimSettings(ModelSettings):
    """PaDiM (Defard et al. 2021): a Gaussian of the patch features at every position of the finest tap's grid."""

    layers: Union[List[int], str] = setting(
        "auto", "taps, finer first, or auto: the stride 4, 8 and 16 levels, as the paper takes three ResNet stages "
        "(Lite0: [2, 4, 7], 24 + 40 + 80 = 144 channels; WideResNet-50: [1, 2, 3], 1 792); the grid is the first's")
    channels: int = setting(
        100, "channels kept of the concatenated taps by a seeded random selection (the paper's 100); 0 = all. The "
        "Gaussians are graph constants of positions x channels^2 floats: 64 MB at 160 px")
    covariance_eps: float = setting(0.01, "added to each covariance's diagonal (the paper's 0.01 x I)")
    blur_sigma: float = setting(4.0, "Gaussian blur of the anomaly map, in input pixels (the paper's 4); 0 = off")

    def validate(self) -> None:
        check_tap_list(self.layers, "padim.layers")
        if self.channels < 0:
            raise ValueError("padim.channels must be >= 0 (0 = every concatenated channel)")
        if self.covariance_eps <= 0 or self.blur_sigma < 0:
            raise ValueError("padim.covariance_eps must be > 0 and blur_sigma >= 0")


@register_model("padim", settings=PadimSettings)
class Padim(AnomalyModel):
    """PaDiM: a multivariate Gaussian of normal patch features at every position; Mahalanobis distance as score."""

    catches = SURFACE_DEFECTS
    family = FEATURE_MEMORY
    map_in_score_units = True  # score = max of the patch distances the map upsamples and smooths
    trains_with_epochs = False
    display_name = "PaDiM"
    defaults = ModelDefaults(input_size=160, batch_size=16, epochs=None)
    # The whole distance stays FP32 in model.fp16.onnx (so do its constants): with the FP16 matmul the scores
    # moved by up to 70 % on generated parts (40 images, 100 dims: an ill-conditioned covariance whose whitening
    # sums large terms of both signs); FP32 there keeps them within 1e-3 of torch.
    fp32_scopes = ("/distance/",)

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.cfg: PadimSettings = config.settings_for(self.name)
        self.hw = config.input.hw
        taps = config_taps(config.backbone, self.cfg.layers, "three", "padim.layers")
        layers = taps.taps
        total = sum(taps.channels())
        if self.cfg.channels > total:
            raise UserError(f"padim.channels {self.cfg.channels}: the taps {list(layers)} have only {total} "
                            "channels; lower it (0 = all)")
        generator = torch.Generator().manual_seed(int(config.seed))
        keep = self.cfg.channels or total
        index = torch.randperm(total, generator=generator)[:keep].sort().values
        self.features = PositionFeatures(taps, index).eval()
        with torch.no_grad():
            probe = self.features(torch.zeros(1, *self.hw, 3, dtype=torch.uint8))
        self.dim = int(probe.shape[1])
        self.grid = (int(probe.shape[2]), int(probe.shape[3]))
        self.mu: Optional[torch.Tensor] = None
        self.whiten: Optional[torch.Tensor] = None
        self._export: Optional[PadimExport] = None

    def map_shape(self) -> tuple[int, int]:
        return self.hw

    def fit(self, data: TrainingData, log: Callable[[str], None] = lambda _m: None,
            run: Optional[RunOptions] = None) -> dict[str, Any]:
        """Stream the training images once, summing features and outer products per position; then invert."""
        t0 = time.monotonic()
        positions = self.grid[0] * self.grid[1]
        sums = GaussianSums(positions, self.dim)
        with torch.no_grad():
            for frames in data.loader(data.fit_paths, int(self.config.batch_size)):
                sums.add(self.features(frames).flatten(2).transpose(1, 2))
        t_feat = time.monotonic() - t0
        mu, cov = sums.mean_cov()
        cov += self.cfg.covariance_eps * torch.eye(self.dim, dtype=torch.float64)
        self.whiten = whitening(cov, "padim").to(torch.float32)
        self.mu = mu.to(torch.float32)
        self._export = None
        t_fit = time.monotonic() - t0 - t_feat
        log(f"padim: {sums.n} images, {positions} positions x {self.dim} channels ({t_feat:.1f}s features, "
            f"{t_fit:.1f}s Gaussians)")
        return {"n_train_images": sums.n, "positions": positions, "patch_grid": list(self.grid),
                "feature_dim": self.dim, "layers": list(self.cfg.layers), "covariance_eps": self.cfg.covariance_eps,
                "feature_seconds": round(t_feat, 3), "gaussian_seconds": round(t_fit, 3)}

    def export_batch_limit(self, max_elements: int, n_images: Optional[int] = None) -> Optional[int]:
        """The distance's P x batch x d intermediate grows with the batch: at 160 px ([2, 4, 7] taps, 1 600
        positions x 100 channels) a batch of 16 exceeds the default bound and 13 fits (whatever the data)."""
        return max_elements // (self.grid[0] * self.grid[1] * self.dim)

    def size_checks(self, n_images: int) -> None:
        """The Gaussians (positions x channels^2 constants) must fit an ONNX file, whatever the data."""
        constants = self.grid[0] * self.grid[1] * self.dim * (self.dim + 1)
        if 4 * constants > PROTOBUF_LIMIT * 0.9:
            raise UserError(f"padim: {self.grid[0] * self.grid[1]} positions x {self.dim}^2 covariance constants "
                            f"({4 * constants / 1e9:.1f} GB) do not fit an ONNX file; lower padim.channels or the "
                            "input size")

    def export_checks(self, max_batch: int, max_elements: int) -> dict[str, Any]:
        """The P x batch x d intermediate within ``max_elements``; the constants within an ONNX file."""
        positions = self.grid[0] * self.grid[1]
        largest = positions * max_batch * self.dim
        if largest > max_elements:
            raise UserError(f"export.max_batch {max_batch} x {positions} positions x {self.dim} channels exceeds "
                            f"export.max_distance_elements {max_elements}; lower export.max_batch or the input size")
        self.size_checks(0)
        constants = positions * self.dim * (self.dim + 1)
        return {"max_batch": max_batch, "positions": positions, "feature_dim": self.dim,
                "largest_distance_tensor_elements": largest, "max_distance_elements": max_elements,
                "gaussian_constant_elements": constants, "gaussian_constant_mb_fp32": round(4 * constants / 1e6, 1)}

    def export_module(self) -> nn.Module:
        if self.mu is None or self.whiten is None:
            raise RuntimeError("Padim.export_module() called before fit()")
        if self._export is None:
            self._export = PadimExport(self.features, self.mu, self.whiten, self.grid, self.hw,
                                       self.cfg.blur_sigma).eval()
        return self._export
