"""FastFlow (Yu et al., "FastFlow: Unsupervised Anomaly Detection and Localization via 2D Normalizing Flows",
arXiv 2111.07677, 2021), after anomalib's implementation (the reference most use; the paper has no official code).

Per backbone level a 2D normalizing flow over the whole feature map: the level's features LayerNorm-ed over
(C, h, w) with learned affine parameters (anomalib's, for CNN backbones), then ``flow_steps`` FrEIA AllInOneBlocks
(affine coupling clamped at ``clamp`` 2.0, SOFTPLUS global affine, a fixed hard permutation) whose subnets are
two convolutions with a ReLU between, kernels alternating 3x3 and 1x1 (3x3 only with ``conv3x3_only``), hidden
channels ``hidden_ratio`` x the input's. Loss (anomalib's FastflowLoss): per level the mean over the batch of
0.5 ||z||^2 - log|det|, summed over the levels; one Adam (lr 1e-3, weight decay 1e-5) over flows and norms.

Map and score (anomalib's AnomalyMapGenerator): per level exp(mean over channels of -0.5 z^2) at every position
(a per-position likelihood proxy in (0, 1]), negated, upsampled (bilinear) to the input and averaged across the
levels: the map lies in [-1, 0], higher = more anomalous; the image score is its maximum (anomalib's
post-processing takes the map's max as the image score).

What differs from the paper, and why:
- backbone: the paper's ResNet-18 (8 flow steps, hidden ratio 1.0) or WideResNet-50 (20 steps, ratio 0.16) have
  no ImageNet weights on this machine; the default is the configured backbone's equivalent of ResNet-18's layers
  1-3, its ``three`` role (Lite0 blocks [2, 4, 7]: 24, 40, 80 channels at stride 4, 8, 16, against 64, 128, 256),
  with the ResNet-18 recipe (8 steps, ratio 1.0). ``backbone.name: resnet18`` or ``wide_resnet50_2`` with a weights
  file gives the paper's levels (set ``fastflow.flow_steps: 20`` and ``hidden_ratio: 0.16`` for the latter).
  Measured cost of the flows alone (160 px grids, one training step at batch 16, one thread, the shared VM under
  load): Lite0 0.39 M flow parameters, 3.2 s; ResNet-18's levels 2.95 M, 8.6 s (2.7x); WideResNet-50's with 20
  steps at ratio 0.16, 17.8 M, 108 s (34x); before the backbone's own cost (no ImageNet weights here).
- the recipe is reduced for CPU: ``epochs`` (default 40) on cached backbone features (trainer/flows.py's
  FeatureCache: the backbone runs once per training image, the flows and norms train alone), batch 16 (anomalib
  32, 500 epochs with early stopping), input 160 px (256).

Measured (benchmarks/protocol.py --dataset elpv --cell mono --model fastflow --seeds 1 --threads 1, shipped
settings, seed 0, 2026-12-07, a 2-core VM at load average 10-17): image AUROC 89.4, AP 92.0, F1 at the shipped
threshold 74.8 (recall 60.7, false alarms 1.7 %); PatchCore 94.4 and PaDiM 95.8 on the same draw. Fit 2 730 s,
69 img/s through the FP32 graph on one thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from trainer.backbones import check_tap_list
from trainer.features import config_taps
from trainer.flows import (
    FeatureCache,
    Shape,
    TapsThenHead,
    conv_subnet,
    flow,
    log_density,
    pack_maps,
    score_and_map,
    unpack_maps,
)
from trainer.ingraph import MapBlur
from trainer.loop import EpochModel, LossParts, Update
from trainer.models import NORMALIZING_FLOWS, SURFACE_DEFECTS, ModelDefaults, ModelSettings, register_model, setting


class LevelFlow2d(nn.Module):
    """One level: LayerNorm over (C, h, w), then the 2D flow: [N,C,h,w] -> (z [N,C,h,w], log|det| [N])."""

    def __init__(self, shape: Shape, steps: int, hidden_ratio: float, conv3x3_only: bool, clamp: float,
                 seed: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(list(shape), elementwise_affine=True)
        kernels = [3 if i % 2 == 0 or conv3x3_only else 1 for i in range(steps)]
        self.flow = flow(shape, [conv_subnet(k, hidden_ratio) for k in kernels], clamp, seed)

    def forward(self, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z, log_det = self.flow(self.norm(feature))
        return z, log_det

    def nll(self, feature: torch.Tensor) -> torch.Tensor:
        """Per image 0.5 ||z||^2 - log|det| (anomalib's loss term; the Gaussian's constant left out)."""
        z, log_det = self(feature)
        return 0.5 * z.pow(2).sum((1, 2, 3)) - log_det


class FastflowHead(nn.Module):
    """Feature maps -> (score [N], anomaly map [N,H,W]): the mean over levels of -exp(mean_c -0.5 z^2), upsampled."""

    def __init__(self, levels: list[LevelFlow2d], hw: tuple[int, int], blur_sigma: float) -> None:
        super().__init__()
        self.flows = nn.ModuleList(levels)
        self.hw = hw
        self.blur = MapBlur(blur_sigma, hw) if blur_sigma > 0 else None

    def forward(self, maps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        total: Optional[torch.Tensor] = None
        for level, feature in zip(self.flows, maps, strict=True):
            z, _log_det = level(feature)
            # mean over channels of -0.5 z^2 (log_density without the Gaussian's constant, divided by C)
            prob = torch.exp(-0.5 * z.pow(2).mean(1, keepdim=True))
            up = F.interpolate(-prob, size=self.hw, mode="bilinear", align_corners=False)
            total = up if total is None else total + up
        assert total is not None
        amap = total / float(len(self.flows))
        return score_and_map(amap, self.blur, self.hw)


@dataclass
class FastflowSettings(ModelSettings):
    """FastFlow (Yu et al. 2021), anomalib's implementation: per level a 2D flow of the LayerNorm-ed feature map."""

    layers: Union[List[int], str] = setting(
        "auto", "taps, finer first, or auto: stride 4, 8 and 16, the paper's ResNet-18 layers 1-3 (Lite0: [2, 4, 7])")
    flow_steps: int = setting(8, "AllInOneBlocks per level (the paper: 8 for ResNet-18, 20 for WideResNet-50)")
    hidden_ratio: float = setting(1.0, "subnet hidden channels / input channels (the paper: 1.0 for ResNet-18, "
                                  "0.16 for WideResNet-50)")
    conv3x3_only: bool = setting(False, "3x3 kernels in every step (false: alternate 3x3 and 1x1, the paper's)")
    clamp: float = setting(2.0, "soft clamp of the coupling's log-scale (anomalib's 2.0)")
    lr: float = setting(0.001, "Adam learning rate (anomalib's 1e-3)")
    weight_decay: float = setting(0.00001, "Adam weight decay (anomalib's 1e-5)")
    cache_mb: int = setting(1024, "host memory for the cached backbone features of the training images, MB "
                            "(Lite0 at 160 px: 0.25 MB an image); past it the backbone runs again")
    blur_sigma: float = setting(0.0, "Gaussian blur of the anomaly map, px (anomalib's FastFlow has none); 0 = off")

    def validate(self) -> None:
        check_tap_list(self.layers, "fastflow.layers")
        if self.flow_steps < 1 or self.cache_mb < 0:
            raise ValueError("fastflow.flow_steps must be >= 1 and cache_mb >= 0")
        if self.hidden_ratio <= 0 or self.clamp <= 0 or self.lr <= 0 or self.weight_decay < 0 or self.blur_sigma < 0:
            raise ValueError("fastflow.hidden_ratio, clamp and lr must be > 0; weight_decay and blur_sigma >= 0")


