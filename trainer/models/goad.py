"""GOAD (Bergman & Hoshen, "Classification-Based Anomaly Detection for General Data", ICLR 2020), its image
part, after the official code (github.com/lironber/GOAD: ``train_ad.py``, ``opt_tc.py``, ``transformations.py``).

Transformations: GEOM's 72 (the official ``transformations.py`` is GEOM's ``Transformer`` with 8 px shifts at
32 px: flip x translate x {0, -s, +s} x translate y {0, -s, +s} x rot90 {0, 1, 2, 3}, Keras' reflect border),
from trainer/transformations.py, which GEOM and SSL-AD share; ``goad.transformations: 8`` is the official
``simple`` set (flip x rot90). All the copies of a frame are one constant Gather, in training and in the graph.

Network: a Wide ResNet (trainer/networks.py; WRN-10-4, the official defaults) on inputs in [-1, 1]; its pooled
last features z (64 x width = 256 values, the official ``act``) feed the linear classifier of the transformation.
Loss per batch of B images x all T transformations (the official batch: 288 = 4 images x 72):
  CE(classifier(z), t) + lambda * L_tc + 10 * mean(z^2),
L_tc the center-triplet loss: c_t = the batch's mean z of transformation t, and per copy
max(0, ||z - c_t||^2 + m - min_{t' != t} ||z - c_t'||^2), averaged; lambda 0.1, m 0.1 (the official README's
CIFAR-10 command, ``train_ad.py --m=0.1``; the script's default is 1), and the official ``--reg``
term 10 * mean(z^2) (on by default there: its ``type=bool`` flag cannot be turned off from the command line).
Adam at 1e-3 (the official optimiser is ``Adam(parameters())``: the default lr, its ``--lr`` unused), 16 epochs
over the 72x set (one loop epoch here = one official epoch: every image once with all its transformations).

Centres: the mean z of each transformation over the training normals, in eval mode, after training. Score
(higher = more anomalous), the distance-to-centre classifier of the paper's eq. 5-7, as the official test:
  sum_t -log softmax_t'(-max(||z_t - c_t'||^2, eps))[t],  eps 0
(the official code floors the squared distances at ``--eps``; the paper's formula adds eps to each probability
instead: the code's is followed),
z_t the features of copy t of the frame: **72 forward passes of the network a frame** (the throughput row says so).
The distances, the log-softmax and the sum stay FP32 in model.fp16.onnx.

Anomaly map (a coarse pointer, not a calibrated localisation; the paper scores images only): on the identity copy,
each position's squared distance of its feature vector to the identity transformation's centre, upsampled
bilinearly.

What differs from the official code, and why:
- the centres: the official code keeps the mean of the features it saw while training the last epoch (train-mode
  BatchNorm, weights moving within the epoch) and scores with them; here they are computed once more after
  training, in eval mode over the training normals, so that they are the features the exported graph computes.
  During training the epoch's running means (the official centres) score the validation images.
- the Wide ResNet: the official block computes conv1 twice and drops the first result's BN-ReLU (``out =
  self.conv1(...)  # todo``), so its blocks are conv-conv without the inner BN-ReLU; trainer/networks.py's block is
  the standard pre-activation block of Zagoruyko & Komodakis.
- ``transformations_per_step`` below 72 (a CPU reduction, off by default) draws that many transformations a step,
  the same for the batch's images, and the triplet term compares their centres only.
- the map is this project's addition.

Measured (2026-12-07, the 2-core VM shared with other jobs, load average 9-11, one thread, scored through the
exported ONNX graph):
- Fashion-MNIST, one class normal, a **reduced CPU recipe**: 100 training images a run (80 trained on, 20 held
  out), WRN-10-1 (1/16 of WRN-10-4's width^2 cost), all 72 transformations a step at batches of 4 images (the
  official 288 copies), 3 epochs of the 72x set instead of 16 (60 optimiser steps: the official recipe on 6000
  images makes 16 x 1500 = 24 000), 100 test images stratified by class, 32 px, seed 0, margin m 1 (the
  script's default; the README's 0.1 became the default after this table):
  ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/protocol.py --dataset fashion-mnist --protocol one-normal
  --model goad --seeds 1 --classes 0,1,2,3,4 --train-limit 100 --test-limit 100 --epochs 3 --set goad.width=1
  --set batch_size=4 --set training.workers=0 --set export.max_batch=1 --threads 1`` (then ``--classes
  5,6,7,8,9``), by class 0-9: 74.0, 87.4, 84.4, 87.7, 70.7, 76.2, 63.9, 93.4, 80.6, 98.0, **mean 81.6** (GEOM's
  reduced recipe, seed 0, benchmarks/README.md: mean 90.9; SSL-AD's reduced recipe: 90.0); about 220 s a class.
  Seeds 1 and 2, the same command with ``--first-seed 1 --seeds 2 --set goad.margin=1`` (2026-12-07, load 3-5, 59 s
  a run): means 80.4 and 78.6; over seeds 0-2 **80.2 +- 1.5** (benchmarks/README.md, the self-supervised family's
  section).
  At 60 steps the network has barely begun to separate the transformations (on the generated parts its score
  stays near 72 log 72, the value of equal distances to all centres): GOAD needs far more of its recipe than
  GEOM does to rank well, and the full recipe needs a GPU (none was lent). At m 0.1 (the same command, classes
  0, 4, 6): 73.9, 70.6, 63.9 against 74.0, 70.7, 63.9 at m 1: at this step count the margin changes nothing.
- generated parts with a stray nut (the test's recipe: 32 px, 60 parts, WRN-10-1, 18 of the 72 transformations
  a step, batches of 8, 8 epochs, m 0.1): image AUROC 0.6175 (0.625 at m 1). At m 1, all 72 a step at batches
  of 4 and 6 epochs: 0.63, and 0.54 without the official 10 * mean(z^2) term; the 8 flip x rotation
  transformations alone, to which the symmetric plates are blind: 0.57. The map does not point at the nut
  (pixel AUROC 0.41-0.45).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import UserError
from trainer.ingraph import FrameInput
from trainer.loop import EpochModel, LossParts, Update
from trainer.models import (
    FOREIGN_OBJECTS,
    SELF_SUPERVISED,
    ModelDefaults,
    ModelSettings,
    RunOptions,
    register_model,
    setting,
)
from trainer.networks import WideResNet
from trainer.tensorrt_readiness import ELEMENT_LIMIT
from trainer.transformations import GeometricCopies, copies_activation_elements, square_side

if TYPE_CHECKING:
    from trainer.frames import TrainingData


def squared_distances(z: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """z [..., T, D], centres [T', D] -> ||z_t - c_t'||^2 [..., T, T'] (differences, not the expanded form: no
    cancellation)."""
    return ((z.unsqueeze(-2) - centres) ** 2).sum(-1)


def center_triplet_loss(z: torch.Tensor, margin: float, centres: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The official ``tc_loss`` per copy [B, T]: z [B, T, D]; centres default to the batch's means per
    transformation; max(0, ||z_t - c_t||^2 + m - min_{t' != t} ||z_t - c_t'||^2)."""
    c = z.mean(0) if centres is None else centres
    d = squared_distances(z, c)
    count = int(d.shape[-1])
    own = torch.eye(count, dtype=torch.bool, device=z.device)
    positive = d.diagonal(dim1=-2, dim2=-1)
    negative = d.masked_fill(own, float("inf")).min(-1).values
    return torch.clamp(positive + margin - negative, min=0)


class GoadScore(nn.Module):
    """Features of the T copies [N*T, D] -> score [N]: sum_t -log softmax(-max(||z_t - c||^2, eps))[t]."""

    centres: torch.Tensor
    eye: torch.Tensor

    def __init__(self, count: int, dim: int, eps: float) -> None:
        super().__init__()
        self.count = count
        self.eps = float(eps)
        self.register_buffer("centres", torch.zeros(count, dim))
        self.register_buffer("eye", torch.eye(count))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        d = squared_distances(z.float().reshape(-1, self.count, int(z.shape[-1])), self.centres)
        logp = torch.log_softmax(-torch.clamp(d, min=self.eps), dim=-1)
        return -(logp * self.eye).sum((1, 2))


class GoadExport(nn.Module):
    """frames uint8 [N,S,S,3] BGR -> (score float32 [N], anomaly_map float32 [N,S,S])."""

    def __init__(self, frame_input: FrameInput, copies: GeometricCopies, net: WideResNet, score: GoadScore) -> None:
        super().__init__()
        self.frame_input = frame_input
        self.copies = copies
        self.net = net
        self.score = score

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.frame_input(frames)
        _, feat = self.net(self.copies(x))
        c, h, w = int(feat.shape[1]), int(feat.shape[2]), int(feat.shape[3])
        identity = feat.reshape(-1, self.copies.count, c, h, w)[:, 0]
        cells = ((identity - self.score.centres[0].reshape(1, -1, 1, 1)) ** 2).sum(1, keepdim=True)
        amap = F.interpolate(cells, size=(self.copies.size, self.copies.size), mode="bilinear", align_corners=False)
        return self.score(feat.mean((2, 3))), amap[:, 0]


@dataclass
class GoadSettings(ModelSettings):
    """GOAD (Bergman & Hoshen 2020): a Wide ResNet whose features of each geometric transformation are pulled to
    that transformation's centre (center-triplet loss + cross-entropy); scored by the distances to the centres.
    Input: square (it rotates by 90 degrees; translations scale as size / 4)."""

    transformations: int = setting(
        72, "72 = GEOM's flip x translate x {0, -s, +s} x translate y {0, -s, +s} x rot90 (the official "
        "'complicated'); 8 = flip x rot90 (the official 'simple'): 9x less work a frame")
    depth: int = setting(10, "Wide ResNet depth, 6n + 4 (the official WRN-10-4)")
    width: int = setting(4, "Wide ResNet widening factor (the feature z has 64 x width values); cost grows as width^2")
    transformations_per_step: int = setting(
        0, "transformations drawn each step, the same for the batch's images (0 = all, the official recipe); fewer "
        "is a CPU reduction: the triplet term then compares those centres only")
    lmbda: float = setting(0.1, "weight of the center-triplet loss beside the cross-entropy (the official 0.1)")
    margin: float = setting(0.1, "center-triplet margin m (the official README's CIFAR-10 command: 0.1; its script's "
                            "default: 1)")
    reg: float = setting(10.0, "weight of mean(z^2), the official --reg term (on there by default: 10)")
    eps: float = setting(0.0, "floor of the squared distances in the score (the official eps, 0)")
    lr: float = setting(0.001, "Adam learning rate (the official Adam's default 1e-3)")

    def validate(self) -> None:
        if self.transformations not in (72, 8):
            raise ValueError("goad.transformations must be 72 (flip x translations x rotations) or 8 (flip x rot90)")
        if self.depth < 10 or (self.depth - 4) % 6:
            raise ValueError("goad.depth must be 6n + 4 with n >= 1 (10, 16, 22, 28)")
        if self.width < 1:
            raise ValueError("goad.width must be >= 1")
        if self.transformations_per_step < 0 or self.transformations_per_step == 1:
            raise ValueError("goad.transformations_per_step must be 0 (all) or >= 2 (the triplet needs a negative)")
        if self.lmbda < 0 or self.margin < 0 or self.reg < 0 or self.eps < 0:
            raise ValueError("goad.lmbda, goad.margin, goad.reg and goad.eps must be >= 0")
        if self.lr <= 0:
            raise ValueError("goad.lr must be > 0")


@register_model("goad", settings=GoadSettings)
class Goad(EpochModel):
    """GOAD: a Wide ResNet trained on geometric transformations with cross-entropy and a center-triplet loss;
    scored by the distance of each transformed copy's features to its transformation's centre."""

    catches = FOREIGN_OBJECTS
    family = SELF_SUPERVISED
    display_name = "GOAD"
    defaults = ModelDefaults(input_size=32, batch_size=4, epochs=16)
    # the distances to the centres, the log-softmax and the sum: FP32 in model.fp16.onnx.
    fp32_scopes = ("/score/",)

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.cfg: GoadSettings = config.settings_for(self.name)
        self.size = square_side(config.input.hw, self.name)
        self.channels = 1 if config.input.channels == "gray" else 3
        torch.manual_seed(int(config.seed))
        self.frame_input = FrameInput(self.channels)
        self.copies = GeometricCopies(self.size, self.cfg.transformations)
        self.count = self.copies.count
        self.per_step = self.cfg.transformations_per_step or self.count
        if self.per_step > self.count:
            raise UserError(f"goad.transformations_per_step {self.per_step} exceeds the {self.count} "
                            "transformations; lower it")
        self.net = WideResNet(self.channels, self.count, self.cfg.depth, self.cfg.width)
        self.dim = self.net.widths[3]
        self.score_head = GoadScore(self.count, self.dim, self.cfg.eps)
        self.fitted = False
        self._updates: list[Update] = []
        self._cache: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
        # the epoch's running means of the training features (the official centres), for validation
        self._sums = torch.zeros(self.count, self.dim, dtype=torch.float64)
        self._counts = torch.zeros(self.count, dtype=torch.float64)
        self._epoch_closed = False
        self._running: Optional[torch.Tensor] = None

    # -- the shared loop's contract ------------------------------------------------------------------------
    def networks(self) -> dict[str, nn.Module]:
        return {"classifier": self.net}

    def updates(self) -> list[Update]:
        if not self._updates:
            self._updates = [Update("classifier", torch.optim.Adam(self.net.parameters(), lr=self.cfg.lr),
                                    self.goad_loss)]
        return self._updates

    def prepare(self, frames: torch.Tensor) -> torch.Tensor:
        self._cache = None
        return self.frame_input.to(frames.device)(frames)

    def goad_loss(self, x: torch.Tensor, shared: dict[str, Any]) -> LossParts:
        """CE + lambda * center-triplet + reg * mean(z^2) over the batch's images x the step's transformations."""
        b, device = int(x.shape[0]), x.device
        if self.per_step == self.count:
            chosen = torch.arange(self.count, device=device)
        else:
            chosen = torch.randperm(self.count, device=device)[:self.per_step].sort().values
        copies = self.copies.to(device)(x).reshape(b, self.count, *x.shape[1:])[:, chosen]
        logits, feat = self.net(copies.reshape(-1, *x.shape[1:]))
        z = feat.float().mean((2, 3)).reshape(b, self.per_step, self.dim)
        ce = F.cross_entropy(logits.float(), chosen.repeat(b))
        tc = center_triplet_loss(z, self.cfg.margin).mean()
        reg = (z * z).mean()
        loss = ce + self.cfg.lmbda * tc + self.cfg.reg * reg
        if self._epoch_closed:  # a validation ran since the last step: a new epoch's running means
            self._sums.zero_()
            self._counts.zero_()
            self._epoch_closed = False
        self._sums = self._sums.to(device)  # on the training device: no host sync a step
        self._counts = self._counts.to(device)
        self._sums.index_add_(0, chosen, z.detach().sum(0).double())
        self._counts.index_add_(0, chosen, torch.full((self.per_step,), float(b), dtype=torch.float64, device=device))
        accuracy = (logits.detach().argmax(1) == chosen.repeat(b)).float().mean()
        return loss, {"loss": loss, "ce": ce, "tc": tc, "reg": reg, "accuracy": accuracy}

    def _centres(self, device: torch.device) -> torch.Tensor:
        """The fitted centres, or during training this epoch's running means of the training features."""
        if self.fitted:
            return self.score_head.centres.to(device)
        if not self._epoch_closed or self._running is None:
            self._running = (self._sums / self._counts.clamp(min=1)[:, None]).float()
            self._epoch_closed = True
        return self._running.to(device)

    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [B*T, T], z [B*T, D]) of all copies, computed once for validation_loss and raw_score of the
        same batch (one image's copies a pass: activations that fit a CPU's caches, as GEOM found)."""
        if self._cache is None or self._cache[0] is not x:
            copies = self.copies.to(x.device)(x)
            outs = [self.net(part) for part in copies.split(self.count)]
            logits = torch.cat([o[0].float() for o in outs])
            z = torch.cat([o[1].float().mean((2, 3)) for o in outs])
            self._cache = (x, logits, z)
        return self._cache[1], self._cache[2]

    def validation_loss(self, x: torch.Tensor) -> torch.Tensor:
        """The training objective per held-out normal over all its copies, the triplet term against the
        centres (this epoch's running means while training)."""
        logits, z = self._features(x)
        b = int(x.shape[0])
        target = torch.arange(self.count, device=x.device).repeat(b)
        ce = F.cross_entropy(logits, target, reduction="none").reshape(b, self.count).mean(1)
        zs = z.reshape(b, self.count, self.dim)
        tc = center_triplet_loss(zs, self.cfg.margin, self._centres(x.device)).mean(1)
        return ce + self.cfg.lmbda * tc + self.cfg.reg * (zs * zs).mean((1, 2))

    def raw_score(self, x: torch.Tensor) -> torch.Tensor:
        head = self.score_head.to(x.device)
        if not self.fitted:
            head.centres.copy_(self._centres(x.device))
        return head(self._features(x)[1])  # type: ignore[no-any-return]

    def fit(self, data: TrainingData, log: Callable[[str], None] = lambda _m: None,
            run: Optional[RunOptions] = None) -> dict[str, Any]:
        """The shared loop trains the network; then the centres on the training normals (eval mode)."""
        self.fitted = False
        facts = super().fit(data, log, run)
        facts["centres"] = self.fit_centres(data, log)
        return facts

    @torch.no_grad()
    def fit_centres(self, data: TrainingData, log: Callable[[str], None]) -> dict[str, Any]:
        """c_t = the mean z of copy t over the training normals."""
        device = next(self.net.parameters()).device
        self.net.eval()
        sums = torch.zeros(self.count, self.dim, dtype=torch.float64)
        n = 0
        for frames in data.loader(data.fit_paths, int(self.config.batch_size)):
            x = self.prepare(frames.to(device))
            z = self._features(x)[1].reshape(-1, self.count, self.dim)
            sums += z.double().sum(0).cpu()
            n += int(frames.shape[0])
        if n == 0:
            raise UserError("goad: no training images to fit the centres on; add images to train/good")
        centres = (sums / n).float()
        self.score_head.centres.copy_(centres.to(self.score_head.centres.device))
        self.fitted = True
        self._cache = None
        d = squared_distances(centres, centres)
        apart = float(d.masked_fill(torch.eye(self.count, dtype=torch.bool), float("inf")).min())
        log(f"goad: {self.count} centres fitted on {n} training images (closest two centres {apart:.3g} apart, "
            f"squared; mean |c|^2 {float((centres ** 2).sum(1).mean()):.3g})")
        return {"images": n, "closest_centres_sq_distance": round(apart, 6),
                "mean_centre_sq_norm": round(float((centres ** 2).sum(1).mean()), 6)}

    def fit_facts(self) -> dict[str, Any]:
        return {"channels": self.channels, "transformations": self.count, "transformations_per_step": self.per_step,
                "network": f"WRN-{self.cfg.depth}-{self.cfg.width}", "feature_dim": self.dim,
                "parameters": sum(p.numel() for p in self.net.parameters())}

    # -- export --------------------------------------------------------------------------------------------
    def map_shape(self) -> tuple[int, int]:
        return self.size, self.size

    def _per_frame_elements(self) -> int:
        """The largest intermediate one frame makes: the first group's activations of its T copies, or the
        distances' [T, T, D] differences."""
        return max(copies_activation_elements(self.net.widths, self.count, self.size),
                   self.count * self.count * self.dim)

    def export_batch_limit(self, max_elements: int, n_images: Optional[int] = None) -> Optional[int]:
        """The T copies of every frame go through the network at once: TensorRT's 2^31 elements bound the batch."""
        return (ELEMENT_LIMIT - 1) // self._per_frame_elements()

    def export_checks(self, max_batch: int, max_elements: int) -> dict[str, Any]:
        largest = max_batch * self._per_frame_elements()
        if largest >= ELEMENT_LIMIT:
            raise UserError(f"goad: export.max_batch {max_batch} x {self.count} copies makes a {largest}-element "
                            "intermediate, past TensorRT's 2^31; lower export.max_batch, goad.width or the input size")
        return {"max_batch": max_batch, "transformations": self.count, "copies_at_max_batch": max_batch * self.count,
                "largest_activation_elements": largest, "element_limit": ELEMENT_LIMIT,
                "network_passes_per_frame": self.count}

    def export_module(self) -> nn.Module:
        if not self.fitted:
            raise RuntimeError("Goad.export_module() called before fit()")
        for net in (self.frame_input, self.copies, self.net, self.score_head):
            net.cpu().eval()
        return GoadExport(self.frame_input, self.copies, self.net, self.score_head).eval()

