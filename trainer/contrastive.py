"""What the contrastive self-supervised models (Sehwag et al. 2021, Tack et al. 2020, Sohn et al. 2021) share,
written once: SimCLR's augmentations on batches in torch, the NT-Xent loss, the projection head, the ResNet-18
encoder trained from scratch, the rotations (Tack et al.'s shifted instances, Sohn et al.'s distribution
augmentation), the in-graph scorers on the encoder's features (the Mahalanobis distance to clusters, a bounded
memory bank) and the base class that trains them through the shared loop (trainer/loop.py) and exports them.

Augmentations (SimCLR, Chen et al. 2020, as the three official codes use them on 32 px images; a model sets the
crop's smallest area and the jitter's strength from its own code): random resized crop (area fraction U(scale_min,
1), aspect ratio log-uniform in [3/4, 4/3]) and horizontal flip (p 0.5), both one bilinear ``grid_sample`` per image
as Tack et al.'s ``RandomResizedCropLayer`` does on the GPU; colour jitter with p 0.8 (brightness, contrast,
saturation factors U(1 - s, 1 + s), hue shift U(-h, h) of a turn, in a random order per batch; each op clamped to
[0, 1] as torchvision's); random greyscale with p 0.2 (BT.601 luma). Two differences from torchvision, for batches:
the crop's 10 tries are drawn at once (the first that fits is taken, as torchvision's loop does; none: the whole
image), and the hue shift is a rotation of the chroma plane in YIQ (torchvision goes through HSV; the same turn of
the hue, without HSV's piecewise cost). On one-channel (grey) inputs saturation, hue and greyscale do nothing. Every
random draw comes from the ``generator`` given (the loop's global RNG, reseeded per epoch, in training), so a seed
gives the same views.

Encoder: the CIFAR ResNet-18 the three papers use (3x3 stem without max-pool, four stages of two basic blocks,
strides 1, 2, 2, 2, global average pool), trained from scratch as in the papers: none of them starts from
ImageNet weights (Sehwag et al.'s and Sohn et al.'s ImageNet-pretrained rows are baselines, not their method), and the
project's pretrained registry (trainer/backbones.py) has no ResNet-18. ``width`` is the first stage's channels
(the papers' 64; the stages have width x 1, 2, 4, 8): 16 on this CPU, 16x fewer multiply-adds.

Anomaly map (all three are image-level scorers; the map is a coarse pointer, not from the papers): the last
feature map's squared deviation from the training images' per-position mean, in units of each channel's
training standard deviation, averaged over the channels and upsampled; where the frame's features differ from the
normal parts'.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.errors import UserError
from trainer.ingraph import FrameInput
from trainer.loop import EpochModel, Log, LossParts, Update
from trainer.models import ModelSettings, RunOptions, setting

if TYPE_CHECKING:
    from trainer.frames import TrainingData

ELEMENT_LIMIT = 2**31  # TensorRT's limit on one tensor (trainer/tensorrt_readiness.py checks it too)
_LUMA_RGB = (0.299, 0.587, 0.114)


# -- augmentations ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SimClrAugment:
    """SimCLR's pipeline on a batch [N,C,H,W] in [-1, 1] (the models' input); see the module docstring."""

    scale_min: float = 0.08
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    jitter_p: float = 0.8
    gray_p: float = 0.2
    flip_p: float = 0.5

    def __call__(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        x = random_resized_crop(x, self.scale_min, self.flip_p, generator)
        y = (x + 1) * 0.5  # the colour ops work in [0, 1]
        y = color_jitter(y, self.brightness, self.contrast, self.saturation, self.hue, self.jitter_p, generator)
        y = random_grayscale(y, self.gray_p, generator)
        return y * 2 - 1


def _uniform(n: int, low: float, high: float, like: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device="cpu").to(like.device, like.dtype)


def random_resized_crop(x: torch.Tensor, scale_min: float, flip_p: float = 0.5,
                        generator: Optional[torch.Generator] = None, tries: int = 10) -> torch.Tensor:
    """Each image: a crop of area U(scale_min, 1) and aspect ratio log-U(3/4, 4/3), flipped with ``flip_p``,
    resized back to the input (bilinear); one affine grid per image. As torchvision: up to ``tries`` draws until
    the crop fits in the image, else the whole image."""
    n = int(x.shape[0])
    area = _uniform(n * tries, scale_min, 1.0, x, generator).view(n, tries)
    ratio = _uniform(n * tries, math.log(3 / 4), math.log(4 / 3), x, generator).view(n, tries).exp()
    w_all, h_all = (area * ratio).sqrt(), (area / ratio).sqrt()  # fractions of the side
    fits = (w_all <= 1) & (h_all <= 1)
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.zeros_like(fits[:, 0], dtype=torch.long))
    rows = torch.arange(n, device=x.device)
    found = fits.any(1)
    w = torch.where(found, w_all[rows, first], torch.ones_like(area[:, 0]))
    h = torch.where(found, h_all[rows, first], torch.ones_like(area[:, 0]))
    cx = _uniform(n, -1.0, 1.0, x, generator) * (1 - w)
    cy = _uniform(n, -1.0, 1.0, x, generator) * (1 - h)
    flip = torch.where(_uniform(n, 0.0, 1.0, x, generator) < flip_p, -1.0, 1.0).to(x.dtype)
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _gray(y: torch.Tensor) -> torch.Tensor:
    if y.shape[1] == 1:
        return y
    w = torch.tensor(_LUMA_RGB, dtype=y.dtype, device=y.device).view(1, 3, 1, 1)
    return (y * w).sum(1, keepdim=True)


def _hue_rotate(y: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Rotate the chroma of RGB [N,3,H,W] by ``turns`` [N] of a full turn (YIQ: Y kept, (I, Q) rotated)."""
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                          dtype=y.dtype, device=y.device)
    angle = turns * (2 * math.pi)
    c, s = angle.cos(), angle.sin()
    rot = torch.zeros(len(turns), 3, 3, dtype=y.dtype, device=y.device)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = c, -s, s, c
    m = torch.linalg.inv(to_yiq) @ rot @ to_yiq  # [N,3,3]
    return torch.einsum("nij,njhw->nihw", m, y)


