"""Deep SVDD (Ruff et al., "Deep One-Class Classification", ICML 2018), after the official code's recipe.

Network: the paper's LeNet-type CNN with **no bias anywhere** and **BatchNorm without affine parameters** (a
bias or a BN shift would let the network map every image to the centre, the trivial solution): per level a
5x5 convolution, BN, leaky ReLU and 2x2 max-pooling, then one linear layer to the representation phi(x).
Grey input: the MNIST net (levels of 8 and 4 channels, 32 dims); colour: the CIFAR-10 net (32, 64, 128
channels, 128 dims); ``deep_svdd.widths`` / ``rep_dim`` override. For 28 and 32 px inputs these are the
paper's; larger inputs only widen the linear layer.

Training, two phases, each one run of the shared loop (trainer/loop.py's EpochTrainer, its own checkpoint
subfolder ``pretrain/`` and ``one-class/``, so ``--resume`` continues whichever phase was interrupted and
a finished pre-training is loaded, not repeated):

1. autoencoder pre-training (``deep_svdd.pretrain_epochs``; 0 = none): the encoder plus a mirrored bias-free
   decoder (a linear layer back to the last feature map, then upsampling and 5x5 convolutions; the official
   decoder reshapes the code into a 4x4 grid, which fits only 28/32 px), mean squared reconstruction error;
   the epoch kept by its validation reconstruction error;
2. between the phases the centre ``c`` = the mean of phi over the training images, with every coordinate
   closer to 0 than ``centre_eps`` (0.1) pushed out to +-0.1 (the official code's rule: a coordinate near 0
   is one a bias-free network with all-zero weights reaches trivially);
3. the one-class objective (``epochs``), mean of ||phi(x) - c||^2, or with ``objective: soft-boundary``
   R^2 + 1/nu * mean(max(0, ||phi(x) - c||^2 - R^2)), R set after each step of the epochs past
   ``warm_up_epochs`` to the (1 - nu) quantile of the batch's distances (the official code's rule). The epoch
   kept is the loop's choice, except that a soft-boundary run without DIR/val defects keeps the last epoch
   (its loss contains R, which moves, so validation losses of different epochs do not compare).

Adam (lr 1e-4, weight decay 0.5e-6 in the one-class phase, 0.5e-3 in pre-training: the official MNIST run), the
learning rate x0.1 after ``lr_milestone`` epochs of each phase. The official code's preprocessing (global
contrast normalisation with per-class min-max constants) is replaced by the project's in-graph scaling of the
uint8 frame to [-1, 1]: no per-dataset statistics, and a global brightness change still moves the score.

Score in the graph: ||phi(x) - c||^2 - R^2 (R = 0 for one-class). Anomaly map: that score split exactly over the
positions of the last feature map (phi is linear in it: position p's share is (phi - c) . W_p f_p - (c . (phi - c)
+ R^2) / P, the shares summing to the score), upsampled to the input and blurred. It says which part of
the image moved phi away from c; it is coarse (stride 4 grey, 8 colour) and can be negative where a region
pulls phi towards c.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.errors import UserError
from trainer.ingraph import FrameInput, MapBlur
from trainer.loop import BEST, LAST, RUN, EpochModel, EpochTrainer, Log, LossParts, Update, resolve_device
from trainer.models import FOREIGN_OBJECTS, ONE_CLASS, ModelDefaults, ModelSettings, RunOptions, register_model, setting

if TYPE_CHECKING:
    from trainer.frames import TrainingData

BN_EPS = 1e-4  # the official code's
PRETRAIN_DIR = "pretrain"
ONE_CLASS_DIR = "one-class"
# (widths, rep_dim) of the paper's two LeNet-type networks
MNIST_NET = ([8, 4], 32)
CIFAR_NET = ([32, 64, 128], 128)


def network_shape(channels: int, widths: list[int], rep_dim: int) -> tuple[list[int], int]:
    """The configured widths / rep_dim, or the paper's network for grey (MNIST) or colour (CIFAR-10) input."""
    default = MNIST_NET if channels == 1 else CIFAR_NET
    return (list(widths) or list(default[0])), (rep_dim or default[1])


def _conv_level(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 5, padding=2, bias=False), nn.BatchNorm2d(c_out, eps=BN_EPS, affine=False),
            nn.LeakyReLU()]


