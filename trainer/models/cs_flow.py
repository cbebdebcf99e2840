"""CS-Flow (Rudolph et al., "Fully Convolutional Cross-Scale-Flows for Image-based Defect Detection", WACV 2022),
after the official code (marco-rudolph/cs-flow).

Features: the image at 3 scales (input, 1/2, 1/4; the paper's 768/384/192 px), each through the frozen backbone
to one stride-32 level (the paper: EfficientNet-B5's 304-channel stage; here Lite0's tap 14, 192 channels at
stride 32, the end of the same stage of the EfficientNet family; timm CNNs their stride-32 level). At 256 px the
three maps are 8x8, 4x4 and 2x2 (the paper's 24, 12, 6). Resizing is nearest, as the official ``F.interpolate``.

Flow: ``coupling_blocks`` (4) blocks, each a fixed random channel permutation per scale (seeded by the block
index, as the official ``ParallelPermute``) and a cross-scale affine coupling: both halves of every scale's
channels transformed in turn (GLOW-style, the official ``parallel_glow_coupling_layer``), the scales and shifts
of each scale predicted by ``CrossConvolutions``: per scale a k x k convolution to ``hidden`` channels, leaky
ReLU (0.1), then that scale's own k x k convolution plus its finer neighbour's map through a stride-2
convolution and its coarser neighbour's upsampled (bilinear) then convolved, each scale's sum times a learnt
gamma that starts at 0 (so every block starts as the identity). Kernels 3, the last block's 5; soft clamp
``clamp * 0.636 * atan(s / clamp)``, clamp 3. Loss: the official (||z||^2 / 2 - log|det J|) / D over all scales
(here plus the prior's constant), Adam lr 2e-4, eps 1e-4, weight decay 1e-5, gradient norm clipped to 1.

Why not FrEIA: its blocks transform one tensor (or a graph of nodes, each with its own subnet); a coupling
whose subnet sees all three scales at once and returns all three scales' coefficients is not one of its
modules, and the official code carries its own copy of FrEIA's graph for this block. Here it is written once
(``CrossScaleCoupling``, with an exact inverse) and stacked by ``CrossScaleFlow``.

Score (the official evaluate.py): the mean of z^2 / 2 over every element of every scale (so the finest scale,
with 4x the positions, weighs most). Anomaly map: the mean over channels of z^2 / 2 at each position of the
finest scale, upsampled bilinearly to the input (the official localisation), blurred when ``map_sigma`` > 0.

Backbone: EfficientNet-B5's ImageNet weights cannot be had here: the default is Lite0 (offline weights);
``backbone.name: efficientnet_b5`` selects the paper's network (timm, its stride-32 level, 512 channels: timm's
features_only ends the stage after the one the paper taps). ``hidden`` is 256 here, the paper's 1024 (with
Lite0's 192 channels the flow is 43 M parameters, 172 MB, at 256; the paper's 1024 ~ 4x that).

On CPU: the backbone runs once per training image (prepare()'s feature cache, trainer/flows.py) and the flow
trains on the cached maps. Reduced recipe for CPU runs: ``--epochs 20`` to 40 with ``cs_flow.lr: 0.001`` and
``cs_flow.hidden: 64`` instead of the official 240 epochs (4 x 60) at 2e-4 and 1024; the loop keeps the epoch with
the lowest validation loss (or the best validation AUROC with DIR/val defects). Measured on the generated washers
(256 px, 40 training images, 2-core VM, torch graph): image AUROC 0.985 after 40 epochs (hidden 32 and 20 epochs:
0.93; 128 px with the stride-16 tap and 60 epochs: 0.89, the mean over all positions dilutes small defects there).
On the elpv mono solar cells (benchmarks/protocol.py --dataset elpv --cell mono, seed 0, 256 px, hidden 64, lr
1e-3, 20 epochs, shipped codec-robust copies on; through the ONNX graph): image AUROC 0.920, average precision
0.940, 45 img/s on one thread (PatchCore as shipped on the same split: 0.944, docs/training.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.errors import UserError
from trainer.backbones import check_tap_list, resolve_taps
from trainer.features import config_taps
from trainer.flows import FeatureCache, log_likelihood, pack_maps, seeded_numpy, unpack_maps
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
from trainer.models.differnet import ScaledFeatures

if TYPE_CHECKING:
    from trainer.frames import TrainingData

SCALES = 3  # the official n_scales; CrossConvolutions links scale 0-1 and 1-2
CACHE_BYTES = 1 << 30
LEAKY = 0.1


def soft_clamp(s: torch.Tensor, clamp: float) -> torch.Tensor:
    """The official log-scale clamp: clamp * 0.636 * atan(s / clamp), within +-clamp."""
    return clamp * 0.636 * torch.atan(s / clamp)


class CrossConvolutions(nn.Module):
    """The official subnet: three maps (fine to coarse) -> each scale's affine coefficients, every scale seeing
    its neighbours (finer through a stride-2 convolution, coarser upsampled to its size and convolved)."""

    def __init__(self, c_in: int, c_out: int, hidden: int, kernel: int) -> None:
        super().__init__()
        pad = kernel // 2

        def conv(a: int, b: int, stride: int = 1) -> nn.Conv2d:
            return nn.Conv2d(a, b, kernel, padding=pad, stride=stride)

        self.first = nn.ModuleList([conv(c_in, hidden) for _ in range(SCALES)])
        self.second = nn.ModuleList([conv(hidden, c_out) for _ in range(SCALES)])
        self.up = nn.ModuleList([conv(hidden, c_out) for _ in range(SCALES - 1)])  # coarser s+1 -> s
        self.down = nn.ModuleList([conv(hidden, c_out, 2) for _ in range(SCALES - 1)])  # finer s -> s+1
        self.gamma = nn.Parameter(torch.zeros(SCALES))

    def forward(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        ys = [F.leaky_relu(conv(x), LEAKY) for conv, x in zip(self.first, xs, strict=True)]
        outs = [conv(y) for conv, y in zip(self.second, ys, strict=True)]
        for s in range(SCALES - 1):
            size = (int(ys[s].shape[-2]), int(ys[s].shape[-1]))
            outs[s] = outs[s] + self.up[s](F.interpolate(ys[s + 1], size=size, mode="bilinear", align_corners=False))
            outs[s + 1] = outs[s + 1] + self.down[s](ys[s])
        return [out * self.gamma[s] for s, out in enumerate(outs)]


class CrossScaleCoupling(nn.Module):
    """One cross-scale affine coupling (the official parallel_glow_coupling_layer) with its exact inverse:
    x = (x1, x2) per scale; y1 = x1 e^{s(x2)} + t(x2), y2 = x2 e^{s'(y1)} + t'(y1), s and t from all scales."""

    def __init__(self, channels: int, hidden: int, kernel: int, clamp: float) -> None:
        super().__init__()
        self.c1 = channels // 2
        self.c2 = channels - self.c1
        self.clamp = clamp
        self.net2 = CrossConvolutions(self.c2, 2 * self.c1, hidden, kernel)  # x2 -> the coefficients of x1
        self.net1 = CrossConvolutions(self.c1, 2 * self.c2, hidden, kernel)  # y1 -> the coefficients of x2

    def _affine(self, net: nn.Module, given: list[torch.Tensor], moved: list[torch.Tensor], c: int,
                rev: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        out, log_dets = [], []
        for r, x in zip(net(given), moved, strict=True):
            s = soft_clamp(r[:, :c], self.clamp)
            t = r[:, c:]
            out.append((x - t) * torch.exp(-s) if rev else x * torch.exp(s) + t)
            log_dets.append(s.sum((1, 2, 3)))
        return out, log_dets

    def forward(self, xs: Sequence[torch.Tensor], rev: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Maps -> (maps, log|det| per sample summed over the scales); ``rev`` inverts (log|det| negated)."""
        a = [x[:, :self.c1] for x in xs]
        b = [x[:, self.c1:] for x in xs]
        if not rev:
            a, j_a = self._affine(self.net2, b, a, self.c1, False)
            b, j_b = self._affine(self.net1, a, b, self.c2, False)
            sign = 1.0
        else:
            b, j_b = self._affine(self.net1, a, b, self.c2, True)
            a, j_a = self._affine(self.net2, b, a, self.c1, True)
            sign = -1.0
        log_det = sign * (torch.stack(j_a, 0).sum(0) + torch.stack(j_b, 0).sum(0))
        return [torch.cat([p, q], 1) for p, q in zip(a, b, strict=True)], log_det


class CrossScaleFlow(nn.Module):
    """The official get_cs_flow_model: per block a fixed random channel permutation of each scale and a
    cross-scale coupling; maps [N,C,h_s,w_s] x 3 -> (z x 3, log|det dz/dx| [N])."""

    perms: torch.Tensor
    inverse_perms: torch.Tensor

    def __init__(self, channels: int, blocks: int, hidden: int, clamp: float) -> None:
        super().__init__()
        kernels = [3] * (blocks - 1) + [5]  # the official kernel_sizes
        self.blocks = nn.ModuleList([CrossScaleCoupling(channels, hidden, k, clamp) for k in kernels])
        perms = []
        for k in range(blocks):
            with seeded_numpy(k):  # the official ParallelPermute seeds numpy with the block index
                perms.append([np.random.permutation(channels) for _ in range(SCALES)])
        p = torch.from_numpy(np.array(perms, dtype=np.int64))  # [blocks, scales, C]
        self.register_buffer("perms", p)
        self.register_buffer("inverse_perms", torch.argsort(p, dim=-1))

    def forward(self, xs: Sequence[torch.Tensor], rev: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
        zs = list(xs)
        log_det = torch.zeros(zs[0].shape[0], device=zs[0].device)
        order = range(len(self.blocks)) if not rev else reversed(range(len(self.blocks)))
        for k in order:
            if not rev:
                zs = [z.index_select(1, self.perms[k, s]) for s, z in enumerate(zs)]
            zs, j = self.blocks[k](zs, rev=rev)
            log_det = log_det + j
            if rev:
                zs = [z.index_select(1, self.inverse_perms[k, s]) for s, z in enumerate(zs)]
        return zs, log_det


def flat_z(zs: Sequence[torch.Tensor]) -> torch.Tensor:
    """The official concat_maps: every scale's z flattened and concatenated per sample, [N, D]."""
    return torch.cat([z.flatten(1) for z in zs], 1)


class Standardise(nn.Module):
    """Per scale and channel (x - mean) / std with the training features' statistics: a fixed affine first layer
    of the flow (its log|det| a constant). Lite's stage ends are linear bottlenecks with std ~10, so the identity
    the flow starts as (gammas at 0) puts ||z||^2 / 2 near 30 a value, and hundreds of the paper's steps go to
    scaling it down."""

    mean: torch.Tensor
    inv_std: torch.Tensor

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(SCALES, channels))
        self.register_buffer("inv_std", torch.ones(SCALES, channels))

    def fit(self, maps: Sequence[torch.Tensor]) -> None:
        """``maps``: per scale all training maps [N,C,h,w]."""
        for s, m in enumerate(maps):
            v = m.transpose(0, 1).flatten(1).double()
            self.mean[s] = v.mean(1).float()
            self.inv_std[s] = (1.0 / v.std(1).clamp(min=1e-6)).float()

    def forward(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [(m - self.mean[s].view(1, -1, 1, 1)) * self.inv_std[s].view(1, -1, 1, 1) for s, m in enumerate(maps)]


class CsFlowExport(nn.Module):
    """frames uint8 [N,H,W,3] BGR -> (score [N]: mean z^2 / 2 over all scales; map [N,H,W]: the finest scale's
    mean over channels of z^2 / 2, upsampled)."""

    def __init__(self, input_: nn.Module, scaled: ScaledFeatures, standardise: Standardise, flow: CrossScaleFlow,
                 hw: tuple[int, int], sigma: float) -> None:
        super().__init__()
        self.input = input_
        self.scaled = scaled
        self.standardise = standardise
        self.flow = flow
        self.hw = hw
        self.blur = MapBlur(sigma, hw) if sigma > 0 else None

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = [scale[0] for scale in self.scaled(self.input(frames))]
        zs, _ = self.flow(self.standardise(maps))
        score = 0.5 * flat_z(zs).pow(2).mean(1)
        per_position = 0.5 * zs[0].pow(2).mean(1, keepdim=True)
        amap = F.interpolate(per_position, size=self.hw, mode="bilinear", align_corners=False)
        if self.blur is not None:
            amap = self.blur(amap)
        return score, amap.reshape(-1, *self.hw)  # not squeeze: exported as an If, unranked in FP16


@dataclass
class CsFlowSettings(ModelSettings):
    """CS-Flow (Rudolph et al. 2022): a fully convolutional normalizing flow across three scales of the image."""

    layers: Union[List[int], str] = setting(
        "auto", "the one tap of every scale, or auto: the stride-32 level (Lite0: [14], 192 ch, the stage the "
        "paper's EfficientNet-B5 304-channel features end; timm CNNs: their stride-32 level)")
    coupling_blocks: int = setting(4, "cross-scale coupling blocks (the paper's 4; the last has 5x5 kernels)")
    hidden: int = setting(256, "channels of the cross-convolutions' hidden maps (the paper's 1024: ~4x the "
                          "parameters and time)")
    clamp: float = setting(3.0, "soft clamp of the coupling log-scales, clamp x 0.636 x atan(s / clamp) (the "
                           "paper's 3)")
    lr: float = setting(2e-4, "Adam learning rate (eps 1e-4, weight decay 1e-5: the official code's)")
    max_grad_norm: float = setting(1.0, "gradient norm clipped to this before each step (the official 1); 0 = off")
    map_sigma: float = setting(0.0, "Gaussian blur of the anomaly map, input px (the official map has none); 0 = off")
    standardise: bool = setting(True, "standardise each scale's channels with the training features' mean and std "
                                "before the flow (not the paper's: Lite's stage ends have std ~10, and the flow, "
                                "which starts as the identity, spends the short CPU recipe scaling them down)")

    def validate(self) -> None:
        check_tap_list(self.layers, "cs_flow.layers")
        if not isinstance(self.layers, str) and len(self.layers) != 1:
            raise ValueError("cs_flow.layers must be auto or one tap")
        if self.coupling_blocks < 1 or self.hidden < 1:
            raise ValueError("cs_flow.coupling_blocks and hidden must be >= 1")
        if self.clamp <= 0 or self.lr <= 0 or self.max_grad_norm < 0 or self.map_sigma < 0:
            raise ValueError("cs_flow.clamp and lr must be > 0, max_grad_norm and map_sigma >= 0")


def stride32_tap(name: str, taps: Union[List[int], str], key: str) -> list[int]:
    """``auto``: the stride-32 level before the head (Lite: the first stride-32 stage end, Lite0 tap 14; timm:
    the stride-32 tap); a list: checked against the backbone."""
    if not isinstance(taps, str):
        return resolve_taps(name, taps, "top", key)
    from trainer.backbones import levels_of

    levels = levels_of(name)
    at32 = sorted(t for t, (_, stride) in levels.items() if stride == 32)
    if not at32:
        raise UserError(f"{key} auto: backbone {name} has no stride-32 level; name a tap")
    return [at32[0]]


@register_model("cs-flow", settings=CsFlowSettings)
class CsFlow(EpochModel):
    """CS-Flow: the likelihood of three scales' feature maps under one cross-scale normalizing flow."""

    catches = SURFACE_DEFECTS
    family = NORMALIZING_FLOWS
    display_name = "CS-Flow"
    caches_features = True  # prepare() caches the backbone's features: fixed codec-robust draws (trainer/loop.py)
    defaults = ModelDefaults(input_size=256, batch_size=16, epochs=240)  # official batch 16; 4 x 60 epochs
    trains_distributed = False  # the feature cache is per process

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.cfg: CsFlowSettings = config.settings_for(self.name)
        self.hw = config.input.hw
        name = str(config.backbone.name)
        taps = config_taps(config.backbone, stride32_tap(name, self.cfg.layers, "cs_flow.layers"), "top",
                           "cs_flow.layers")
        self.input = taps.input
        self.scaled = ScaledFeatures(taps, self.hw, SCALES).eval()
        with torch.no_grad():
            probe = self._maps(torch.zeros(1, *self.hw, 3, dtype=torch.uint8))
        self.shapes = [tuple(int(d) for d in m.shape[1:]) for m in probe]
        self.channels = self.shapes[0][0]
        self.dim = sum(math.prod(s) for s in self.shapes)
        torch.manual_seed(int(config.seed))
        self.flow = CrossScaleFlow(self.channels, self.cfg.coupling_blocks, self.cfg.hidden, self.cfg.clamp)
        self.standardise = Standardise(self.channels)
        self.optimizer = torch.optim.Adam(self.flow.parameters(), lr=self.cfg.lr, eps=1e-4,
                                     weight_decay=1e-5)
        self.cache = FeatureCache(self._packed, CACHE_BYTES)

    def _maps(self, frames: torch.Tensor) -> list[torch.Tensor]:
        self.input.to(frames.device)
        self.scaled.to(frames.device)
        return [scale[0] for scale in self.scaled(self.input(frames))]

    def _packed(self, frames: torch.Tensor) -> torch.Tensor:
        return pack_maps(self._maps(frames))

    # -- the loop's interface --------------------------------------------------------------------------------
    def networks(self) -> dict[str, nn.Module]:
        return {"flow": self.flow, "standardise": self.standardise}

    def fit(self, data: TrainingData, log: Log = lambda _m: None, run: Optional[RunOptions] = None) -> dict[str, Any]:
        """The standardisation's statistics from the training images (which fills the feature cache), then the
        shared loop."""
        self.require_training_images(data)
        if self.cfg.standardise:
            with torch.no_grad():
                packed = [self.cache(frames) for frames in data.loader(data.fit_paths, int(self.config.batch_size))]
            self.standardise.fit(unpack_maps(torch.cat(packed), self.shapes))
        return super().fit(data, log, run)

    def updates(self) -> list[Update]:
        return [Update("likelihood", self.optimizer, self._loss, max_grad_norm=self.cfg.max_grad_norm)]

    def prepare(self, frames: torch.Tensor) -> torch.Tensor:
        """The three scales' maps packed [B, D] (cached per frame: the backbone is frozen)."""
        return self.cache(frames)

    def _z(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        return self.flow(self.standardise(unpack_maps(x.float(), self.shapes)))

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        """Per image -log p(x) / D over all scales: the official loss plus the prior's constant."""
        zs, log_det = self._z(x)
        return -log_likelihood(flat_z(zs), log_det) / self.dim

    def _loss(self, x: torch.Tensor, _shared: dict[str, Any]) -> LossParts:
        loss = self.nll(x).mean()
        return loss, {"nll": loss}

    def validation_loss(self, x: torch.Tensor) -> torch.Tensor:
        return self.nll(x)

    def raw_score(self, x: torch.Tensor) -> torch.Tensor:
        zs, _ = self._z(x)
        return 0.5 * flat_z(zs).pow(2).mean(1)

    def fit_facts(self) -> dict[str, Any]:
        return {"scale_shapes": [list(s) for s in self.shapes], "feature_cache": self.cache.facts(),
                "flow_parameters": sum(p.numel() for p in self.flow.parameters())}

    # -- export ----------------------------------------------------------------------------------------------
    def map_shape(self) -> tuple[int, int]:
        return self.hw

    def export_checks(self, max_batch: int, max_elements: int) -> dict[str, Any]:
        """The flow's largest intermediate: the finest scale's hidden map."""
        _, h, w = self.shapes[0]
        largest = max_batch * self.cfg.hidden * h * w
        if largest > max_elements:
            raise UserError(f"cs-flow: export.max_batch {max_batch} x {self.cfg.hidden} hidden channels x {h}x{w} "
                            f"exceeds export.max_distance_elements {max_elements}; lower export.max_batch, "
                            "cs_flow.hidden or the input size")
        return {"max_batch": max_batch, "largest_tensor_elements": largest,
                "scale_shapes": [list(s) for s in self.shapes]}

    def export_module(self) -> nn.Module:
        self.flow.cpu().eval()
        self.input.cpu()
        self.scaled.cpu().eval()
        self.standardise.cpu()
        return CsFlowExport(self.input, self.scaled, self.standardise, self.flow, self.hw, self.cfg.map_sigma).eval()
