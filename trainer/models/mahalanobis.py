"""Mahalanobis AD (Rippel et al., "Modeling the Distribution of Normal Data in Pre-Trained Deep Features for
Anomaly Detection", ICPR 2020) on the configured backbone (EfficientNet-Lite0 by default).

Features: the global average pool of each backbone level in ``mahalanobis.stages`` (default all nine of Lite0,
as the paper uses all nine of EfficientNet-B4: the stem, the last block of each of the seven stages and the
head convolution; 32 to 1280 dims). Model: one multivariate Gaussian per level, its covariance shrunk by
Ledoit-Wolf (the paper's choice: the head has 1280 dims, often more than there are training images). Score:
the sum over levels of the Mahalanobis distances. No training beyond one pass of feature extraction.

The paper gives no map. The anomaly map here is a coarse pointer, not a calibrated localisation: the distance
of each position of the deepest level's feature map (stride 32) to that level's Gaussian of pooled features,
upsampled to the input and blurred.

Export: each level's mean and ``A = G^-1`` (G the Cholesky factor of its covariance, trainer/gaussian.py) are
graph constants, sum over levels of d^2 floats (1.8 M, 7 MB, with every level); the largest intermediate is
batch x positions x 1280 (the map).
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
from trainer.features import BackboneTaps, config_taps, pooled
from trainer.gaussian import MahalanobisDistance, ledoit_wolf, whitening
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


class MahalanobisExport(nn.Module):
    """frames uint8 [N,H,W,3] BGR -> (score float32 [N], anomaly_map float32 [N,H,W])."""

    def __init__(self, taps: BackboneTaps, levels: list[MahalanobisDistance], grid: tuple[int, int],
                 hw: tuple[int, int], blur_sigma: float) -> None:
        super().__init__()
        self.taps = taps
        self.levels = nn.ModuleList(levels)
        self.grid = grid
        self.hw = hw
        self.blur = MapBlur(blur_sigma, hw) if blur_sigma > 0 else None

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.taps(frames)
        score = torch.zeros_like(maps[0][:, 0, 0, 0])
        for level, x in zip(self.levels, pooled(maps), strict=True):
            score = score + level(x.unsqueeze(1)).squeeze(1)
        deepest = maps[-1].flatten(2).transpose(1, 2)  # [N, P, C]
        positions = self.levels[-1](deepest.reshape(-1, 1, deepest.shape[-1])).reshape(-1, 1, *self.grid)
        amap = F.interpolate(positions, size=self.hw, mode="bilinear", align_corners=False)
        if self.blur is not None:
            amap = self.blur(amap)
        return score, amap.squeeze(1)


@dataclass
class MahalanobisSettings(ModelSettings):
    """Mahalanobis AD (Rippel et al. 2020): one Gaussian (Ledoit-Wolf shrinkage) of pooled features per backbone
    level."""

    stages: Union[List[int], str] = setting(
        "auto", "levels, or auto = every level of the backbone (Lite0: the stem, the last block of each stage and "
        "the head, nine in all, as the paper uses all nine of EfficientNet-B4); score = sum of their distances")
    blur_sigma: float = setting(4.0, "blur of the coarse map (the deepest level's per-position distances), pixels; "
                                "0 = off")

    def validate(self) -> None:
        check_tap_list(self.stages, "mahalanobis.stages")
        if self.blur_sigma < 0:
            raise ValueError("mahalanobis.blur_sigma must be >= 0")


@register_model("mahalanobis", settings=MahalanobisSettings)
class MahalanobisAD(AnomalyModel):
    """Mahalanobis AD: a Gaussian of pooled features per backbone level; the summed distances as the score."""

    catches = FOREIGN_OBJECTS
    family = FEATURE_MEMORY
    trains_with_epochs = False
    display_name = "Mahalanobis AD"
    defaults = ModelDefaults(input_size=160, batch_size=16, epochs=None)

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.cfg: MahalanobisSettings = config.settings_for(self.name)
        self.hw = config.input.hw
        self.taps = config_taps(config.backbone, self.cfg.stages, "all", "mahalanobis.stages").eval()
        self.stages = list(self.taps.taps)
        with torch.no_grad():
            maps = self.taps(torch.zeros(1, *self.hw, 3, dtype=torch.uint8))
        self.dims = [int(m.shape[1]) for m in maps]
        self.grid = (int(maps[-1].shape[-2]), int(maps[-1].shape[-1]))
        # Sums of squares kept FP32 in model.fp16.onnx (they grow with the dimension: 1280 at the head).
        self.fp32_scopes = tuple(f"/levels.{i}/norm/" for i in range(len(self.dims)))
        self.levels: Optional[list[MahalanobisDistance]] = None
        self._export: Optional[MahalanobisExport] = None

    def map_shape(self) -> tuple[int, int]:
        return self.hw

    def fit(self, data: TrainingData, log: Callable[[str], None] = lambda _m: None,
            run: Optional[RunOptions] = None) -> dict[str, Any]:
        """Pool every level of every training image, then one shrunk Gaussian per level."""
        t0 = time.monotonic()
        chunks: list[list[torch.Tensor]] = [[] for _ in self.dims]
        with torch.no_grad():
            for frames in data.loader(data.fit_paths, int(self.config.batch_size)):
                for chunk, x in zip(chunks, pooled(self.taps(frames)), strict=True):
                    chunk.append(x)
        if not chunks[0]:
            raise UserError("mahalanobis: no training images to fit on; add images to train/good")
        t_feat = time.monotonic() - t0
        levels, shrinkage = [], []
        for tap, chunk in zip(self.stages, chunks, strict=True):
            mu, cov, s = ledoit_wolf(torch.cat(chunk))
            whiten = whitening(cov, f"mahalanobis level {tap}")
            levels.append(MahalanobisDistance(mu[None], whiten[None]))
            shrinkage.append(round(s, 4))
        self.levels = levels
        self._export = None
        n = sum(len(c) for c in chunks[0])
        log(f"mahalanobis: {n} images, {len(levels)} levels ({'+'.join(map(str, self.dims))} dims), Ledoit-Wolf "
            f"shrinkage {shrinkage} ({time.monotonic() - t0:.1f}s)")
        return {"n_train_images": n, "stages": self.stages, "dims": self.dims, "shrinkage": shrinkage,
                "feature_seconds": round(t_feat, 3), "gaussian_seconds": round(time.monotonic() - t0 - t_feat, 3)}

    def export_batch_limit(self, max_elements: int, n_images: Optional[int] = None) -> Optional[int]:
        """The map's batch x positions x deepest dims grows with the batch."""
        return max_elements // max(self.grid[0] * self.grid[1] * self.dims[-1], max(self.dims))

    def export_checks(self, max_batch: int, max_elements: int) -> dict[str, Any]:
        """The largest intermediate (the map's batch x positions x deepest dims) within ``max_elements``."""
        positions = self.grid[0] * self.grid[1]
        largest = max(max_batch * positions * self.dims[-1], max_batch * max(self.dims))
        if largest > max_elements:
            raise UserError(f"mahalanobis: export.max_batch {max_batch} x {positions} positions x {self.dims[-1]} "
                            f"dims exceeds export.max_distance_elements {max_elements}; lower export.max_batch or "
                            "the input size")
        constants = sum(d * (d + 1) for d in self.dims)
        return {"max_batch": max_batch, "levels": len(self.dims), "dims": self.dims,
                "largest_distance_tensor_elements": largest, "max_distance_elements": max_elements,
                "gaussian_constant_mb_fp32": round(4 * constants / 1e6, 1)}

    def export_module(self) -> nn.Module:
        if self.levels is None:
            raise RuntimeError("MahalanobisAD.export_module() called before fit()")
        if self._export is None:
            self._export = MahalanobisExport(self.taps, self.levels, self.grid, self.hw, self.cfg.blur_sigma).eval()
        return self._export
