"""CFLOW-AD (Gudovskiy et al., "CFLOW-AD: Real-Time Unsupervised Anomaly Detection with Localization via
Conditional Normalizing Flows", WACV 2022), after the official code (github.com/gudovskiy/cflow-ad) and
anomalib's port.

Per backbone level a conditional normalizing flow learns the density of the feature vector at a position given
where it is: FrEIA AllInOneBlocks (``coupling_blocks``: 8; affine coupling soft-clamped at ``clamp_alpha`` 1.9,
global affine SOFTPLUS scaling, a soft (random orthogonal) permutation), each block's subnet fully connected
(Linear(c, 2c) - ReLU - Linear(2c, ...), the official subnet_fc, c = half the channels + the condition), the
condition a 2D sinusoidal positional encoding of ``condition_dims`` (128) channels. Trained by maximum
likelihood on random subsets of the positions (the paper's fiber batches): loss = -logsigmoid(log p / C)
averaged over the fiber, log p the Gaussian log-likelihood of z plus the blocks' summed log-dets (the official
get_logp and log_theta).

Map and score (the official test path): per level log p / C at every position; exp(log p / C - max) turns it
into a likelihood in (0, 1]; upsampled (bilinear, align_corners as there) to the input and summed across the
levels; the anomaly map is (levels - that sum), the official "max - map" with the constant fixed; the image
score is the map's maximum (the official score_label = np.max(super_mask)). The official ``max`` is taken
over the whole test set at once; a station scores frame by frame, so here it is a per-level constant fixed at
the end of the fit: the highest log p / C over the training images' positions (test positions can exceed it a
little; their likelihood is then just above 1). No blur (``blur_sigma`` 0; the official code has none).

What differs from the paper, and why:
- backbone: the paper's WideResNet-50 layers 1-3 (stride 4, 8, 16; no ImageNet weights on this machine) become
  the configured backbone's ``three`` role: Lite0 blocks [2, 4, 7] (24, 40, 80 channels at stride 4, 8, 16).
  ``backbone.name: wide_resnet50_2`` with its weights file gives the paper's levels. Measured cost of its
  256/512/1024 channels (the flows alone, 160 px grids, one thread): 24.7 M flow parameters against Lite0's
  1.49 M, and one image batch's 24 fiber steps 67 s against 7.2 s on the shared VM under load (9x), before the
  backbone's own cost (not measurable here: no ImageNet weights).
- the recipe is reduced for CPU, on cached backbone features (trainer/flows.py's FeatureCache: the backbone runs
  once per training image): the official code takes *every* position of each batch in fiber batches of 256, one
  Adam step each (a 160 px batch of 16: 100 + 25 + 7 steps for the three levels), for 25 x 8 epochs with
  warm-up and cosine decay of lr 2e-4. Here each image batch gives each level ``fibers`` (8) fiber batches of
  256 positions drawn without replacement (``fibers: 0`` = every position, the official count), at a constant
  ``lr`` (1e-3, to converge in fewer steps), for ``epochs`` (default 30).
- features standardised per channel (``standardise``, the training features' mean and std, a fixed affine layer
  before the flow whose log-det is counted): Lite's block outputs are linear bottlenecks with a std of about 10
  and means up to 17, and the flows, started near the identity, did not reach them in a CPU recipe (washers,
  8 epochs: image AUROC 0.47 without, 0.99 with); WideResNet's post-ReLU features are of order 1.
- input 160 px (the paper's 256 and 512 crops), batch 16 (32).

Measured (benchmarks/protocol.py --dataset elpv --cell mono --model cflow --seeds 1 --threads 1, shipped settings,
seed 0, 2026-12-07, a 2-core VM at load average 10-17): image AUROC 94.6, AP 95.9, F1 at the shipped threshold
81.8 (recall 69.6, false alarms 0.7 %); PatchCore 94.4 and PaDiM 95.8 on the same draw. Fit 3 827 s (the load:
about 2 s of CPU a batch), 38 img/s through the FP32 graph on one thread.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, List, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from trainer.backbones import check_tap_list
from trainer.features import config_taps
from trainer.flows import (
    FeatureCache,
    Shape,
    TapsThenHead,
    fc_subnet,
    flow,
    log_likelihood,
    pack_maps,
    score_and_map,
    unpack_maps,
)
from trainer.ingraph import MapBlur
from trainer.loop import EpochModel, Log, LossParts, Update
from trainer.models import (
    NORMALIZING_FLOWS,
    SURFACE_DEFECTS,
    ModelDefaults,
    ModelSettings,
    RunOptions,
    register_model,
    setting,
)

if TYPE_CHECKING:
    from trainer.frames import TrainingData


def positional_encoding_2d(dims: int, h: int, w: int) -> torch.Tensor:
    """The official positionalencoding2d: [dims, h, w], the first half sin/cos of the column, the second of the
    row, at geometrically spaced frequencies (dims a multiple of 4)."""
    if dims % 4 != 0:
        raise ValueError(f"positional encoding dims must be a multiple of 4, got {dims}")
    p = torch.zeros(dims, h, w)
    half = dims // 2
    div = torch.exp(torch.arange(0.0, half, 2) * -(math.log(1e4) / half))
    pos_w = torch.arange(0.0, w).unsqueeze(1)
    pos_h = torch.arange(0.0, h).unsqueeze(1)
    p[0:half:2] = torch.sin(pos_w * div).t().unsqueeze(1).repeat(1, h, 1)
    p[1:half:2] = torch.cos(pos_w * div).t().unsqueeze(1).repeat(1, h, 1)
    p[half::2] = torch.sin(pos_h * div).t().unsqueeze(2).repeat(1, 1, w)
    p[half + 1::2] = torch.cos(pos_h * div).t().unsqueeze(2).repeat(1, 1, w)
    return p


class LevelFlow(nn.Module):
    """One level's conditional flow: feature vectors [E,C] with their positions' encodings [E,P] -> log p / C [E];
    on a whole map [N,C,h,w] -> [N,h,w]. ``log_p_max`` is the level's normalising constant (set after the fit)."""

    condition: torch.Tensor
    log_p_max: torch.Tensor
    shift: torch.Tensor
    scale: torch.Tensor

    def __init__(self, channels: int, grid: tuple[int, int], cond_dims: int, blocks: int, clamp: float,
                 seed: int) -> None:
        super().__init__()
        self.channels = channels
        self.grid = grid
        self.flow = flow((channels,), [fc_subnet(2.0)] * blocks, clamp, seed, cond_dims=(cond_dims,),
                         permute_soft=True)
        self.register_buffer("condition", positional_encoding_2d(cond_dims, *grid).flatten(1).t().contiguous())
        self.register_buffer("log_p_max", torch.tensor(0.0))
        self.register_buffer("shift", torch.zeros(channels))
        self.register_buffer("scale", torch.ones(channels))

    def standardise_with(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """x -> (x - mean) / std per channel before the flow: a fixed affine first layer (its log-det counted)."""
        self.shift.copy_(mean)
        self.scale.copy_(1.0 / std.clamp(min=1e-6))

    def vectors(self, e: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """log p / C of feature vectors e [E,C] at positions encoded c [E,P] (the official decoder_log_prob / C)."""
        z, log_det = self.flow((e - self.shift) * self.scale, c=[c])
        return (log_likelihood(z, log_det) + self.scale.log().sum()) / self.channels

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        """[N,C,h,w] -> log p / C [N,h,w] at every position."""
        e = feature.permute(0, 2, 3, 1).reshape(-1, self.channels)
        # the encoding repeated for every frame by a broadcast Add with a [N,1,1] zero taken from the features: an
        # expand to the batch would read the batch from a Shape, leaving the rows' count unknown to ONNX shape
        # inference (TensorRT readiness wants every shape fixed once the batch is)
        zero = feature[:, :1, :1, :1].reshape(-1, 1, 1) * 0.0
        c = (zero + self.condition.unsqueeze(0)).reshape(-1, self.condition.shape[1])
        return self.vectors(e, c).reshape(-1, *self.grid)


class CflowHead(nn.Module):
    """Feature maps of the levels -> (score [N], anomaly map [N,H,W]): levels - sum of the upsampled
    exp(log p / C - max)."""

    def __init__(self, levels: list[LevelFlow], hw: tuple[int, int], blur_sigma: float) -> None:
        super().__init__()
        self.likelihood = nn.ModuleList(levels)
        self.hw = hw
        self.blur = MapBlur(blur_sigma, hw) if blur_sigma > 0 else None

    def forward(self, maps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        total: Optional[torch.Tensor] = None
        for level, feature in zip(self.likelihood, maps, strict=True):
            prob = torch.exp(level(feature) - level.log_p_max)
            up = F.interpolate(prob.unsqueeze(1), size=self.hw, mode="bilinear", align_corners=True)
            total = up if total is None else total + up
        assert total is not None
        amap = float(len(self.likelihood)) - total
        return score_and_map(amap, self.blur, self.hw)


@dataclass
class CflowSettings(ModelSettings):
    """CFLOW-AD (Gudovskiy et al. 2022): per level a flow of the features conditioned on their position."""

    layers: Union[List[int], str] = setting(
        "auto", "taps, finer first, or auto: stride 4, 8 and 16, the paper's WideResNet-50 layers 1-3 (Lite0: "
        "[2, 4, 7])")
    coupling_blocks: int = setting(8, "AllInOneBlocks per level (the paper's 8)")
    condition_dims: int = setting(128, "channels of the 2D positional encoding the flows are conditioned on "
                                  "(the paper's 128; a multiple of 4)")
    clamp_alpha: float = setting(1.9, "soft clamp of the coupling's log-scale (the paper's 1.9)")
    fiber_batch: int = setting(256, "positions per fiber batch, one Adam step each (the paper's 256)")
    fibers: int = setting(
        8, "fiber batches per level per image batch, drawn without replacement from its positions; 0 = every "
        "position, the paper's (a 160 px batch of 16: 100, 25 and 7 steps for the three levels)")
    lr: float = setting(0.001, "Adam learning rate, constant (the official 2e-4 with warm-up and cosine decay "
                        "over 200 epochs of many more steps)")
    standardise: bool = setting(
        True, "standardise each channel with the training features' mean and std before the flow (a fixed "
        "affine first layer): Lite's block outputs are linear bottlenecks with std ~10, WideResNet's post-ReLU ~1")
    cache_mb: int = setting(1024, "host memory for the cached backbone features of the training images, MB "
                            "(Lite0 at 160 px: 0.25 MB an image); past it the backbone runs again")
    blur_sigma: float = setting(0.0, "Gaussian blur of the anomaly map, px (the official code has none); 0 = off")

    def validate(self) -> None:
        check_tap_list(self.layers, "cflow.layers")
        if self.coupling_blocks < 1 or self.fiber_batch < 1 or self.fibers < 0 or self.cache_mb < 0:
            raise ValueError("cflow.coupling_blocks and fiber_batch must be >= 1, fibers and cache_mb >= 0")
        if self.condition_dims < 4 or self.condition_dims % 4:
            raise ValueError("cflow.condition_dims must be a positive multiple of 4 (sin and cos of rows and columns)")
        if self.clamp_alpha <= 0 or self.lr <= 0 or self.blur_sigma < 0:
            raise ValueError("cflow.clamp_alpha and lr must be > 0, blur_sigma >= 0")


@register_model("cflow", settings=CflowSettings)
class Cflow(EpochModel):
    """CFLOW-AD: conditional normalizing flows of the backbone's features per position; low likelihood = defect."""

    catches = SURFACE_DEFECTS
    family = NORMALIZING_FLOWS
    display_name = "CFLOW-AD"
    caches_features = True  # prepare() caches the backbone's features: fixed codec-robust draws (trainer/loop.py)
    map_in_score_units = True  # score = max of the unsmoothed map
    defaults = ModelDefaults(input_size=160, batch_size=16, epochs=30)
    # One process: the feature cache and the normalising constants are this process's; DDP would also have to
    # leave the levels a step does not touch without gradients.
    trains_distributed = False
    # The flows (their log-dets summed over 8 blocks) and exp(log p / C - max) stay FP32 in model.fp16.onnx; only
    # the backbone is FP16: FP16 flushes likelihoods below 6e-8 to 0, where the map saturates.
    fp32_scopes = ("/head/",)

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.cfg: CflowSettings = config.settings_for(self.name)
        self.hw = config.input.hw
        self.taps = config_taps(config.backbone, self.cfg.layers, "three", "cflow.layers").eval()
        for p in self.taps.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            probe = self.taps(torch.zeros(1, *self.hw, 3, dtype=torch.uint8))
        self.shapes: list[Shape] = [tuple(int(s) for s in m.shape[1:]) for m in probe]
        torch.manual_seed(int(config.seed))
        self.flows = [
            LevelFlow(c, (h, w), self.cfg.condition_dims, self.cfg.coupling_blocks, self.cfg.clamp_alpha,
                      int(config.seed) * 1000 + i)
            for i, (c, h, w) in enumerate(self.shapes)]
        self.levels = nn.ModuleList(self.flows)
        self.head = CflowHead(self.flows, self.hw, self.cfg.blur_sigma)
        self.optimizers = [torch.optim.Adam(level.parameters(), lr=self.cfg.lr) for level in self.flows]
        self.cache = FeatureCache(lambda frames: pack_maps(self.taps(frames)), self.cfg.cache_mb * 1_000_000)
        self._normalised_on = 0

    # -- the loop's interface ------------------------------------------------------------------------------
    def networks(self) -> dict[str, nn.Module]:
        return {"levels": self.levels}

    def fibers_per_level(self) -> list[int]:
        """Optimiser steps per level and image batch: ``fibers``, or (0) enough fibers to cover every position."""
        if self.cfg.fibers:
            return [self.cfg.fibers] * len(self.shapes)
        batch = int(self.config.batch_size)
        return [max(1, math.ceil(batch * h * w / self.cfg.fiber_batch)) for _c, h, w in self.shapes]

    def updates(self) -> list[Update]:
        """Level by level, its fibers in turn (the official order); one Adam per level, shared by its fibers."""
        return [Update(f"level{i}.fiber{f}", self.optimizers[i], self._fiber_loss(i, f))
                for i, fibers in enumerate(self.fibers_per_level()) for f in range(fibers)]

    def _fiber_loss(self, i: int, fiber: int) -> Any:
        def loss(x: torch.Tensor, shared: dict[str, Any]) -> LossParts:
            if "maps" not in shared:
                shared["maps"] = unpack_maps(x, self.shapes)
            level = self.flows[i]
            e = shared["maps"][i].permute(0, 2, 3, 1).reshape(-1, level.channels)  # rows run (image, position)
            order = shared.setdefault(f"order{i}", torch.randperm(e.shape[0], device=e.device))
            n = self.cfg.fiber_batch
            pick = order[(fiber * n + torch.arange(n, device=e.device)) % e.shape[0]]  # wraps on a small batch
            log_p = level.vectors(e[pick], level.condition[pick % level.condition.shape[0]])
            value = -F.logsigmoid(log_p).mean()
            return value, {f"loss{i}": value}
        return loss

    def prepare(self, frames: torch.Tensor) -> torch.Tensor:
        self.taps.to(frames.device)
        return self.cache(frames)

    def _log_p(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [level(m) for level, m in zip(self.flows, unpack_maps(x, self.shapes), strict=True)]

    def validation_loss(self, x: torch.Tensor) -> torch.Tensor:
        """Mean over levels and positions of -log p / C (per-dimension negative log-likelihood)."""
        return -torch.stack([lp.flatten(1).mean(1) for lp in self._log_p(x)]).mean(0)

    def raw_score(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(unpack_maps(x, self.shapes))[0]  # type: ignore[no-any-return]

    # -- fit -----------------------------------------------------------------------------------------------
    def fit(self, data: TrainingData, log: Log = lambda _m: None, run: Optional[RunOptions] = None) -> dict[str, Any]:
        """Train the flows through the shared loop, then fix each level's normalising constant."""
        self.require_training_images(data)
        if self.cfg.standardise:
            self._standardise(data)
        facts = super().fit(data, log, run)
        t0 = time.monotonic()
        self._normalise(data)
        constants = [round(float(level.log_p_max), 3) for level in self.flows]
        log(f"cflow: normalising constants (max log p / C per level) {constants}"
            f" from {self._normalised_on} training images, {time.monotonic() - t0:.1f}s")
        return facts

    @torch.no_grad()
    def _standardise(self, data: TrainingData) -> None:
        """Each level's per-channel mean and standard deviation over the training images' positions."""
        sums = [torch.zeros(3, c, dtype=torch.float64) for c, _h, _w in self.shapes]
        for frames in data.loader(data.fit_paths, int(self.config.batch_size)):
            for acc, m in zip(sums, unpack_maps(self.prepare(frames).cpu(), self.shapes), strict=True):
                v = m.double().transpose(0, 1).flatten(1)
                acc += torch.stack([torch.full_like(v[:, 0], v.shape[1]), v.sum(1), v.pow(2).sum(1)])
        for level, (n, s1, s2) in zip(self.flows, sums, strict=True):
            mean = s1 / n
            level.standardise_with(mean.float(), (s2 / n - mean.pow(2)).clamp(min=0).sqrt().float())

    @torch.no_grad()
    def _normalise(self, data: TrainingData) -> None:
        """log_p_max of each level: the highest log p / C over the training images' positions (the official
        code's max over the test set, fixed here so that a frame's score does not depend on the others')."""
        device = next(self.levels.parameters()).device
        self.levels.eval()
        best = [-math.inf] * len(self.flows)
        n = 0
        for frames in data.loader(data.fit_paths, int(self.config.batch_size)):
            for i, lp in enumerate(self._log_p(self.prepare(frames.to(device)))):
                best[i] = max(best[i], float(lp.max()))
            n += int(frames.shape[0])
        for level, value in zip(self.flows, best, strict=True):
            level.log_p_max.fill_(value)
        self._normalised_on = n

    def fit_facts(self) -> dict[str, Any]:
        return {"levels": [list(s) for s in self.shapes], "taps": list(self.taps.taps),
                "coupling_blocks": self.cfg.coupling_blocks, "condition_dims": self.cfg.condition_dims,
                "fiber_batch": self.cfg.fiber_batch, "fibers_per_level": self.fibers_per_level(),
                "flow_parameters": sum(p.numel() for p in self.levels.parameters() if p.requires_grad),
                "feature_cache": self.cache.facts()}

    # -- export --------------------------------------------------------------------------------------------
    def map_shape(self) -> tuple[int, int]:
        return self.hw

    def export_checks(self, max_batch: int, max_elements: int) -> dict[str, Any]:
        """What the export holds. The flows' largest intermediate, the first subnet layer at the finest level
        (positions x 2 (C/2 + P): 0.45 M elements a 160 px frame), is smaller than the backbone's own (Lite0's first
        expanded block, 0.6 M), and no distance matrix grows with the data: ``export.max_distance_elements`` does
        not bound the batch here."""
        per_frame = max(h * w * 2 * (c - c // 2 + self.cfg.condition_dims) for c, h, w in self.shapes)
        return {"max_batch": max_batch, "largest_flow_tensor_elements": max_batch * per_frame,
                "levels": [list(s) for s in self.shapes]}

    def export_module(self) -> nn.Module:
        self.taps.cpu().eval()
        self.levels.cpu().eval()
        return TapsThenHead(self.taps, self.head).eval()