def color_jitter(y: torch.Tensor, brightness: float, contrast: float, saturation: float, hue: float, p: float,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """torchvision's ColorJitter(brightness, contrast, saturation, hue) on each image with chance ``p`` (others
    untouched), y in [0, 1]; the four ops in a random order (one order per batch)."""
    n = int(y.shape[0])
    on = (_uniform(n, 0.0, 1.0, y, generator) < p).to(y.dtype)
    b = 1 + on * _uniform(n, -brightness, brightness, y, generator)
    c = 1 + on * _uniform(n, -contrast, contrast, y, generator)
    s = 1 + on * _uniform(n, -saturation, saturation, y, generator)
    h = on * _uniform(n, -hue, hue, y, generator)
    order = torch.randperm(4, generator=generator).tolist()
    colour = y.shape[1] == 3
    for op in order:
        if op == 0:
            y = y * b.view(-1, 1, 1, 1)
        elif op == 1:
            mean = _gray(y).mean((1, 2, 3), keepdim=True)
            y = (y - mean) * c.view(-1, 1, 1, 1) + mean
        elif op == 2 and colour:
            g = _gray(y)
            y = (y - g) * s.view(-1, 1, 1, 1) + g
        elif op == 3 and colour:
            y = _hue_rotate(y, h)
        y = y.clamp(0.0, 1.0)
    return y


def random_grayscale(y: torch.Tensor, p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Each image replaced by its luma in every channel with chance ``p`` (a no-op on one channel)."""
    if y.shape[1] == 1:
        _uniform(int(y.shape[0]), 0.0, 1.0, y, generator)  # the same draws on grey and colour inputs
        return y
    pick = (_uniform(int(y.shape[0]), 0.0, 1.0, y, generator) < p).view(-1, 1, 1, 1)
    return torch.where(pick, _gray(y).expand_as(y), y)


# -- losses ----------------------------------------------------------------------------------------------------
def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float, reduce: bool = True) -> torch.Tensor:
    """SimCLR's NT-Xent: the 2N views, each anchored against its partner among the other 2N - 1 (cosine
    similarity / temperature, softmax cross-entropy). ``reduce`` False: per pair [N], the mean of its two views'."""
    n = int(z1.shape[0])
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    sim = z @ z.t() / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    per_view = F.cross_entropy(sim, target, reduction="none")
    return per_view.mean() if reduce else (per_view[:n] + per_view[n:]) / 2


def cross_view_infonce(z1: torch.Tensor, z2: torch.Tensor, temperature: float, reduce: bool = True) -> torch.Tensor:
    """Sohn et al.'s official contrastive loss: view 1 of each image against all N views 2 (its own the positive),
    one direction, no same-view negatives. ``reduce`` False: per image [N]."""
    a, b = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    per = F.cross_entropy(a @ b.t() / temperature, torch.arange(len(a), device=a.device), reduction="none")
    return per.mean() if reduce else per


# -- networks --------------------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """ResNet's basic block: conv3x3-BN-ReLU-conv3x3-BN plus the (1x1 conv + BN when the shape changes) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18 (3x3 stem, no max-pool; stages of 2 blocks, widths w, 2w, 4w, 8w, strides 1, 2, 2, 2).
    Returns (pooled features [N, 8w], last feature map [N, 8w, H/8, W/8])."""

    def __init__(self, channels: int, width: int = 64) -> None:
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width]
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                   nn.ReLU()]
        c = width
        for w, stride in zip(widths, (1, 2, 2, 2), strict=True):
            layers += [BasicBlock(c, w, stride), BasicBlock(w, w, 1)]
            c = w
        self.features = nn.Sequential(*layers)
        self.dim = c
        self.widths = widths
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return f.mean((2, 3)), f


class ProjectionHead(nn.Module):
    """SimCLR's MLP head g: Linear(-BatchNorm)-ReLU for each hidden width, then Linear to ``out`` (the loss's
    space). ``batch_norm``: Sehwag et al.'s and Tack et al.'s heads have none; a deep head (Sohn et al.'s 8 layers)
    needs it."""

    def __init__(self, dim: int, hidden: list[int], out: int, batch_norm: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [nn.Linear(dim, h), *([nn.BatchNorm1d(h)] if batch_norm else []), nn.ReLU()]
            dim = h
        layers.append(nn.Linear(dim, out))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[no-any-return]


# -- rotations -------------------------------------------------------------------------------------------------
class Rotations(nn.Module):
    """x [N,C,S,S] -> its rotations by k x 90 degrees for k in ``ks`` [len(ks)*N,C,S,S], rotation-major (copy k of
    image n at row k*N + n, as Tack et al.'s ``torch.cat([rot90(x, k) for k])``); torch.rot90's direction. One constant
    Gather, in training and in the exported graph alike."""

    index: torch.Tensor

    def __init__(self, size: int, ks: tuple[int, ...] = (0, 1, 2, 3)) -> None:
        super().__init__()
        self.size, self.ks = size, ks
        base = np.arange(size * size).reshape(size, size)
        index = np.concatenate([np.rot90(base, k).reshape(-1) for k in ks]).astype(np.int64)
        self.register_buffer("index", torch.from_numpy(index))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, s, k = int(x.shape[1]), self.size, len(self.ks)
        copies = x.flatten(2).index_select(2, self.index).reshape(-1, c, k, s, s)
        return copies.permute(2, 0, 1, 3, 4).reshape(-1, c, s, s)


def random_flip(x: torch.Tensor, p: float = 0.5, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Each image mirrored left-right with chance ``p`` (before a rotation: a flip after rot90 k is rot90 -k of the
    flipped image, which would mix up the rotation labels)."""
    pick = (_uniform(int(x.shape[0]), 0.0, 1.0, x, generator) < p).view(-1, 1, 1, 1)
    return torch.where(pick, x.flip(3), x)


def rotate_each(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Image n rotated by k[n] x 90 degrees (torch.rot90's direction)."""
    out = x.clone()
    for r in range(1, 4):
        pick = k == r
        if bool(pick.any()):
            out[pick] = torch.rot90(x[pick], r, (2, 3))
    return out


# -- in-graph scorers ------------------------------------------------------------------------------------------
class NearestClusterDistance(nn.Module):
    """x [N,D] -> min over clusters k of (x - mu_k)^T P_k (x - mu_k) [N] (P_k a cluster's precision)."""

    means: torch.Tensor
    precisions: torch.Tensor

    def __init__(self, means: np.ndarray, precisions: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("means", torch.from_numpy(np.asarray(means, np.float32)))  # [K,D]
        self.register_buffer("precisions", torch.from_numpy(np.asarray(precisions, np.float32)))  # [K,D,D]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        diff = x.unsqueeze(0) - self.means.unsqueeze(1)  # [K,N,D]
        return (torch.matmul(diff, self.precisions) * diff).sum(-1).amin(0)


PINV_RCOND = 1e-6  # eigenvalues below this share of the largest: numerically zero for the FP32 graph


def cluster_gaussians(feats: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each cluster's mean and pseudo-inverted biased covariance (Sehwag et al.'s official ``np.linalg.pinv(np.cov(x.T,
    bias=True))``), float64 in, [K,D] and [K,D,D] out. The pseudo-inverse drops eigenvalues under 1e-6 of the
    largest (numpy's default cut is 1e-15): with fewer images than dimensions the covariance is singular, and
    its numerically-zero directions, inverted, multiplied the FP32 graph's rounding by up to 1e15 (FP16 reversed
    good/defect pairs on 24 images); with many images no eigenvalue is near the cut and the result is the
    official one."""
    means, precisions = [], []
    for c in range(k):
        x = feats[labels == c]
        if len(x) == 0:
            raise UserError(f"cluster {c} of {k} got no training image; lower the number of clusters")
        means.append(x.mean(0))
        centred = x - x.mean(0)
        precisions.append(np.linalg.pinv(centred.T @ centred / len(x), rcond=PINV_RCOND, hermitian=True))
    return np.stack(means), np.stack(precisions)


def bounded_bank(feats: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """At most ``size`` rows of ``feats``, drawn without replacement (seeded) when there are more."""
    if len(feats) <= size:
        return feats
    g = torch.Generator().manual_seed(seed)
    return feats[torch.randperm(len(feats), generator=g)[:size].sort().values]


class BankSimilarity(nn.Module):
    """Queries [G,N,D] -> their dot products with G banks of L2-normalised training features [G,N,M] (one bank per
    group, e.g. per rotation; bounded by ``bounded_bank``); the model reduces them (max, log-sum-exp)."""

    bank_t: torch.Tensor

    def __init__(self, banks: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("bank_t", F.normalize(banks.float(), dim=-1).transpose(1, 2).contiguous())  # [G,D,M]

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return torch.matmul(q, self.bank_t)


class FeatureMapDeviation(nn.Module):
    """The coarse map every contrastive model here returns: mean over channels of ((f - mu_p) / sd_c)^2 at each
    position of the last feature map (mu per position, sd per channel, from the training images), upsampled."""

    mean: torch.Tensor
    inv_std: torch.Tensor

    def __init__(self, channels: int, grid: tuple[int, int], hw: tuple[int, int]) -> None:
        super().__init__()
        self.hw = hw
        self.register_buffer("mean", torch.zeros(1, channels, *grid))
        self.register_buffer("inv_std", torch.ones(1, channels, 1, 1))

    def fit(self, maps: torch.Tensor) -> None:
        """maps [M,C,h,w] of the training images."""
        self.mean = maps.mean(0, keepdim=True).float()
        sd = (maps - self.mean).pow(2).mean((0, 2, 3), keepdim=True).sqrt().float()
        self.inv_std = 1.0 / sd.clamp_min(1e-6)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        d = ((f - self.mean) * self.inv_std).pow(2).mean(1, keepdim=True)
        return F.interpolate(d, size=self.hw, mode="bilinear", align_corners=False)[:, 0]


class PooledScoreExport(nn.Module):
    """frames uint8 [N,H,W,3] BGR -> (score float32 [N], anomaly_map float32 [N,H,W]) of a contrastive model scored
    in one forward pass: ``score`` of the encoder's pooled features, the map its last feature map's deviation."""

    def __init__(self, frame_input: FrameInput, encoder: ResNet18, score: nn.Module,
                 deviation: FeatureMapDeviation) -> None:
        super().__init__()
        self.frame_input = frame_input
        self.encoder = encoder
        self.score = score
        self.deviation = deviation

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, fmap = self.encoder(self.frame_input(frames))
        return self.score(pooled), self.deviation(fmap)


# -- settings and the base model -------------------------------------------------------------------------------
@dataclass
class ContrastiveSettings(ModelSettings):
    """What the contrastive models share: encoder, head, augmentations, optimiser (each model sets its paper's
    defaults by overriding these fields)."""

    section: ClassVar[str] = "contrastive"  # the config section, for the messages

    width: int = setting(16, "ResNet-18's first-stage channels (stages: x 1, 2, 4, 8); the papers' 64 costs 16x")
    head_hidden: int = setting(0, "hidden width of the projection head's layers; 0 = the encoder's feature size")
    head_layers: int = setting(1, "hidden layers of the projection head (SimCLR's: 1)")
    head_dim: int = setting(128, "output size of the projection head (the contrastive loss's space)")
    head_batch_norm: bool = setting(False, "BatchNorm after each hidden layer of the projection head")
    temperature: float = setting(0.5, "temperature of the contrastive loss")
    crop_scale_min: float = setting(0.08, "smallest area fraction of the random resized crop")
    hue: float = setting(0.1, "colour jitter's largest hue shift, fraction of a turn (brightness, contrast and "
                         "saturation: 0.4)")
    lr: float = setting(0.1, "SGD learning rate (momentum 0.9, cosine decay to 0 over the epochs)")
    weight_decay: float = setting(0.0001, "SGD weight decay")

    def validate(self) -> None:
        s = self.section
        if self.width < 1 or self.head_layers < 0 or self.head_hidden < 0 or self.head_dim < 1:
            raise ValueError(f"{s}.width and head_dim must be >= 1, head_layers and head_hidden >= 0")
        if self.temperature <= 0 or self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"{s}.temperature and lr must be > 0, weight_decay >= 0")
        if not 0 < self.crop_scale_min <= 1 or not 0 <= self.hue <= 0.5:
            raise ValueError(f"{s}.crop_scale_min must be in (0, 1] and hue in [0, 0.5]")


def cosine_schedule(epoch: int, epochs: int) -> float:
    """Cosine decay of the learning rate over the epochs (1-based), as SimCLR, Sehwag et al. and Sohn et al. use."""
    return 0.5 * (1 + math.cos(math.pi * (epoch - 1) / max(epochs, 1)))


class ContrastiveModel(EpochModel):
    """Encoder + projection head trained by a contrastive loss through the shared loop; after the loop, a model's
    ``fit_scorer`` fits its in-graph score on the training images' features. Subclasses set ``cfg`` fields,
    ``contrastive_loss`` and the scorer."""

    needs_square = False  # models that rotate by 90 degrees need square inputs
    flip_in_crop = True  # False: the model flips before it rotates (a rotation head's labels), not in the crop
    _fitted = False

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.cfg: ContrastiveSettings = config.settings_for(self.name)
        self.hw = config.input.hw
        if self.needs_square and self.hw[0] != self.hw[1]:
            raise UserError(f"input {self.hw[0]}x{self.hw[1]}: {self.name} rotates by 90 degrees and needs a square "
                            "input; set input: {height: 32, width: 32} in the train config")
        if self.hw[0] % 8 or self.hw[1] % 8:
            raise UserError(f"input {self.hw[0]}x{self.hw[1]}: {self.name}'s ResNet-18 strides 8; use multiples of 8")
        self.channels = 1 if config.input.channels == "gray" else 3
        torch.manual_seed(int(config.seed))
        self.frame_input = FrameInput(self.channels)
        self.encoder = ResNet18(self.channels, self.cfg.width)
        hidden = [self.cfg.head_hidden or self.encoder.dim] * self.cfg.head_layers
        self.head = ProjectionHead(self.encoder.dim, hidden, self.cfg.head_dim, self.cfg.head_batch_norm)
        self.augment_views = SimClrAugment(scale_min=self.cfg.crop_scale_min, hue=self.cfg.hue,
                                           flip_p=0.5 if self.flip_in_crop else 0.0)
        self.grid = (self.hw[0] // 8, self.hw[1] // 8)
        self.deviation = FeatureMapDeviation(self.encoder.dim, self.grid, self.hw)
        self._updates: list[Update] = []

    # -- the shared loop's contract --------------------------------------------------------------------------
    def trained(self) -> dict[str, nn.Module]:
        """The networks the contrastive loss trains (a model adds its own heads)."""
        return {"encoder": self.encoder, "head": self.head}

    def networks(self) -> dict[str, nn.Module]:
        return self.trained()

    def updates(self) -> list[Update]:
        if not self._updates:
            params = [p for net in self.trained().values() for p in net.parameters()]
            opt = torch.optim.SGD(params, lr=self.cfg.lr, momentum=0.9, weight_decay=self.cfg.weight_decay)
            self._updates = [Update("contrastive", opt, self._loss, lr_factor=cosine_schedule)]
        return self._updates

    def prepare(self, frames: torch.Tensor) -> torch.Tensor:
        return self.frame_input.to(frames.device)(frames)

    def _loss(self, x: torch.Tensor, _shared: dict[str, Any]) -> LossParts:
        per, parts = self.contrastive_loss(x, None)
        return per.mean(), {k: v.mean() for k, v in parts.items()}

    def contrastive_loss(self, x: torch.Tensor, generator: Optional[torch.Generator]
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-image loss [B] and its named parts [B] of a batch of normal images (two augmented views each)."""
        raise NotImplementedError

    def validation_loss(self, x: torch.Tensor) -> torch.Tensor:
        """The training loss on held-out normals with the same augmentation draws every epoch (seeded), so the
        epochs compare."""
        return self.contrastive_loss(x, torch.Generator().manual_seed(int(self.config.seed)))[0]

    def raw_score(self, x: torch.Tensor) -> torch.Tensor:
        """Before the scorer exists (the loop's epochs): the held-out loss, which only ranks epochs with DIR/val
        defects; after the fit, the exported graph's score."""
        if not self._fitted:
            return self.validation_loss(x)
        return self.score_features(x)

    def score_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- after the loop --------------------------------------------------------------------------------------
    def fit(self, data: TrainingData, log: Log = lambda _m: None, run: Optional[RunOptions] = None) -> dict[str, Any]:
        facts = super().fit(data, log, run)
        device = next(self.encoder.parameters()).device
        for net in self.networks().values():
            net.eval()
        pooled, heads, maps = [], [], []
        with torch.no_grad():
            for frames in data.loader(data.fit_paths, int(self.config.batch_size)):
                x = self.prepare(frames.to(device))
                p, f = self.encoder(x)
                maps.append(f.float().cpu())
                pooled.append(p.float().cpu())
                heads.append(self.extra_features(x))
        self.deviation.fit(torch.cat(maps))
        for net in (self.frame_input, self.encoder, self.head, self.deviation):
            net.cpu()
        facts["scorer"] = self.fit_scorer(torch.cat(pooled), heads, log)
        self._fitted = True
        return facts

    def extra_features(self, x: torch.Tensor) -> Any:
        """What a scorer needs of a training batch beyond the pooled features (e.g. all rotations' head outputs)."""
        return None

    def fit_scorer(self, pooled: torch.Tensor, extra: list[Any], log: Log) -> dict[str, Any]:
        raise NotImplementedError

    def fit_facts(self) -> dict[str, Any]:
        return {"channels": self.channels, "network": f"ResNet-18 width {self.cfg.width}",
                "parameters": sum(p.numel() for net in self.trained().values() for p in net.parameters())}

    # -- export ----------------------------------------------------------------------------------------------
    copies_per_frame = 1  # forward passes of the encoder per scored frame

    def map_shape(self) -> tuple[int, int]:
        return self.hw

    def export_batch_limit(self, max_elements: int, n_images: Optional[int] = None) -> Optional[int]:
        """The copies of every frame go through the encoder at once: its widest activation within 2^31."""
        return (ELEMENT_LIMIT - 1) // (self.copies_per_frame * self.encoder.widths[0] * self.hw[0] * self.hw[1])

    def export_checks(self, max_batch: int, max_elements: int) -> dict[str, Any]:
        largest = max_batch * self.copies_per_frame * self.encoder.widths[0] * self.hw[0] * self.hw[1]
        if largest >= ELEMENT_LIMIT:
            raise UserError(f"{self.name}: export.max_batch {max_batch} x {self.copies_per_frame} copies x "
                            f"{self.encoder.widths[0]} channels at {self.hw[0]}x{self.hw[1]} exceeds TensorRT's 2^31 "
                            "elements; lower export.max_batch, the width or the input size")
        return {"max_batch": max_batch, "forward_passes_per_frame": self.copies_per_frame,
                "largest_activation_elements": largest, "element_limit": ELEMENT_LIMIT}