@register_model("fastflow", settings=FastflowSettings)
class Fastflow(EpochModel):
    """FastFlow: 2D normalizing flows of the backbone's feature maps; a low per-position likelihood = defect."""

    catches = SURFACE_DEFECTS
    family = NORMALIZING_FLOWS
    display_name = "FastFlow"
    caches_features = True  # prepare() caches the backbone's features: fixed codec-robust draws (trainer/loop.py)
    map_in_score_units = True  # score = max of the unsmoothed map
    defaults = ModelDefaults(input_size=160, batch_size=16, epochs=40)
    trains_distributed = False  # the feature cache is this process's
    # The flows and the map stay FP32 in model.fp16.onnx (only the backbone is FP16): FP16 flushes the likelihood
    # exp(-0.5 mean z^2) of an unlikely position (below 6e-8) to 0, and the score, the map's maximum, is that
    # position's: after a short fit (TensorRT readiness's 2 epochs) every image's score was such a tiny negative
    # number and 1.4 % of the good/defect pairs swapped order in FP16 (0.5 % allowed); on the washers the FP16
    # flows moved the scores by 7e-3 of their scale, FP32 ones by 3e-4.
    fp32_scopes = ("/head/",)

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.cfg: FastflowSettings = config.settings_for(self.name)
        self.hw = config.input.hw
        self.taps = config_taps(config.backbone, self.cfg.layers, "three", "fastflow.layers").eval()
        for p in self.taps.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            probe = self.taps(torch.zeros(1, *self.hw, 3, dtype=torch.uint8))
        self.shapes: list[Shape] = [tuple(int(s) for s in m.shape[1:]) for m in probe]
        torch.manual_seed(int(config.seed))
        self.flows = [LevelFlow2d(shape, self.cfg.flow_steps, self.cfg.hidden_ratio, self.cfg.conv3x3_only,
                                  self.cfg.clamp, int(config.seed) * 1000 + i) for i, shape in enumerate(self.shapes)]
        self.head = FastflowHead(self.flows, self.hw, self.cfg.blur_sigma)
        trainable = [p for p in self.head.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(trainable, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        self.cache = FeatureCache(lambda frames: pack_maps(self.taps(frames)), self.cfg.cache_mb * 1_000_000)

    # -- the loop's interface ------------------------------------------------------------------------------
    def networks(self) -> dict[str, nn.Module]:
        return {"flows": self.head.flows}

    def updates(self) -> list[Update]:
        return [Update("flows", self.optimizer, self._loss)]

    def _nll(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [level.nll(m) for level, m in zip(self.flows, unpack_maps(x, self.shapes), strict=True)]

    def _loss(self, x: torch.Tensor, _shared: dict[str, Any]) -> LossParts:
        terms = [t.mean() for t in self._nll(x)]
        value = torch.stack(terms).sum()
        return value, {"loss": value, **{f"level{i}": t for i, t in enumerate(terms)}}

    def prepare(self, frames: torch.Tensor) -> torch.Tensor:
        self.taps.to(frames.device)
        return self.cache(frames)

    def validation_loss(self, x: torch.Tensor) -> torch.Tensor:
        """Per image the negative log-likelihood per dimension, averaged over the levels."""
        return torch.stack([t / float(torch.tensor(s).prod()) for t, s in zip(self._nll(x), self.shapes, strict=True)]
                           ).mean(0)

    def raw_score(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(unpack_maps(x, self.shapes))[0]  # type: ignore[no-any-return]

    def fit_facts(self) -> dict[str, Any]:
        return {"levels": [list(s) for s in self.shapes], "taps": list(self.taps.taps),
                "flow_steps": self.cfg.flow_steps, "hidden_ratio": self.cfg.hidden_ratio,
                "flow_parameters": sum(p.numel() for p in self.head.parameters() if p.requires_grad),
                "feature_cache": self.cache.facts()}

    def log_likelihood(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per image and level log p of the normalised features (the Gaussian's constant included): what the
        training maximises, for tests and reports."""
        out = []
        for level, m in zip(self.flows, unpack_maps(x, self.shapes), strict=True):
            z, log_det = level(m)
            out.append(log_density(z, (1, 2, 3)) + log_det)
        return out

    # -- export --------------------------------------------------------------------------------------------
    def map_shape(self) -> tuple[int, int]:
        return self.hw

    def export_checks(self, max_batch: int, max_elements: int) -> dict[str, Any]:
        return {"max_batch": max_batch, "levels": [list(s) for s in self.shapes]}

    def export_module(self) -> nn.Module:
        self.taps.cpu().eval()
        self.head.cpu().eval()
        return TapsThenHead(self.taps, self.head).eval()
