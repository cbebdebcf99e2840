"""HTD (Sheynin, Benaim & Wolf, "A Hierarchical Transformation-Discriminating Generative Model for Few Shot
Anomaly Detection", ICCV 2021; official code github.com/shellysheynin/A-Hierarchical-Transformation-
Discriminating-Generative-Model-for-Few-Shot-Anomaly-Detection).

A SinGAN-like pyramid of patch GANs trained on the k good images at once, coarsest scale first. Scales: from the
input size S down to ``min_size`` (25) by a factor near 0.75 (SinGAN's ``adjust_scales2image``: the factor is
set so the coarsest side is min_size exactly): 25, 32 at S = 32; 25, 32, 40, 51, 64 at S = 64. At every scale a
generator G_s (5 conv 3x3 blocks, no padding, BatchNorm, LeakyReLU 0.2, tanh; its input: noise times the scale's
noise amplitude plus the upsampled image of the coarser scales, and one constant channel holding the image's index,
the official ``pad_image_id``, so one generator serves the k images) adds detail to the upsampled coarser output.
Its discriminator D_s (the same body) is a patch classifier with T + 1 outputs per patch (receptive field 11 px):
which of the T transformations was applied to a real image, or "fake" (class T) for the generator's images.

Transformations (the official grayscale set, 42): flip {no, yes} x {tx -1, +1, 0 with ty -1; tx, ty in {0, +1} with
rot90 k in {0..3}; tx -1 with ty +1, 0}; a unit shift is int(0.15 x side) px with a reflected border (the official
kornia warp with ``padding_mode='reflection'``, which repeats the edge pixel), then rot90. They are fixed pixel
permutations: the copies of a frame are one Gather with constant indices (trainer/transformations.py, shared with
GEOM), at every scale, in training and in the exported graph alike.

Losses per scale (the official ``train_single_scale``): D: cross-entropy of D(T_t(real)) with target t at every
patch plus cross-entropy of D(T_t(fake)) with target T; G: cross-entropy of D(T_t(fake)) with target t (the
generator wants its images taken for correctly transformed real ones) plus alpha (100) x MSE of its reconstruction:
G_s fed a fixed noise map z_opt_s (one per scale, shared by the images as in the official code) times the noise
amplitude plus the reconstruction of the coarser scales. Noise amplitude of scale s > 0 per image: 0.1 x the mean
absolute error between the image and the coarser scales' reconstruction (the official ``noise_amp_init * RMSE``,
whose elementwise sqrt of a squared error is that); scale 0: 1. When a scale has as many channels as the previous
one its G and D start from the previous scale's weights (the official ``nfc_prev == nfc``). Adam (lr 5e-4, betas
(0.5, 0.999)); per scale D's learning rate drops to a tenth after 500 iterations and G's after 1000 (the
official MultiStepLR milestones of niter 5000; with the reduced recipe below they are not reached).

Score (the official ``anomaly_detection``): at every scale s, the test image resized to the scale's side, its T
copies through D_s, softmax over the T transformation outputs (the fake output left out before the softmax), the
probability of the right transformation averaged over the patches and summed over t: a normality in [0, T]. The
scales' normalities are averaged and negated (higher = more anomalous), then min-max scaled with calibration
constants. The official code reports this aggregate ("without norm") and a second one that min-max normalises each
scale over the test set's own scores before averaging; a station scores one frame without the test set, so only the
first is in the graph. Anomaly map (a coarse pointer, not a localisation the paper claims): 1 - the probability of
"untransformed" per patch of the identity copy at the finest scale, edge-padded by the 5 px the unpadded
convolutions take off and blurred. Test-time cost: T x (number of scales) discriminator passes per frame (84 at
32 px, 210 at 64 px), all in one graph.

The shared loop (trainer/loop.py) runs everything: the generator's then the discriminator's update per batch
(trainer/adversarial.py's Adam pair); ``epochs`` are split evenly over the scales, coarsest first (the scale of an
epoch is a function of the epoch alone, so ``--resume`` continues the same scale); each scale's start (noise
amplitudes, the copy of the previous scale's weights) and its learning-rate drops run from the updates'
``lr_factor``, which the loop calls at every epoch's start. The image index of each frame of a batch is its
nearest training image (the training frames are read once before the loop; they are not kept in the bundle).

Differs from the official code, for a CPU station (all settings): ``per_image`` (8) random transformations of each
image per step instead of all 42, one D and one G step per batch instead of 3 each, ``epochs`` (200 at 32 px: 100
iterations per scale) instead of 5000 iterations per scale; grey inputs stay one channel (the official code repeats
grey to RGB); colour inputs use the same 42 geometric transformations (the official RGB set adds grey-conversion
copies); the input side must be a power of two (trainer/adversarial.py's check) and the finest scale is the input
size (the official code resizes to at most 64 px first: the shipped 32-64 px inputs are within it); the upsampling
between scales is bilinear (the official ``imresize`` is MATLAB's bicubic with antialiasing).

Measured (one thread on a shared 2-core CPU, load 9-14): Fashion-MNIST trousers normal, 10 training images at
32 px, 20 + 20 test images: image AUROC 0.995 (tests/test_trainer_htd.py: nfc 8, per_image 4, 30 epochs; fit 42 s
under load); 40 + 40 test images: 0.99 at nfc 16, per_image 8, 60 epochs; 0.97 at nfc 8, per_image 6, 30 epochs.
On the generated washers with a planted nut: at chance (0.38-0.5), like GEOM: the parts look alike under flips and
90-degree rotations.

Few-shot protocol, Fashion-MNIST, seed 0, 32 px, 300 test images (stratified, one-normal's test), image AUROC %:
``OMP_NUM_THREADS=1 python benchmarks/protocol.py --dataset fashion-mnist --protocol few-shot --shots 1,5,10
--models htd --classes 0,1,2 --seeds 1 --test-limit 300 --threads 1 --epochs 60 --set htd.nfc=16`` (HTD: nfc 16,
30 iterations a scale, 8 transformations a step; 3.8 min a run), PatchCore and GEOM by the same command with
``--models patchcore,geom`` and no --epochs / --set (GEOM: its paper recipe, simple score at k = 1; PatchCore: taps
[4, 10], whole memory bank; with its 2.5 % coreset it was 74.4 / 59.7 / 78.0):

                 k = 1                    k = 5                    k = 10
    class        HTD   PatchCore  GEOM    HTD   PatchCore  GEOM    HTD   PatchCore  GEOM
    0 T-shirt    59.5  64.8       82.1    60.3  69.8       77.9    61.6  73.6       83.0
    1 Trouser    94.2  90.4       84.5    97.6  93.3       98.3    97.0  94.6       98.4
    2 Pullover   72.9  66.5       75.2    74.7  67.7       68.2    74.1  69.1       70.3
    mean         75.5  73.9       80.6    77.5  76.9       81.5    77.5  79.1       83.9

One seed only (the machine's time); GEOM ahead at every k here, HTD level with PatchCore. The reduced recipe costs
HTD something: its shipped defaults (nfc 32, 100 iterations a scale) on T-shirt, k = 5: 64.6 (vs 60.3; 5.5 min a
run). The paper's full recipe (5000 iterations a scale, all 42 transformations, 3 D and 3 G steps) was not run.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import UserError
from trainer.adversarial import AdversarialModel, check_adversarial
from trainer.ingraph import FrameInput, MapBlur, ScoreScale
from trainer.loop import LossParts, Update
from trainer.models import (
    FOREIGN_OBJECTS,
    SELF_SUPERVISED,
    ModelDefaults,
    ModelSettings,
    RunOptions,
    register_model,
    setting,
)
from trainer.transformations import GeometricCopies, Transformation

if TYPE_CHECKING:
    from trainer.frames import TrainingData

ELEMENT_LIMIT = 2**31  # TensorRT's limit on one tensor (trainer/tensorrt_readiness.py checks it too)
TRANSLATION_RATIO = 0.15  # the official ``translation``: a unit shift is int(side x 0.15) px
LAYERS = 5  # conv blocks of every G and D (the official num_layer)
KERNEL = 3
SHRINK = LAYERS * (KERNEL - 1)  # unpadded convolutions take 10 px off each side pair: D's patch grid is S - 10
DROP_FACTOR = 0.1  # the official MultiStepLR gamma


def htd_transformations(size: int) -> list[Transformation]:
    """The official grayscale set of 42 (flip, tx, ty, k) at side ``size``, the identity first."""
    s = int(size * TRANSLATION_RATIO)
    grid = itertools.product((False, True), (0, 1), (0, 1), range(4))  # the official generator 1 (32)
    left = itertools.product((False, True), (-1, 1, 0), (-1,), (0,))  # generator 0 (6)
    down = itertools.product((False, True), (-1,), (1, 0), (0,))  # generator 3 (4)
    return [(f, tx * s, ty * s, k) for f, tx, ty, k in itertools.chain(grid, left, down)]


def pyramid_sizes(size: int, min_size: int, factor: float = 0.75) -> list[int]:
    """Sides of the scales, coarsest first (SinGAN's ``adjust_scales2image`` for an input no larger than its
    max_size): ceil(log(min_size / size) / log(factor)) steps down, the factor adjusted to land on min_size."""
    if size <= min_size:
        return [size]
    steps = math.ceil(math.log(min_size / size) / math.log(factor))
    f = (min_size / size) ** (1.0 / steps)
    return [int(round(size * f ** (steps - i))) for i in range(steps + 1)]


def scale_width(nfc: int, scale: int) -> int:
    """Channels at ``scale``: doubled every 4 scales, at most 128 (the official ``nfc_init * 2^floor(s/4)``)."""
    return min(nfc * 2 ** (scale // 4), 128)


class PatchNet(nn.Module):
    """SinGAN's body: 5 unpadded 3x3 conv blocks (BatchNorm, LeakyReLU 0.2), ``width`` channels, then a 3x3 conv
    to ``out``; the side shrinks by 10."""

    def __init__(self, c_in: int, out: int, width: int) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        for i in range(LAYERS - 1):
            blocks += [nn.Conv2d(c_in if i == 0 else width, width, KERNEL), nn.BatchNorm2d(width),
                       nn.LeakyReLU(0.2)]
        self.body = nn.Sequential(*blocks)
        self.tail = nn.Conv2d(width, out, KERNEL)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.body(x))


class ScaleGenerator(nn.Module):
    """G_s: (noise + upsampled coarser image, image-index channel), both zero-padded by 5 -> tanh detail + the
    coarser image (the official GeneratorConcatSkip2CleanAdd)."""

    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        self.net = PatchNet(channels + 1, channels, width)

    def forward(self, z_in: torch.Tensor, prev: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        p = SHRINK // 2
        id_map = ids.to(z_in.dtype).view(-1, 1, 1, 1).expand(-1, 1, *z_in.shape[2:])
        detail = torch.tanh(self.net(F.pad(torch.cat([z_in, id_map], 1), (p, p, p, p))))
        return detail + prev


class RightTransformation(nn.Module):
    """Discriminator logits of the T copies [N*T, T+1, h, w] -> (normality [N] in [0, T], P(untransformed) per
    patch of the identity copy [N, h, w]): softmax over the T transformation outputs (the fake output left out),
    copy t's probability of t, averaged over the patches and summed over t. Kept FP32 in model.fp16.onnx."""

    right: torch.Tensor

    def __init__(self, count: int) -> None:
        super().__init__()
        self.count = count
        self.register_buffer("right", torch.eye(count).view(1, count, count, 1, 1))  # picks p(t) of copy t

    def forward(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t, h, w = self.count, int(logits.shape[2]), int(logits.shape[3])
        p = torch.softmax(logits[:, :t].float(), dim=1).reshape(-1, t, t, h, w)
        right = (p * self.right).sum(2)  # [N, T, h, w]: the right transformation's probability per patch
        return right.mean((2, 3)).sum(1), right[:, 0]


class ScaleScorer(nn.Module):
    """One scale's discriminator on the frame's copies: x [N,C,S,S] -> logits [N*T, T+1, s-10, s-10] (resized
    to the scale's side s, transformed, classified per patch)."""

    def __init__(self, side: int, input_side: int, copies: GeometricCopies, discriminator: PatchNet) -> None:
        super().__init__()
        self.side, self.input_side = side, input_side
        self.copies = copies
        self.discriminator = discriminator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.side != self.input_side:
            x = F.interpolate(x, size=(self.side, self.side), mode="bilinear", align_corners=False)
        return self.discriminator(self.copies(x))  # type: ignore[no-any-return]


class ScaleMean(nn.Module):
    """The scales' normalities [N] each -> the score [N] (normality_score), FP32 in model.fp16.onnx."""

    def forward(self, normalities: list[torch.Tensor]) -> torch.Tensor:
        return normality_score(normalities)


def normality_score(normalities: list[torch.Tensor]) -> torch.Tensor:
    """The official aggregate: the scales' normalities averaged; negated so that higher = more anomalous."""
    return -torch.stack(normalities, 0).mean(0)


class HtdExport(nn.Module):
    """frames uint8 [N,S,S,3] BGR -> (score float32 [N], anomaly_map float32 [N,S,S])."""

    edge: torch.Tensor

    def __init__(self, frame_input: FrameInput, scorers: nn.ModuleList, head: RightTransformation,
                 scale: ScoreScale, blur: Optional[MapBlur], side: int) -> None:
        super().__init__()
        self.frame_input = frame_input
        self.scorers = scorers
        self.head = head  # one module for every scale: one constant in the graph
        self.scale = scale
        self.blur = blur
        self.aggregate = ScaleMean()
        # the patch grid (side - 10) edge-padded back to the side: a Gather with constant indices, whose output
        # shape ONNX knows (a replicate Pad's it does not: TensorRT wants it fixed)
        self.register_buffer("edge", (torch.arange(side) - SHRINK // 2).clamp(0, side - SHRINK - 1))

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.frame_input(frames)
        normalities, finest = [], x
        for scorer in self.scorers:
            normality, finest = self.head(scorer(x))
            normalities.append(normality)
        amap = (1.0 - finest[:, None]).index_select(2, self.edge).index_select(3, self.edge)
        if self.blur is not None:
            amap = self.blur(amap)
        return self.scale(self.aggregate(normalities)), amap[:, 0]


class HtdState(nn.Module):
    """What training keeps beside the networks, checkpointed with them: the fixed reconstruction noise of every
    scale and every training image's noise amplitude per scale."""

    amps: torch.Tensor

    def __init__(self, sides: list[int], channels: int, n_images: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        for s, side in enumerate(sides):  # one map per scale, the same for every image and channel (official)
            self.register_buffer(f"z_opt{s}", torch.randn(1, 1, side, side, generator=g).expand(1, channels, -1, -1)
                                 .clone())
        self.register_buffer("amps", torch.ones(len(sides), n_images))

    def z_opt(self, s: int) -> torch.Tensor:
        return getattr(self, f"z_opt{s}")  # type: ignore[no-any-return]


@dataclass
class HtdSettings(ModelSettings):
    """HTD (Sheynin et al. 2021): a pyramid of patch GANs on the few training images whose discriminators also
    tell which of 42 flips / shifts / 90-degree rotations was applied; score = how well they tell it on a test
    frame. Input: a square power of two from 32 (it rotates by 90 degrees)."""

    nfc: int = setting(32, "channels of every G and D at the first 4 scales (doubled every 4 scales, at most 128; "
                       "the official nfc 32); cost grows as nfc^2")
    min_size: int = setting(25, "side of the coarsest scale, px (the official 25); scales step by about 0.75 from "
                            "the input side down to it")
    per_image: int = setting(8, "random transformations of each image per step (the official code: all 42 every "
                             "step, 5x the work)")
    alpha: float = setting(100.0, "weight of the generator's reconstruction loss (MSE; the official alpha 100)")
    noise_amp: float = setting(0.1, "noise amplitude of a scale as a share of the coarser scales' reconstruction "
                               "error (the official noise_amp 0.1)")
    lr: float = setting(0.0005, "Adam learning rate of G and D (the official 5e-4)")
    d_drop_epoch: int = setting(500, "D's learning rate drops to a tenth from this epoch of each scale on (the "
                                "official milestone 500 of 5000 iterations; an epoch is one iteration when the "
                                "training images fit one batch)")
    g_drop_epoch: int = setting(1000, "G's learning rate drops to a tenth from this epoch of each scale on (the "
                                "official 1000)")
    beta1: float = setting(0.5, "Adam beta1 (beta2 0.999)")
    map_sigma: float = setting(1.0, "Gaussian blur of the anomaly map (1 - P(untransformed) per patch of the "
                               "finest scale), pixels; 0 = off")

    def validate(self) -> None:
        check_adversarial(self.lr, self.beta1, self.map_sigma, "htd")
        if self.nfc < 1:
            raise ValueError("htd.nfc must be >= 1")
        if self.min_size <= SHRINK:
            raise ValueError(f"htd.min_size must be > {SHRINK} (the unpadded convolutions take {SHRINK} px off)")
        if self.per_image < 1:
            raise ValueError("htd.per_image must be >= 1")
        if self.d_drop_epoch < 0 or self.g_drop_epoch < 0:
            raise ValueError("htd.d_drop_epoch and htd.g_drop_epoch must be >= 0")
        if self.alpha < 0 or self.noise_amp < 0:
            raise ValueError("htd.alpha and htd.noise_amp must be >= 0")


@register_model("htd", settings=HtdSettings)
class Htd(AdversarialModel):
    """HTD: multi-scale patch GANs whose discriminators classify transformations; few-shot anomaly detection."""

    catches = FOREIGN_OBJECTS
    family = SELF_SUPERVISED
    display_name = "HTD"
    defaults = ModelDefaults(input_size=32, batch_size=16, epochs=200)
    trains_distributed = False  # each frame's image index is found in the training frames this process read
    # the score's softmax, sums and means in FP32 in model.fp16.onnx (one head module called once a scale: its
    # nodes are /head/..., /head_1/...): a briefly trained discriminator's softmax is nearly uniform, its
    # normality nearly constant, and FP16 rounding of it reordered the frames
    fp32_scopes: tuple[str, ...] = ("/scale/", "/aggregate/", "/head")  # type: ignore[assignment]

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.sides = pyramid_sizes(self.size, int(self.cfg.min_size))
        self.n_scales = len(self.sides)
        self.widths = [scale_width(int(self.cfg.nfc), s) for s in range(self.n_scales)]
        self.copies = [GeometricCopies(side, transformations=htd_transformations(side)) for side in self.sides]
        self.count = len(htd_transformations(self.size))
        self.gens = [ScaleGenerator(self.channels, w) for w in self.widths]
        self.discs = [PatchNet(self.channels, self.count + 1, w) for w in self.widths]
        self.generator = nn.ModuleList(self.gens)  # the networks the loop trains (trainer/adversarial.py)
        self.discriminator = nn.ModuleList(self.discs)
        self.init_weights()
        self.scorers = nn.ModuleList([ScaleScorer(side, self.size, c, d) for side, c, d in
                                      zip(self.sides, self.copies, self.discs, strict=True)])
        self.head = RightTransformation(self.count)
        self.blur = MapBlur(self.cfg.map_sigma, self.hw) if self.cfg.map_sigma > 0 else None
        self.bank: Optional[torch.Tensor] = None  # the training frames (model inputs), only while fitting
        self.state: Optional[HtdState] = None
        self.scale_now = 0
        self._batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor] = (torch.zeros(0), torch.zeros(0),
                                                                        torch.zeros(0))
        self._cache: Optional[tuple[torch.Tensor, list[torch.Tensor]]] = None

    # -- fitting -------------------------------------------------------------------------------------------
    def fit(self, data: TrainingData, log: Callable[[str], None] = lambda _m: None,
            run: Optional[RunOptions] = None) -> dict[str, Any]:
        """Read the few training frames once (each batch's image indices), then train through the shared loop."""
        self.require_training_images(data)
        if int(self.config.epochs) < self.n_scales:
            raise UserError(f"htd: {self.config.epochs} epochs for {self.n_scales} scales "
                            f"({', '.join(map(str, self.sides))} px); give at least one epoch a scale (epochs are "
                            "split evenly over the scales)")
        with torch.no_grad():
            self.bank = self.frame_input(torch.from_numpy(data.model_inputs(data.read(data.fit_paths))))
        self.state = HtdState(self.sides, self.channels, int(self.bank.shape[0]), int(self.config.seed))
        log(f"htd: {self.n_scales} scales ({', '.join(map(str, self.sides))} px), {self.count} transformations, "
            f"{self.epochs_per_scale()} epochs a scale, {int(self.bank.shape[0])} training images")
        try:
            return super().fit(data, log, run)
        finally:
            self.bank = None
            self._cache = None

    def networks(self) -> dict[str, nn.Module]:
        nets = super().networks()
        if self.state is not None:
            nets["state"] = self.state
        return nets

    def updates(self) -> list[Update]:
        if not self._updates:
            generator, discriminator = super().updates()
            generator.lr_factor = lambda epoch, _epochs: self._start_epoch(epoch, int(self.cfg.g_drop_epoch))
            discriminator.lr_factor = lambda epoch, _epochs: self._drop(epoch, int(self.cfg.d_drop_epoch))
        return self._updates

    def epochs_per_scale(self) -> list[int]:
        """The loop's epochs split evenly over the scales, the remainder to the finest ones."""
        e, n = int(self.config.epochs), self.n_scales
        return [e // n + (1 if i >= n - e % n else 0) for i in range(n)]

    def scale_of(self, epoch: int) -> tuple[int, int]:
        """(scale, epoch within it, 0-based) of the loop's 1-based ``epoch``."""
        left = epoch - 1
        for s, count in enumerate(self.epochs_per_scale()):
            if left < count:
                return s, left
            left -= count
        return self.n_scales - 1, left

    def _drop(self, epoch: int, milestone: int) -> float:
        """The learning-rate factor: a tenth from the scale's epoch ``milestone`` on (the official MultiStepLR)."""
        _, within = self.scale_of(epoch)
        return DROP_FACTOR if within >= milestone else 1.0

    def _start_epoch(self, epoch: int, milestone: int) -> float:
        """The generator update's learning-rate factor; at a scale's first epoch also that scale's start."""
        s, within = self.scale_of(epoch)
        self.scale_now = s
        if within == 0:
            self._start_scale(s)
        return self._drop(epoch, milestone)

    @torch.no_grad()
    def _start_scale(self, s: int) -> None:
        """Copy the previous scale's weights where the widths match; the images' noise amplitudes at ``s``."""
        assert self.state is not None and self.bank is not None
        if s > 0 and self.widths[s] == self.widths[s - 1]:
            self.gens[s].load_state_dict(self.gens[s - 1].state_dict())
            self.discs[s].load_state_dict(self.discs[s - 1].state_dict())
        if s == 0:
            return
        device = self.state.amps.device
        bank = self.bank.to(device)
        ids = torch.arange(len(bank), device=device)
        rec = self._chain(s, ids, "rec")
        real = self._resized(bank, s)
        self.state.amps[s] = self.cfg.noise_amp * (real - rec).abs().flatten(1).mean(1)

    def _resized(self, x: torch.Tensor, s: int) -> torch.Tensor:
        side = self.sides[s]
        if side == x.shape[-1]:
            return x
        return F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)

    def _noise(self, s: int, n: int, device: torch.device) -> torch.Tensor:
        """Fresh noise at scale s: one channel repeated at the coarsest scale, per channel above (official)."""
        side = self.sides[s]
        if s == 0:
            return torch.randn(n, 1, side, side, device=device).expand(-1, self.channels, -1, -1)
        return torch.randn(n, self.channels, side, side, device=device)

    @torch.no_grad()
    def _chain(self, s: int, ids: torch.Tensor, mode: str) -> torch.Tensor:
        """The coarser scales' image at scale s's side: 'rand' from fresh noise, 'rec' from the fixed z_opt
        (the official ``draw_concat``); the trained generators run in eval mode, as the official frozen ones."""
        assert self.state is not None
        n, device = len(ids), ids.device
        image = torch.zeros(n, self.channels, self.sides[0], self.sides[0], device=device)
        for j in range(s):
            g = self.gens[j]
            was_training = g.training
            g.eval()
            z = (self._noise(j, n, device) if mode == "rand"
                 else self.state.z_opt(j).to(device).expand(n, -1, -1, -1))
            image = g(self.state.amps[j][ids].view(-1, 1, 1, 1) * z + image, image, ids)
            g.train(was_training)
            image = self._resized(image, j + 1)
        return image

    def _image_ids(self, x: torch.Tensor) -> torch.Tensor:
        """Each frame's nearest training frame: its index for the generator's index channel."""
        assert self.bank is not None
        bank = self.bank.to(x.device)
        return torch.cdist(x.flatten(1), bank.flatten(1)).argmin(1)

    def _sampled_copies(self, images: torch.Tensor, s: int, labels: torch.Tensor) -> torch.Tensor:
        """Copies ``labels`` [B, P] of each image [B,C,s,s] -> [B*P,C,s,s]."""
        b = int(images.shape[0])
        copies = self.copies[s].to(images.device)(images).reshape(b, self.count, *images.shape[1:])
        return copies[torch.arange(b, device=images.device)[:, None], labels].reshape(-1, *images.shape[1:])

    def _patch_ce(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy at every patch with one target class per copy [B*P]."""
        h, w = int(logits.shape[2]), int(logits.shape[3])
        return F.cross_entropy(logits, target.view(-1, 1, 1).expand(-1, h, w))

    def generator_loss(self, x: torch.Tensor, shared: dict[str, Any]) -> LossParts:
        assert self.state is not None
        s = self.scale_now
        ids = self._image_ids(x)
        real = self._resized(x, s)
        amp = self.state.amps[s][ids].view(-1, 1, 1, 1)
        prev = self._chain(s, ids, "rand")
        noise = self._noise(s, len(ids), x.device)
        fake = self.gens[s](amp * noise + prev if s else noise, prev, ids)
        shared["fake"] = fake
        labels = torch.rand(len(ids), self.count, device=x.device).argsort(1)[:, : int(self.cfg.per_image)]
        self._batch = (real, labels, ids)
        adv = self._patch_ce(self.discs[s](self._sampled_copies(fake, s, labels)), labels.reshape(-1))
        rec_prev = self._chain(s, ids, "rec")
        z_opt = self.state.z_opt(s).to(x.device).expand(len(ids), -1, -1, -1)
        rec = self.gens[s](amp * z_opt + rec_prev, rec_prev, ids)
        rec_loss = F.mse_loss(rec, real)
        loss = adv + self.cfg.alpha * rec_loss
        return loss, {"loss_g": loss, "adv": adv, "rec": rec_loss}

    def discriminator_loss(self, x: torch.Tensor, fake: torch.Tensor) -> LossParts:
        s = self.scale_now
        real, labels, _ = self._batch
        target = labels.reshape(-1)
        on_real = self._patch_ce(self.discs[s](self._sampled_copies(real, s, labels)), target)
        fake_logits = self.discs[s](self._sampled_copies(fake, s, labels))
        on_fake = self._patch_ce(fake_logits, torch.full_like(target, self.count))
        loss = on_real + on_fake
        return loss, {"loss_d": loss, "d_real": on_real, "d_fake": on_fake}

    def after_step(self, logs: dict[str, float]) -> None:
        """No re-initialisation: the discriminator's loss is a classification over T + 1 classes, not a GAN's
        real/fake BCE that collapses (the official code has none)."""

    # -- scoring -------------------------------------------------------------------------------------------
    def _scales(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every scale's logits on all the copies of x (cached for validation_loss and raw_score of one batch)."""
        if self._cache is None or self._cache[0] is not x:
            out = []
            for s, d in enumerate(self.discs):
                xs = self._resized(x, s)
                out.append(torch.cat([d(self.copies[s].to(x.device)(part)).float() for part in xs.split(1)]))
            self._cache = (x, out)
        return self._cache[1]

    def validation_loss(self, x: torch.Tensor) -> torch.Tensor:
        """Mean over the scales of the discriminators' transformation cross-entropy on the held-out copies
        (untrained scales count: a run is not judged before its finer scales are trained)."""
        losses = []
        for logits in self._scales(x):
            t, h, w = self.count, int(logits.shape[2]), int(logits.shape[3])
            logp = torch.log_softmax(logits[:, :t], 1).reshape(-1, t, t, h, w)
            losses.append(-logp.diagonal(dim1=1, dim2=2).mean((1, 2, 3)))
        return torch.stack(losses).mean(0)

    def raw_score(self, x: torch.Tensor) -> torch.Tensor:
        normalities = []
        for logits in self._scales(x):
            t, h, w = self.count, int(logits.shape[2]), int(logits.shape[3])
            p = torch.softmax(logits[:, :t], 1).reshape(-1, t, t, h, w)
            normalities.append(p.diagonal(dim1=1, dim2=2).mean((1, 2)).sum(1))
        return normality_score(normalities)

    def fit_facts(self) -> dict[str, Any]:
        amps = self.state.amps.mean(1).tolist() if self.state is not None else []
        return {**super().fit_facts(), "scales": self.sides, "transformations": self.count,
                "widths": self.widths, "epochs_per_scale": self.epochs_per_scale(), "per_image": self.cfg.per_image,
                "noise_amplitudes": [round(float(a), 5) for a in amps],
                "discriminator_passes_per_frame": self.count * self.n_scales}

    # -- export --------------------------------------------------------------------------------------------
    def map_shape(self) -> tuple[int, int]:
        return self.hw

    def export_batch_limit(self, max_elements: int, n_images: Optional[int] = None) -> Optional[int]:
        """A frame's T copies go through each discriminator at once: TensorRT's 2^31 elements bound the batch."""
        return (ELEMENT_LIMIT - 1) // self._largest_per_frame()

    def _largest_per_frame(self) -> int:
        return max(self.count * max(w, self.count + 1) * side * side for w, side in zip(self.widths, self.sides,
                                                                                         strict=True))

    def export_checks(self, max_batch: int, max_elements: int) -> dict[str, Any]:
        largest = max_batch * self._largest_per_frame()
        if largest >= ELEMENT_LIMIT:
            raise UserError(f"htd: export.max_batch {max_batch} x {self.count} transformations makes {largest} "
                            "activation elements, beyond TensorRT's 2^31; lower export.max_batch or htd.nfc")
        return {"max_batch": max_batch, "transformations": self.count, "scales": self.sides,
                "discriminator_passes_per_frame": self.count * self.n_scales, "largest_activation_elements": largest,
                "element_limit": ELEMENT_LIMIT}

    def export_module(self) -> nn.Module:
        self.for_export()
        self.scorers.cpu().eval()
        if self.blur is not None:
            self.blur.cpu()
        self.head.cpu()
        return HtdExport(self.frame_input, self.scorers, self.head, self.scale, self.blur, self.size).eval()


__all__ = ["Htd", "HtdSettings", "htd_transformations", "pyramid_sizes"]