class LeNetEncoder(nn.Module):
    """x [N,C,H,W] -> phi(x) [N,rep_dim]; ``features`` gives the last feature map [N,widths[-1],H/2^L,W/2^L]."""

    def __init__(self, channels: int, widths: list[int], rep_dim: int, hw: tuple[int, int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = channels
        for w in widths:
            layers += [*_conv_level(c, w), nn.MaxPool2d(2, 2)]
            c = w
        self.features = nn.Sequential(*layers)
        scale = 2 ** len(widths)
        self.grid = (hw[0] // scale, hw[1] // scale)
        self.fc = nn.Linear(c * self.grid[0] * self.grid[1], rep_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))  # type: ignore[no-any-return]


class LeNetDecoder(nn.Module):
    """phi [N,rep_dim] -> x^ [N,C,H,W] in [-1, 1]: the encoder mirrored, bias-free, BN without affine."""

    def __init__(self, channels: int, widths: list[int], rep_dim: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.grid = grid
        self.top = widths[-1]
        self.fc = nn.Linear(rep_dim, self.top * grid[0] * grid[1], bias=False)
        layers: list[nn.Module] = [nn.BatchNorm2d(self.top, eps=BN_EPS, affine=False), nn.LeakyReLU()]
        ups = list(reversed(widths))
        for c_in, c_out in zip(ups, ups[1:] + ups[-1:], strict=True):
            layers += [nn.Upsample(scale_factor=2)]
            layers += [nn.ConvTranspose2d(c_in, c_out, 5, padding=2, bias=False),
                       nn.BatchNorm2d(c_out, eps=BN_EPS, affine=False), nn.LeakyReLU()]
        layers += [nn.ConvTranspose2d(ups[-1], channels, 5, padding=2, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.main(self.fc(z).view(-1, self.top, *self.grid))  # type: ignore[no-any-return]


def centre_from_mean(mean: torch.Tensor, eps: float) -> torch.Tensor:
    """The official ±eps rule: coordinates of the mean representation within eps of 0 are moved to ±eps
    (their sign kept; an exact 0 stays 0, as there)."""
    c = mean.clone()
    near = c.abs() < eps
    c[near & (c < 0)] = -eps
    c[near & (c > 0)] = eps
    return c


class Hypersphere(nn.Module):
    """phi -> ||phi - c||^2 - R^2; holds c, R and the step count (buffers: checkpointed by the loop, so
    ``--resume`` continues with the same centre, radius and learning-rate schedule)."""

    centre: torch.Tensor
    radius: torch.Tensor
    steps: torch.Tensor

    def __init__(self, rep_dim: int) -> None:
        super().__init__()
        self.register_buffer("centre", torch.zeros(rep_dim))
        self.register_buffer("radius", torch.tensor(0.0))
        self.register_buffer("steps", torch.tensor(0, dtype=torch.int64))

    def distance(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.centre).pow(2).sum(1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.distance(z) - self.radius.pow(2)


class PositionShares(nn.Module):
    """The score split over the last feature map's positions (exact: the shares sum to the score), upsampled.

    It holds its own constants, -c, -c / P and R^2 / P (taken at export; P positions): tensors equal to the FP32-kept
    distance's c and R would be merged with them by the exporter and reach this FP16 part of model.fp16.onnx
    as FP32.
    """

    neg_centre: torch.Tensor
    centre_share: torch.Tensor
    radius_share: torch.Tensor

    def __init__(self, fc: nn.Linear, sphere: Hypersphere, grid: tuple[int, int], hw: tuple[int, int],
                 sigma: float) -> None:
        super().__init__()
        self.fc = fc
        positions = grid[0] * grid[1]
        self.register_buffer("neg_centre", -sphere.centre.detach())
        self.register_buffer("centre_share", -sphere.centre.detach() / positions)
        self.register_buffer("radius_share", sphere.radius.detach().pow(2).view(1) / positions)
        self.hw = hw
        self.blur = MapBlur(sigma, hw) if sigma > 0 else None

    def grid_shares(self, f: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """[N,1,h,w] at the feature grid: position p's share of the score; they sum to ||phi - c||^2 - R^2."""
        e = z + self.neg_centre  # [N, D]
        u = (e @ self.fc.weight).view(f.shape)  # [N, C, h, w]: e . W_p per channel and position
        # ||e||^2 - R^2 = sum_p e . W_p f_p - e . c - R^2: the last two terms spread evenly over the positions
        rest = (self.centre_share * e).sum(1, keepdim=True) - self.radius_share  # [N, 1]
        return (u * f).sum(1, keepdim=True) + rest.view(-1, 1, 1, 1)

    def forward(self, f: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        shares = self.grid_shares(f, z)
        amap = F.interpolate(shares, size=self.hw, mode="bilinear", align_corners=False)
        if self.blur is not None:
            amap = self.blur(amap)
        return amap.squeeze(1)


class DeepSvddExport(nn.Module):
    """frames uint8 [N,H,W,3] BGR -> (score float32 [N] = ||phi - c||^2 - R^2, anomaly_map float32 [N,H,W])."""

    def __init__(self, frame_input: FrameInput, encoder: LeNetEncoder, sphere: Hypersphere,
                 shares: PositionShares) -> None:
        super().__init__()
        self.frame_input = frame_input
        self.encoder = encoder
        self.distance = sphere
        self.shares = shares

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.encoder.features(self.frame_input(frames))
        z = self.encoder.fc(f.flatten(1))
        return self.distance(z), self.shares(f, z)


def _steps_per_epoch(data: TrainingData, batch_size: int) -> int:
    """The loop's batches per epoch (the same loader arguments as EpochTrainer.run; sharded like it)."""
    n = len(data.fit_paths)
    return max(1, len(data.loader(data.fit_paths, batch_size, shuffle=True, drop_last=n > batch_size)))


def milestone_schedule(milestone: int) -> Callable[[int, int], float]:
    """The official MultiStepLR with one milestone, as the loop's ``Update.lr_factor``: x 0.1 for the epochs past
    ``milestone`` (0 = never); a function of the epoch, so a resumed run keeps it."""
    return lambda epoch, _epochs: 0.1 if 0 < milestone < epoch else 1.0


class AutoencoderPretraining(EpochModel):
    """Phase 1: the encoder and its mirrored decoder trained on reconstruction by the shared loop."""

    name = "deep-svdd-pretraining"

    def __init__(self, svdd: DeepSvdd) -> None:
        super().__init__(replace(svdd.config, epochs=svdd.cfg.pretrain_epochs))
        self.svdd = svdd
        self.name = f"{svdd.name}-pretraining"
        cfg = svdd.cfg
        self.decoder = LeNetDecoder(svdd.channels, svdd.widths, svdd.rep_dim, svdd.encoder.grid)
        self.optimizer = torch.optim.Adam([*svdd.encoder.parameters(), *self.decoder.parameters()], lr=cfg.lr,
                                          weight_decay=cfg.pretrain_weight_decay)

    def networks(self) -> dict[str, nn.Module]:
        return {"encoder": self.svdd.encoder, "decoder": self.decoder}

    def updates(self) -> list[Update]:
        return [Update("autoencoder", self.optimizer, self._loss,
                       lr_factor=milestone_schedule(self.svdd.cfg.lr_milestone))]

    def _loss(self, x: torch.Tensor, _shared: dict[str, Any]) -> LossParts:
        rec = self.reconstruction_error(x).mean()
        return rec, {"reconstruction": rec}

    def reconstruction_error(self, x: torch.Tensor) -> torch.Tensor:
        return (self.decoder(self.svdd.encoder(x)) - x).pow(2).flatten(1).mean(1)

    def prepare(self, frames: torch.Tensor) -> torch.Tensor:
        return self.svdd.prepare(frames)

    def validation_loss(self, x: torch.Tensor) -> torch.Tensor:
        return self.reconstruction_error(x)

    def raw_score(self, x: torch.Tensor) -> torch.Tensor:
        return self.reconstruction_error(x)

    def export_module(self) -> nn.Module:
        raise NotImplementedError("the pre-training phase is not exported")

    def map_shape(self) -> tuple[int, int]:
        return self.svdd.hw


@dataclass
class HypersphereSettings(ModelSettings):
    """What Deep SVDD and the models built on it (Deep SAD) share: the network, the pre-training, Adam and its
    schedule, the centre's rule and the map."""

    section: ClassVar[str] = "deep_svdd"  # the config section, for the messages

    widths: List[int] = setting(
        [], "channels of each conv level (5x5, BN without affine, leaky ReLU, max-pool); [] = the paper's net: "
        "grey [8, 4], colour [32, 64, 128]")
    rep_dim: int = setting(0, "size of the representation phi(x); 0 = the paper's: grey 32, colour 128")
    pretrain_epochs: int = setting(150, "autoencoder pre-training epochs before the one-class objective "
                                   "(`epochs`); 0 = none")
    lr: float = setting(0.0001, "Adam learning rate, both phases")
    weight_decay: float = setting(0.5e-6, "Adam weight decay of the one-class phase")
    pretrain_weight_decay: float = setting(0.5e-3, "Adam weight decay of the pre-training")
    lr_milestone: int = setting(50, "learning rate x 0.1 after this many epochs of each phase; 0 = never")
    centre_eps: float = setting(0.1, "coordinates of the centre c within this of 0 are moved to +-centre_eps")
    map_sigma: float = setting(2.0, "Gaussian blur of the anomaly map (the score split over the last feature "
                               "map), px; 0 = off")

    def validate(self) -> None:
        s = self.section
        if len(self.widths) > 4 or any(w < 1 for w in self.widths):
            # 4 levels pool 16x: inputs are multiples of 16, so every level halves evenly
            raise ValueError(f"{s}.widths must be up to 4 channel counts >= 1 ([] = the paper's net)")
        if self.rep_dim < 0 or self.pretrain_epochs < 0 or self.lr_milestone < 0:
            raise ValueError(f"{s}.rep_dim, pretrain_epochs and lr_milestone must be >= 0")
        if self.lr <= 0 or self.weight_decay < 0 or self.pretrain_weight_decay < 0:
            raise ValueError(f"{s}.lr must be > 0 and the weight decays >= 0")
        if self.centre_eps < 0 or self.map_sigma < 0:
            raise ValueError(f"{s}.centre_eps and map_sigma must be >= 0")


@dataclass
class DeepSvddSettings(HypersphereSettings):
    """Deep SVDD (Ruff et al. 2018), the official code's MNIST run; ``epochs`` counts the one-class epochs, which
    follow pretrain_epochs of autoencoder pre-training."""

    objective: str = setting("one-class", "one-class: mean ||phi(x) - c||^2; soft-boundary: R^2 + 1/nu x "
                             "mean(max(0, d - R^2))")
    nu: float = setting(0.1, "soft-boundary: the share of training images allowed outside the sphere")
    warm_up_epochs: int = setting(10, "soft-boundary: epochs before the radius R is first updated")

    def validate(self) -> None:
        if self.objective not in ("one-class", "soft-boundary"):
            raise ValueError("deep_svdd.objective must be one-class or soft-boundary")
        if not 0.0 < self.nu <= 1.0:
            raise ValueError("deep_svdd.nu must be in (0, 1]")
        if self.warm_up_epochs < 0:
            raise ValueError("deep_svdd.warm_up_epochs must be >= 0")
        super().validate()


@register_model("deep-svdd", settings=DeepSvddSettings)
class DeepSvdd(EpochModel):
    """Deep SVDD: a bias-free CNN trained to map normal images close to a centre c; the distance is the score."""

    catches = FOREIGN_OBJECTS  # one representation of the whole image: departures of the image as a whole
    family = ONE_CLASS
    display_name = "Deep SVDD"
    defaults = ModelDefaults(input_size=64, batch_size=200, epochs=150)  # the official batch and epochs
    # The distance subtracts c from phi and sums squares: kept FP32, as the other models' distances.
    fp32_scopes = ("/distance/",)
    # One process only (torchrun is refused with one line where the loop checks it): the centre, radius and step
    # count live in parameter-free modules that DistributedDataParallel cannot wrap, the soft-boundary radius
    # would be each rank's own batch quantile, and the pre-training phase's encoder belongs to this model.
    trains_distributed = False

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.cfg: HypersphereSettings = config.settings_for(self.name)
        self.hw = config.input.hw
        self.channels = 1 if config.input.channels == "gray" else 3  # 'auto' is resolved from the data upstream
        self.widths, self.rep_dim = network_shape(self.channels, self.cfg.widths, self.cfg.rep_dim)
        # At most 4 levels (deep_svdd.widths) on inputs that are multiples of 16: every level pools evenly.
        torch.manual_seed(int(config.seed))
        self.frame_input = FrameInput(self.channels)
        self.encoder = LeNetEncoder(self.channels, self.widths, self.rep_dim, self.hw)
        self.sphere = Hypersphere(self.rep_dim)
        self.optimizer = torch.optim.Adam(self.encoder.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        own = self.cfg if isinstance(self.cfg, DeepSvddSettings) else None  # a subclass' settings have no boundary
        self.objective = own.objective if own else "one-class"
        self.soft = self.objective == "soft-boundary"
        self.nu = own.nu if own else 1.0
        self.warm_up_epochs = own.warm_up_epochs if own else 0
        self.steps_per_epoch = 1
        self._last_distances: Optional[torch.Tensor] = None
        self._pretraining: Optional[dict[str, Any]] = None

    # -- the loop's interface (phase 2, the one-class objective) ---------------------------------------------
    def networks(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder, "sphere": self.sphere}

    def updates(self) -> list[Update]:
        return [Update("one_class", self.optimizer, self._loss, lr_factor=milestone_schedule(self.cfg.lr_milestone))]

    def _loss(self, x: torch.Tensor, _shared: dict[str, Any]) -> LossParts:
        dist = self.sphere.distance(self.encoder(x).float())
        self._last_distances = dist.detach()
        if self.soft:
            r2 = self.sphere.radius.pow(2)
            loss = r2 + (dist - r2).clamp(min=0).mean() / self.nu
            return loss, {"loss": loss, "distance": dist.mean(), "radius": self.sphere.radius.clone()}
        loss = dist.mean()
        return loss, {"loss": loss}

    def prepare(self, frames: torch.Tensor) -> torch.Tensor:
        return self.frame_input.to(frames.device)(frames)

    def validation_loss(self, x: torch.Tensor) -> torch.Tensor:
        dist = self.sphere.distance(self.encoder(x).float())
        if self.soft:
            r2 = self.sphere.radius.pow(2)
            return r2 + (dist - r2).clamp(min=0) / self.nu
        return dist

    def raw_score(self, x: torch.Tensor) -> torch.Tensor:
        return self.sphere(self.encoder(x).float())

    def after_step(self, logs: dict[str, float]) -> None:
        self.sphere.steps += 1
        steps = int(self.sphere.steps)
        if self.soft and self._last_distances is not None and steps > self.warm_up_epochs * self.steps_per_epoch:
            # The official get_radius: the (1 - nu) quantile of the batch's distances (as radii).
            radius = np.quantile(self._last_distances.sqrt().cpu().numpy(), 1.0 - self.nu)
            self.sphere.radius.fill_(float(radius))

    # -- the two phases --------------------------------------------------------------------------------------
    def fit(self, data: TrainingData, log: Log = lambda _m: None, run: Optional[RunOptions] = None) -> dict[str, Any]:
        """Pre-train (or load a finished pre-training), set c, then the one-class objective; both by the loop."""
        run = run or RunOptions()
        self.require_training_images(data)
        self.steps_per_epoch = _steps_per_epoch(data, int(self.config.batch_size))
        pretrained_now = False
        if self.cfg.pretrain_epochs > 0:
            pretrained_now = self._pretrain(self.pretraining_data(data), log, run)
        device = resolve_device(run.device)
        if not (run.resume and not pretrained_now and self._has_checkpoint(run, ONE_CLASS_DIR)):
            self.sphere.centre.copy_(self._centre(self.pretraining_data(data), device))
        one_class_run = replace(run, checkpoint_dir=self._subdir(run, ONE_CLASS_DIR), select=self._select(data, run),
                                resume=run.resume and not pretrained_now and self._has_checkpoint(run, ONE_CLASS_DIR))
        facts = EpochTrainer(self, data, one_class_run, log).run()
        return {**facts, **self.fit_facts()}

    def pretraining_data(self, data: TrainingData) -> TrainingData:
        """What the autoencoder and the centre c are computed from: the training images (a model that learns
        from labelled defects adds them, as its official code does)."""
        return data

    def _pretrain(self, data: TrainingData, log: Log, run: RunOptions) -> bool:
        """Phase 1 through the loop; returns False when a finished pre-training was loaded instead (--resume)."""
        phase = AutoencoderPretraining(self)
        where = self._subdir(run, PRETRAIN_DIR)
        if run.resume and where is not None and self._finished(where, run.fingerprint):
            state = torch.load(where / BEST, map_location="cpu", weights_only=True)
            self.encoder.load_state_dict(state["networks"]["encoder"])
            log(f"{self.name}: pre-training finished earlier, its kept epoch loaded from {where / BEST}")
            self._pretraining = {"loaded_from": str(where / BEST), "selected_epoch": int(state["epoch"])}
            return False
        resume = run.resume and where is not None and (where / LAST).is_file()
        log(f"{self.name}: autoencoder pre-training for {self.cfg.pretrain_epochs} epochs")
        # Pre-training keeps the epoch that reconstructs held-out normals best (never a defect AUROC).
        select = "last" if run.select == "last" else "val_loss"
        facts = EpochTrainer(phase, data, replace(run, checkpoint_dir=where, resume=resume, select=select,
                                                  stop_after_epoch=None), log).run()
        self._pretraining = {k: facts[k] for k in ("epochs", "selected_epoch", "selected", "images_per_second")}
        return True

    def _select(self, data: TrainingData, run: RunOptions) -> str:
        """The one-class phase's epoch choice: the loop's, except that the soft-boundary loss contains R, which
        moves from epoch to epoch, so its validation loss does not compare epochs: there the last epoch is kept
        (the official code's), unless labelled defects in DIR/val let the loop compare validation AUROC."""
        if not self.soft or run.select in ("last", "val_auroc"):
            return run.select
        return "auto" if run.select == "auto" and data.has_val_defects else "last"

    @staticmethod
    def _subdir(run: RunOptions, name: str) -> Optional[Path]:
        return None if run.checkpoint_dir is None else run.checkpoint_dir / name

    def _has_checkpoint(self, run: RunOptions, name: str) -> bool:
        where = self._subdir(run, name)
        return where is not None and (where / LAST).is_file()

    @staticmethod
    def _finished(where: Path, fingerprint: str) -> bool:
        try:
            status = json.loads((where / RUN).read_text())
        except (OSError, ValueError):
            return False
        return (status.get("status") == "complete" and status.get("fingerprint") == fingerprint
                and (where / BEST).is_file())

    @torch.no_grad()
    def _centre(self, data: TrainingData, device: torch.device) -> torch.Tensor:
        """c: the mean of phi over the training images (eval mode), with the ±centre_eps rule."""
        self.encoder.to(device).eval()
        total = torch.zeros(self.rep_dim, dtype=torch.float64, device=device)
        n = 0
        for frames in data.loader(data.fit_paths, int(self.config.batch_size)):
            z = self.encoder(self.prepare(frames.to(device)))
            total += z.double().sum(0)
            n += int(z.shape[0])
        return centre_from_mean((total / max(n, 1)).float(), self.cfg.centre_eps).cpu()

    def fit_facts(self) -> dict[str, Any]:
        return {"channels": self.channels, "widths": self.widths, "rep_dim": self.rep_dim,
                "objective": self.objective, "pretraining": self._pretraining,
                "radius": round(float(self.sphere.radius), 6),
                "centre_norm": round(float(self.sphere.centre.norm()), 6),
                "encoder_parameters": sum(p.numel() for p in self.encoder.parameters())}

    # -- export ----------------------------------------------------------------------------------------------
    def map_shape(self) -> tuple[int, int]:
        return self.hw

    def export_batch_limit(self, max_elements: int, n_images: Optional[int] = None) -> Optional[int]:
        """The first level's feature map grows with the batch."""
        return max_elements // (self.widths[0] * self.hw[0] * self.hw[1])

    def export_checks(self, max_batch: int, max_elements: int) -> dict[str, Any]:
        """The largest intermediate: the first level's feature map at ``max_batch``."""
        largest = max_batch * self.widths[0] * self.hw[0] * self.hw[1]
        if largest > max_elements:
            raise UserError(f"{self.name}: export.max_batch {max_batch} x {self.widths[0]} channels x "
                            f"{self.hw[0]}x{self.hw[1]} exceeds export.max_distance_elements {max_elements}; "
                            "lower export.max_batch or the input size")
        return {"max_batch": max_batch, "largest_tensor_elements": largest, "rep_dim": self.rep_dim,
                "widths": self.widths, "map_grid": list(self.encoder.grid)}

    def export_module(self) -> nn.Module:
        for net in (self.frame_input, self.encoder, self.sphere):
            net.cpu().eval()
        shares = PositionShares(self.encoder.fc, self.sphere, self.encoder.grid, self.hw, self.cfg.map_sigma)
        return DeepSvddExport(self.frame_input, self.encoder, self.sphere, shares).eval()
