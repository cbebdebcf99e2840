"""Metaformer (Wu, Chen, Fuh & Liu, "Learning Unsupervised Metaformer for Anomaly Detection", ICCV 2021). No
official code is published (the paper links none; the code and pages corpora searched here hold none), so this
follows the paper's description: a reconstruction network whose reconstruction gap |x - x^| is the anomaly map,
an instance-aware attention that weights the gap towards the object, and model parameters meta-learned with MAML
(Finn, Abbeel & Levine, ICML 2017) over many few-shot reconstruction tasks, then adapted to the new category.

The network (``MetaformerNet``): a convolutional autoencoder (4x4 stride-2 convolutions with LeakyReLU down to a
stride-2^levels map, a 1x1 bottleneck of ``latent`` channels, transposed convolutions with ReLU back up, tanh out)
and an attention branch on the encoder's last map (3x3 conv, ReLU, 1x1 conv to one channel, bilinear up to the
input, sigmoid): A(x) in [0, 1] per pixel. No normalisation layers: MAML's inner loop runs the network with
substituted parameters (torch.func.functional_call), where BatchNorm's running statistics have no meaning.

Instance prior: what the attention branch is trained towards. The paper uses a saliency-prediction network; no
saliency weights can be had here, so the prior is the classical spectral-residual saliency (Hou & Zhang, "Saliency
Detection: A Spectral Residual Approach", CVPR 2007), in numpy: the grey image at 64 x 64, log amplitude spectrum
minus its 3 x 3 mean, back with the phase, squared magnitude, Gaussian blur (11 x 11, sigma 2.5: OpenCV's
StaticSaliencySpectralResidual defaults), resized to the input, min-max scaled to [0, 1]. It is computed in
``prepare`` for training and validation only; the exported graph carries the learned attention branch.

Losses. Per image, with w = floor + (1 - floor) A(x) (``attention_floor``; w detached: the attention is learned
from the prior, not from where reconstruction is easy): the attention-weighted reconstruction error
sum(w e) / sum(w), e = the squared gap averaged over channels, plus ``w_attention`` x the BCE of A(x) against the
prior. Score: the same attention-weighted error of the frame, min-max scaled in the graph with calibration
constants (as the other reconstruction models); map: w |x - x^| (channel mean, in [0, 1] pixel units), smoothed by
``map_sigma``.

Training, all through the shared loop (trainer/loop.py; the model never calls backward() or step()): the first
``meta_share`` of the epochs meta-train, the rest adapt (the phase of an epoch is a function of the epoch alone,
set by the update's ``lr_factor`` hook, as HTD's scales). Meta-training step (``meta_loss``): ``tasks`` tasks,
each ``support`` + ``query`` images of one meta-training category; inner loop: ``inner_steps`` SGD steps of the
support loss from the shared initial parameters theta (lr ``inner_lr``; torch.autograd.grad with create_graph, so
second-order MAML; ``first_order: true`` drops the second-order term, FOMAML); outer loss: the query loss of the
adapted parameters, averaged over the tasks, which the loop differentiates back to theta and Adam (``meta_lr``)
steps. The station's batch is not used in this phase. Adaptation (the paper's meta-test): a fresh Adam state,
lr ``lr``, the plain loss on the station's own training images from the meta-learned theta. ``meta_share: 0``
is the ablation: adaptation from random initial parameters.

Meta-training categories (``meta_source``), never the station's own product (the meta-test category):
- ``procedural`` (default): categories the project makes on the fly, one seed each (``meta_categories`` of them):
  an object (ellipse, ring, polygon or rounded square; its size, aspect and texture fixed per category) on a
  background (a flat colour or a texture), both textures DRAEM's ``procedural_texture`` (Perlin noise, stripes,
  checks, blobs); each image of a category moves, turns and scales the object a little, crops the textures at
  another place, shifts the brightness and adds noise. Made from seeds, so no image can be the station's.
- a folder whose sub-folders are categories (a user's other products' good frames): a sub-folder that holds one
  of the station's training or held-out images (the same file, or the same frame at the input size) is left out
  whole, with a log line; categories with fewer than support + query images are left out too.

What differs from the paper, and why:
- the paper's network and saliency model are larger and pretrained; here a small autoencoder trained from scratch
  and a weight-free saliency (no downloads here), on 32-64 px inputs for a CPU station.
- the paper meta-trains on other real categories (MVTec's); the default here are procedural categories, since a
  station has one product; ``meta_source`` takes a folder of other products when a user has them.
- the meta-batch, shots, inner steps and learning rates are settings with small CPU defaults (4 tasks of 4 + 4
  images, one inner step), not the paper's; the meta-training step count is the meta epochs times the station's
  batches an epoch (the loop's step), so a fit on few images needs more epochs for the same meta-training.
- the epoch kept is chosen by the loop's validation loss on held-out normals (the attention-weighted
  reconstruction error), over both phases (a meta-training epoch's is that of the un-adapted initial parameters,
  which the adapting epochs beat in the test's fit: epoch 98 of 100 kept); ``kept_phase`` in the fit's facts says
  which phase the kept epoch is in.
- only the abstract and secondary descriptions of the paper could be read from this machine: its network sizes,
  loss weights, how the attention enters the loss, and its image-level aggregate of the map are not known to us.
  Here the attention weights the squared gap with a floor (``attention_floor``) in both the loss and the score,
  and the image score is the weighted mean (as Divide-and-Assemble's and MemAE's mean error), min-max scaled.

Measured (2026-12-07, the shared 2-core VM at load average 3-4, one thread each, scored through the exported FP32
ONNX graph; epochs never chosen on test data: the loop keeps the lowest held-out validation loss, the few-shot
protocol the last epoch):
- generated washers, 64 px, 40 fitted + 10 held out, 20 + 20 test parts (tests/test_trainer_metaformer.py: 100
  epochs at batch 16, 30 meta-training, adaptation lr 3e-3): image AUROC 0.783, pixel 0.876, fit 14 s (the kept
  epoch 98, adapting). GANomaly on the same parts (ngf = ndf = 16, 100 epochs, divide_assemble.py's docstring):
  0.595.
- over 3 seeds (benchmarks/accuracy_synthetic.py --model metaformer --seeds 3 --size 64 --train 50 --set
  input.height=64 --set input.width=64 --set epochs=100 --set batch_size=16 --set metaformer.meta_share=0.3 --set
  training.workers=0; 40 + 80 test parts): image AUROC 0.777 +- 0.051 (0.728, 0.776, 0.829), pixel 0.908 +- 0.007;
  by kind: crack 0.90, missing 0.78, spot 0.72, scratch 0.71; 63 s a seed. GANomaly, same recipe (cavga.py's
  docstring): 0.629 +- 0.039; Divide-and-Assemble 0.688 +- 0.061.
- what meta-learning buys, the same command: with long adaptation nothing. No meta-training (meta_share 0,
  --set epochs=70: the same 70 adaptation epochs): 0.793 +- 0.043 (0.744, 0.808, 0.826), pixel 0.920; ten times
  the meta-training (epochs 370, meta_share 0.811: 300 meta epochs, 600 meta steps of 4 tasks, then 70
  adapting): 0.775 +- 0.046, 2-4 min a seed. With short adaptation, it does: 10 adaptation epochs (20 Adam
  steps) after 30 meta-training epochs (epochs 40, meta_share 0.75) 0.611 +- 0.083, pixel 0.870; the same 10
  epochs from random initial parameters (epochs 10, meta_share 0) 0.521 +- 0.022, pixel 0.779. The meta-learned
  initial parameters reconstruct a new product sooner (the paper's few-shot adaptation), not better once the
  station's images have trained it to convergence.
- first-order MAML (the 3-seed command above with --set metaformer.first_order=true): 0.727 +- 0.082 (0.640,
  0.737, 0.804), 30-38 s a seed against second order's 0.777 and 61-65 s (the two at similar load).
- few-shot protocol, Fashion-MNIST, seed 0, 32 px, 300 test images, image AUROC %: ``OMP_NUM_THREADS=1 python
  benchmarks/protocol.py --dataset fashion-mnist --protocol few-shot --shots 1,5,10 --models metaformer --seeds 1
  --classes 0,1,2 --test-limit 300 --threads 1 --epochs E [--set metaformer.meta_share=S]``; k images fit one
  batch, so an epoch is one step: "meta 100 + adapt 100" is E 200 (the default meta_share 0.5), "adapt 100" E 100
  with S 0, "meta 100 + adapt 20" E 120 with S 0.834, "adapt 20" E 20 with S 0. HTD, PatchCore and GEOM from
  htd.py's docstring (the same draws):

                      meta 100 +   adapt    meta 100 +   adapt
      k   class       adapt 100    100      adapt 20     20       HTD    PatchCore  GEOM
      1   mean        69.4         69.6     75.3         71.7     75.5   73.9       80.6
      5   mean        85.5         86.4     81.7         77.8     77.5   76.9       81.5
      10  mean        82.6         84.9     80.6         76.9     77.5   79.1       83.9
      (per class, k = 1 / 5 / 10: meta 100 + adapt 100: T-shirt 71.3 / 83.5 / 85.5, Trouser 72.7 / 94.2 / 96.7,
      Pullover 64.3 / 78.7 / 65.5; adapt 100: 74.3 / 89.3 / 87.1, 62.0 / 93.1 / 97.2, 72.3 / 76.8 / 70.2; meta 100
      + adapt 20: 76.9 / 79.1 / 74.5, 80.0 / 93.3 / 93.1, 69.0 / 72.7 / 74.0; adapt 20: 76.3 / 80.4 / 76.2,
      64.8 / 85.9 / 87.8, 74.0 / 67.0 / 66.8)

  As on the washers: with 20 adaptation steps meta-learning adds 3.6 / 3.9 / 3.7 points at k = 1 / 5 / 10; with
  100 it adds nothing (-0.2 / -0.9 / -2.3). With 100 adaptation steps Metaformer is ahead of HTD and PatchCore at
  k = 5 and 10 (by 3.5-9.5 points) and of GEOM at k = 5 (by 4-5), level with it at k = 10 (-1.3 / +1.0); at k = 1
  behind all three, except with the meta-learned start and short adaptation (75.3, level with HTD). One seed
  only; 23-80 s a run at load 3-4.5 (the meta steps cost most). Seeds 1 and 2 (the same command, E 200, with
  ``--first-seed 1 --seeds 2``; idle VM, 21 s a run): means 69.0 / 87.3 / 89.1 and 80.1 / 82.1 / 83.6; over seeds
  0-2 **72.8 +- 6.3 / 84.9 +- 2.6 / 85.1 +- 3.5** beside HTD 77.7 / 78.4 / 78.7 and PatchCore 76.7 / 80.6 / 83.9 on
  the same draws (benchmarks/README.md, the few-shot section).
  The meta-training categories are procedural, not garments: the paper's other real categories would be another
  product's frames (``meta_source``); Fashion-MNIST's other classes are this protocol's anomalies, so they are
  not used.
- ELPV mono solar cells (benchmarks/protocol.py --dataset elpv --cell mono --models metaformer --seeds 1
  --threads 1; shipped settings: 64 px, 100 epochs at batch 16, 50 meta-training; seed 0): image AUROC 85.3, AP
  88.7, F1 at the shipped threshold 69.5 (recall 54.6, false alarms 2.8 %), best F1 78.4; fit 605 s at load
  average 3.3-4.5, 1098 img/s through the FP32 graph. Divide-and-Assemble 87.5, FCDD 88.4, PatchCore about 94.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from core.errors import UserError
from trainer.data import read_image
from trainer.ingraph import FrameInput, MapBlur, ScoreScale
from trainer.loop import EpochModel, Log, LossParts, Update
from trainer.models import (
    GENERATIVE,
    SURFACE_DEFECTS,
    ModelDefaults,
    ModelSettings,
    RunOptions,
    register_model,
    setting,
)
from trainer.models.draem import IMAGE_SUFFIXES, procedural_texture
from trainer.networks import check_power_of_two

if TYPE_CHECKING:
    from trainer.frames import TrainingData

PRIOR_SIDE = 64  # Hou & Zhang compute the spectral residual on a 64 px image (OpenCV's resImWidth/Height)
PRIOR_BLUR = (11, 2.5)  # OpenCV StaticSaliencySpectralResidual's Gaussian on the saliency map: kernel, sigma
CATEGORY_SALT = 0x4D455441  # "META": the procedural categories' seeds, apart from every other seeded draw
SHAPES = ("ellipse", "ring", "polygon", "square")
MAX_FOLDER_IMAGES = 200  # images read per folder category


# -- the instance prior ---------------------------------------------------------------------------------------
def spectral_residual(gray: np.ndarray) -> np.ndarray:
    """Hou & Zhang's spectral-residual saliency of a grey image [H,W] (any range) -> float32 [H,W] in [0, 1].

    At 64 x 64: A = log(1 + |F|), R = A - mean3x3(A), S = |F^-1(exp(R + i phase))|^2, blurred, resized back,
    min-max. log(1 + |F|) rather than log |F|: a synthetic frame's spectrum has exact zeros (a flat square's sinc),
    whose log would swamp the 3 x 3 mean; on camera frames the two agree."""
    h, w = gray.shape
    small = cv2.resize(gray.astype(np.float32), (PRIOR_SIDE, PRIOR_SIDE), interpolation=cv2.INTER_AREA)
    spectrum = np.fft.fft2(small)
    log_amplitude = np.log1p(np.abs(spectrum)).astype(np.float32)
    residual = log_amplitude - cv2.blur(log_amplitude, (3, 3))
    saliency = np.abs(np.fft.ifft2(np.exp(residual + 1j * np.angle(spectrum)))) ** 2
    saliency = cv2.GaussianBlur(saliency.astype(np.float32), (PRIOR_BLUR[0], PRIOR_BLUR[0]), PRIOR_BLUR[1])
    saliency = cv2.resize(saliency, (w, h), interpolation=cv2.INTER_LINEAR)
    low, span = float(saliency.min()), float(np.ptp(saliency))
    return np.asarray((saliency - low) / span if span > 1e-12 else np.zeros_like(saliency), np.float32)


def instance_prior(frames: np.ndarray) -> np.ndarray:
    """uint8 BGR frames [N,H,W,3] -> the prior [N,1,H,W]: each frame's spectral residual of its luma."""
    out = np.empty((len(frames), 1, *frames.shape[1:3]), np.float32)
    for i, frame in enumerate(frames):
        out[i, 0] = spectral_residual(cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_BGR2GRAY))
    return out


# -- meta-training categories ---------------------------------------------------------------------------------
class ProceduralCategory:
    """One made-up product: an object of a fixed shape and texture on a fixed background; ``draw`` makes a good
    frame of it (the object moved, turned and scaled a little, the textures cropped elsewhere, brightness, noise)."""

    def __init__(self, seed: int, hw: tuple[int, int]) -> None:
        rng = np.random.default_rng([CATEGORY_SALT, seed])
        self.hw = hw
        h, w = hw
        self.background = procedural_texture((2 * h, 2 * w), rng)
        if rng.random() < 0.4:  # a flat background, as a product on a conveyor or a fixture
            self.background[:] = rng.uniform(0, 255, 3).round().astype(np.uint8)
        self.texture = procedural_texture((2 * h, 2 * w), rng)
        self.shape = SHAPES[int(rng.integers(len(SHAPES)))]
        self.radius = float(rng.uniform(0.2, 0.38))  # of the side
        self.aspect = float(rng.uniform(0.6, 1.0))
        self.hole = float(rng.uniform(0.3, 0.6))  # ring's inner radius, of the outer
        self.corners = int(rng.integers(3, 9))
        self.turns = bool(rng.random() < 0.5)  # free rotation, or a few degrees only

    def mask(self, rng: np.random.Generator) -> np.ndarray:
        """The object's silhouette, uint8 [H,W] of 0 and 255, at this frame's pose."""
        h, w = self.hw
        side = min(h, w)
        cx, cy = w / 2 + rng.uniform(-0.06, 0.06) * w, h / 2 + rng.uniform(-0.06, 0.06) * h
        r = self.radius * side * rng.uniform(0.92, 1.08)
        angle = rng.uniform(0, 360) if self.turns else rng.uniform(-8, 8)
        m = np.zeros((h, w), np.uint8)
        axes = (max(1, round(r)), max(1, round(r * self.aspect)))
        if self.shape in ("ellipse", "ring"):
            cv2.ellipse(m, (round(cx), round(cy)), axes, angle, 0, 360, 255, -1)
            if self.shape == "ring":
                inner = (max(1, round(axes[0] * self.hole)), max(1, round(axes[1] * self.hole)))
                cv2.ellipse(m, (round(cx), round(cy)), inner, angle, 0, 360, 0, -1)
        else:
            n = 4 if self.shape == "square" else self.corners
            t = np.deg2rad(angle) + 2 * np.pi * np.arange(n) / n
            pts = np.stack([cx + r * np.cos(t), cy + r * self.aspect * np.sin(t)], 1)
            cv2.fillPoly(m, [np.round(pts).astype(np.int32)], 255)
        return m

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        h, w = self.hw
        y0, x0 = int(rng.integers(h)), int(rng.integers(w))
        background = self.background[y0:y0 + h, x0:x0 + w].astype(np.float32)
        y1, x1 = int(rng.integers(h)), int(rng.integers(w))
        texture = self.texture[y1:y1 + h, x1:x1 + w].astype(np.float32)
        m = cv2.GaussianBlur(self.mask(rng).astype(np.float32) / 255.0, (3, 3), 0.7)[..., None]
        frame = background * (1 - m) + texture * m
        frame = frame * rng.uniform(0.9, 1.1) + rng.normal(0, 2.0, frame.shape)
        return np.clip(frame, 0, 255).round().astype(np.uint8)  # type: ignore[no-any-return]


class FolderCategory:
    """A folder of good frames of one other product, read at the input size."""

    def __init__(self, name: str, frames: np.ndarray) -> None:
        self.name = name
        self.frames = frames


def frame_digest(frame: np.ndarray) -> bytes:
    """A frame's identity: the hash of its bytes at the input size."""
    return hashlib.blake2b(np.ascontiguousarray(frame).tobytes(), digest_size=16).digest()


def folder_categories(root: Path, hw: tuple[int, int], station_paths: Sequence[Path], station_frames: np.ndarray,
                      least: int, log: Log = lambda _m: None, resize: str = "stretch") -> list[FolderCategory]:
    """The sub-folders of ``root`` as categories, leaving out any that holds one of the station's images (the same
    file or the same frame at the input size: the station's product is the meta-test category, never a meta-training
    one) and any with fewer than ``least`` images. ``resize``: how the station's frames are fitted to ``hw``."""
    if not root.is_dir():
        raise UserError(f"metaformer.meta_source {root}: not a folder; give procedural or a folder whose "
                        "sub-folders hold other products' good frames, one product a sub-folder")
    station_files = {p.resolve() for p in station_paths}
    station = {frame_digest(f) for f in station_frames}
    out: list[FolderCategory] = []
    for folder in sorted(d for d in root.iterdir() if d.is_dir()):
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:MAX_FOLDER_IMAGES]
        if any(p.resolve() in station_files for p in files):
            log(f"metaformer: meta-training category {folder.name} left out: it holds the station's own images")
            continue
        frames = [read_image(p, hw, resize) for p in files]  # as the station's frames are read: equal ones match
        if any(frame_digest(f) in station for f in frames):
            log(f"metaformer: meta-training category {folder.name} left out: it holds the station's own images")
            continue
        if len(frames) < least:
            log(f"metaformer: meta-training category {folder.name} left out: {len(frames)} images, a task needs "
                f"{least}")
            continue
        out.append(FolderCategory(folder.name, np.stack(frames)))
    if not out:
        raise UserError(f"metaformer.meta_source {root}: no usable category (a sub-folder of at least {least} "
                        "good frames of another product than the station's)")
    return out


class TaskSampler:
    """Draws few-shot reconstruction tasks: a category at random, then ``support`` + ``query`` good frames of it
    (uint8 BGR [k,H,W,3] each) and the category's index."""

    def __init__(self, categories: Sequence[ProceduralCategory | FolderCategory], support: int, query: int) -> None:
        if not categories:
            raise ValueError("no meta-training category")
        self.categories = list(categories)
        self.support, self.query = support, query

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
        c = int(rng.integers(len(self.categories)))
        category = self.categories[c]
        n = self.support + self.query
        if isinstance(category, FolderCategory):
            frames = category.frames[rng.choice(len(category.frames), n, replace=False)]
        else:
            frames = np.stack([category.draw(rng) for _ in range(n)])
        return frames[:self.support], frames[self.support:], c


# -- the network and its losses -------------------------------------------------------------------------------
class MetaformerNet(nn.Module):
    """x [N,C,S,S] in [-1, 1] -> (reconstruction [N,C,S,S], attention logits [N,1,S,S])."""

    def __init__(self, size: int, channels: int, width: int, levels: int, latent: int) -> None:
        super().__init__()
        down: list[nn.Module] = []
        c_in, c = channels, width
        for _ in range(levels):
            down += [nn.Conv2d(c_in, c, 4, 2, 1), nn.LeakyReLU(0.2)]
            c_in, c = c, c * 2
        c = c_in
        self.encoder = nn.Sequential(*down)
        self.bottleneck = nn.Sequential(nn.Conv2d(c, latent, 1), nn.LeakyReLU(0.2), nn.Conv2d(latent, c, 1),
                                        nn.ReLU())
        up: list[nn.Module] = []
        for _ in range(levels - 1):
            up += [nn.ConvTranspose2d(c, c // 2, 4, 2, 1), nn.ReLU()]
            c //= 2
        up += [nn.ConvTranspose2d(c, channels, 4, 2, 1), nn.Tanh()]
        self.decoder = nn.Sequential(*up)
        c_top = width * 2 ** (levels - 1)
        self.attention = nn.Sequential(nn.Conv2d(c_top, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 1, 1))
        self.size = size

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.encoder(x)
        logits = F.interpolate(self.attention(f), size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.decoder(self.bottleneck(f)), logits


def attention_weights(attention: torch.Tensor, floor: float) -> torch.Tensor:
    """w = floor + (1 - floor) A: the instance's pixels count fully, the rest at ``floor``."""
    return floor + (1.0 - floor) * attention


def weighted_gap(x: torch.Tensor, reconstruction: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The attention-weighted reconstruction error per image [N]: sum(w e) / sum(w), e the squared gap's channel
    mean (the loss and, scaled, the score)."""
    e = (x - reconstruction).pow(2).mean(1, keepdim=True)
    return (weights * e).sum((1, 2, 3)) / weights.sum((1, 2, 3))


def reconstruction_loss(x: torch.Tensor, prior: torch.Tensor, reconstruction: torch.Tensor, logits: torch.Tensor,
                        floor: float, w_attention: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, weighted reconstruction error, attention BCE), batch means: the weights from the attention, detached
    (the attention is trained by the prior alone)."""
    weights = attention_weights(torch.sigmoid(logits.float()), floor).detach()
    rec = weighted_gap(x.float(), reconstruction.float(), weights).mean()
    bce = F.binary_cross_entropy_with_logits(logits.float(), prior.float())
    return rec + w_attention * bce, rec, bce


Params = dict[str, torch.Tensor]


def inner_adapt(loss: Callable[[Params], torch.Tensor], params: Mapping[str, torch.Tensor], lr: float, steps: int,
                first_order: bool) -> Params:
    """MAML's inner loop: ``steps`` SGD steps theta' = theta - lr grad L_support(theta') from ``params``; with
    create_graph (second order) the outer gradient flows through the steps' gradients too, first-order drops it."""
    fast = dict(params)
    for _ in range(steps):
        grads = torch.autograd.grad(loss(fast), list(fast.values()), create_graph=not first_order)
        fast = {k: p - lr * g for (k, p), g in zip(fast.items(), grads, strict=True)}
    return fast


class AttentionGap(nn.Module):
    """(x, x^, A) -> (score [N], map [N,H,W]): the attention-weighted error and w |x - x^| smoothed. FP32 in
    model.fp16.onnx."""

    def __init__(self, floor: float, sigma: float, hw: tuple[int, int]) -> None:
        super().__init__()
        self.floor = floor
        self.blur = MapBlur(sigma, hw) if sigma > 0 else None

    def forward(self, x: torch.Tensor, reconstruction: torch.Tensor,
                attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, reconstruction, attention = x.float(), reconstruction.float(), attention.float()
        weights = attention_weights(attention, self.floor)
        amap = weights * (x - reconstruction).abs().mean(1, keepdim=True) * 0.5
        if self.blur is not None:
            amap = self.blur(amap)
        return weighted_gap(x, reconstruction, weights), amap[:, 0]


class MetaformerExport(nn.Module):
    """frames uint8 [N,H,W,3] BGR -> (score float32 [N], anomaly_map float32 [N,H,W])."""

    def __init__(self, frame_input: FrameInput, net: MetaformerNet, gap: AttentionGap, scale: ScoreScale) -> None:
        super().__init__()
        self.frame_input = frame_input
        self.net = net
        self.gap = gap
        self.scale = scale

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.frame_input(frames)
        reconstruction, logits = self.net(x)
        score, amap = self.gap(x, reconstruction, torch.sigmoid(logits))
        return self.scale(score), amap


@dataclass
class MetaformerSettings(ModelSettings):
    """Metaformer (Wu et al. 2021): an autoencoder with an instance-aware attention, its initial parameters
    meta-learned (MAML) on other categories' few-shot reconstruction tasks, then adapted to the station's images.
    Input: a square power of two from 32 (32, 64, 128, 256)."""

    width: int = setting(16, "encoder width (channels of the first layer; doubling each level down)")
    levels: int = setting(3, "stride-2 levels down to the bottleneck (3: 8x8 at 64 px)")
    latent: int = setting(16, "channels of the 1x1 bottleneck (fewer: less of an anomaly is reconstructed)")
    meta_share: float = setting(0.5, "share of the epochs that meta-train (first; the rest adapt to the station's "
                                "images); 0 = no meta-training, adaptation from random initial parameters")
    meta_source: str = setting("procedural", "meta-training categories: procedural (made on the fly, one seed a "
                               "category) or a folder whose sub-folders are other products' good frames, one "
                               "product each (a sub-folder holding the station's own images is left out)")
    meta_categories: int = setting(64, "procedural categories (seeds) tasks are drawn from")
    tasks: int = setting(4, "tasks per meta-training step (the meta-batch)")
    support: int = setting(4, "support images of a task (the inner loop adapts to them)")
    query: int = setting(4, "query images of a task (the adapted parameters' loss on them is the meta-objective)")
    inner_steps: int = setting(1, "inner-loop SGD steps on the support images")
    inner_lr: float = setting(0.1, "inner-loop SGD learning rate (MAML's alpha)")
    first_order: bool = setting(False, "first-order MAML (drops the second-order term: cheaper, an approximation)")
    meta_lr: float = setting(0.001, "Adam learning rate of the meta-training (outer) steps (MAML's beta)")
    lr: float = setting(0.003, "Adam learning rate of the adaptation to the station's images (a fresh Adam state; "
                        "on the washers at 64 px 3e-3 reached image AUROC 0.75 in 80 adaptation epochs, 1e-3 0.71 "
                        "in 100)")
    w_attention: float = setting(1.0, "weight of the attention branch's BCE against the instance prior")
    attention_floor: float = setting(0.1, "weight of a pixel the attention leaves out, in the loss and the score "
                                     "(1 = no attention)")
    map_sigma: float = setting(2.0, "Gaussian blur of the anomaly map (attention-weighted gap), pixels; 0 = off")

    def validate(self) -> None:
        if min(self.width, self.levels, self.latent, self.meta_categories, self.tasks, self.support, self.query,
               self.inner_steps) < 1:
            raise ValueError("metaformer.width, levels, latent, meta_categories, tasks, support, query and "
                             "inner_steps must be >= 1")
        if not 0 <= self.meta_share < 1:
            raise ValueError("metaformer.meta_share must be in [0, 1) (at least one epoch adapts)")
        if min(self.inner_lr, self.meta_lr, self.lr) <= 0:
            raise ValueError("metaformer.inner_lr, meta_lr and lr must be > 0")
        if self.w_attention < 0 or not 0 <= self.attention_floor <= 1 or self.map_sigma < 0:
            raise ValueError("metaformer.w_attention and map_sigma must be >= 0, attention_floor in [0, 1]")
        if not self.meta_source:
            raise ValueError("metaformer.meta_source must be procedural or a folder")


@register_model("metaformer", settings=MetaformerSettings)
class Metaformer(EpochModel):
    """Metaformer: MAML-initialised autoencoder with an instance-aware attention; the attention-weighted
    reconstruction gap scores."""

    display_name = "Metaformer"
    catches = SURFACE_DEFECTS
    family = GENERATIVE
    scales_scores = True
    trains_distributed = False  # each process would draw its own tasks; one process is what is measured
    defaults = ModelDefaults(input_size=64, batch_size=16, epochs=100)
    fp32_scopes = ("/scale/", "/gap/")

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.cfg: MetaformerSettings = config.settings_for(self.name)
        self.hw = config.input.hw
        self.size = check_power_of_two(self.hw, self.name)
        if self.size >> self.cfg.levels < 1:
            raise UserError(f"metaformer.levels {self.cfg.levels}: too many for input {self.size} px")
        self.channels = 1 if config.input.channels == "gray" else 3
        torch.manual_seed(int(config.seed))
        self.frame_input = FrameInput(self.channels)
        self.net = MetaformerNet(self.size, self.channels, self.cfg.width, self.cfg.levels, self.cfg.latent)
        self.gap = AttentionGap(self.cfg.attention_floor, self.cfg.map_sigma, self.hw)
        self.scale = ScoreScale()
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=self.cfg.meta_lr)
        self.sampler: Optional[TaskSampler] = None
        self.meta_epochs = 0
        self.phase = "adapt"
        self.source = "none"

    # -- fitting -------------------------------------------------------------------------------------------
    def fit(self, data: TrainingData, log: Log = lambda _m: None, run: Optional[RunOptions] = None) -> dict[str, Any]:
        """Build the meta-training categories, then train through the shared loop."""
        self.require_training_images(data)
        epochs = int(self.config.epochs)
        self.meta_epochs = min(int(math.floor(epochs * self.cfg.meta_share)), epochs - 1)
        self.sampler = None
        if self.meta_epochs > 0:
            least = self.cfg.support + self.cfg.query
            if self.cfg.meta_source == "procedural":
                base = int(self.config.seed) * 1_000_003
                categories: list[ProceduralCategory | FolderCategory] = [
                    ProceduralCategory(base + c, self.hw) for c in range(self.cfg.meta_categories)]
                self.source = f"{len(categories)} procedural categories"
            else:
                station = data.fit_paths + data.holdout_paths
                frames = data.model_inputs(data.read(station))
                categories = list(folder_categories(Path(self.cfg.meta_source).expanduser(), self.hw, station,
                                                    frames, least, log, data.resize))
                self.source = f"{len(categories)} categories of {self.cfg.meta_source}"
            self.sampler = TaskSampler(categories, self.cfg.support, self.cfg.query)
        else:
            self.source = "none"
        log(f"metaformer: {self.meta_epochs} meta-training epochs ({self.source}; {self.cfg.tasks} tasks of "
            f"{self.cfg.support} + {self.cfg.query} images a step, {self.cfg.inner_steps} inner step(s), "
            f"{'first' if self.cfg.first_order else 'second'}-order), then {epochs - self.meta_epochs} adapting to "
            "the station's images")
        try:
            facts = super().fit(data, log, run)
        finally:
            self.sampler = None
        facts["kept_phase"] = "meta" if int(facts["selected_epoch"]) <= self.meta_epochs else "adapt"
        return facts

    def networks(self) -> dict[str, nn.Module]:
        return {"net": self.net}

    def updates(self) -> list[Update]:
        return [Update("net", self.optimizer, self._loss, lr_factor=self._phase_factor)]

    def _phase_factor(self, epoch: int, _epochs: int) -> float:
        """The epoch's phase (meta-training, then adaptation) and its learning-rate factor on ``meta_lr``; the
        first adaptation epoch starts a fresh Adam state (the meta-test fine-tunes from theta alone)."""
        if epoch <= self.meta_epochs:
            self.phase = "meta"
            return 1.0
        self.phase = "adapt"
        if epoch == self.meta_epochs + 1 and self.meta_epochs > 0:
            self.optimizer.state.clear()
        return self.cfg.lr / self.cfg.meta_lr

    def prepare(self, frames: torch.Tensor) -> torch.Tensor:
        """[B, C + 1, H, W]: the frames in [-1, 1] and their instance prior (the spectral residual) as the last
        channel."""
        prior = torch.from_numpy(instance_prior(frames.cpu().numpy())).to(frames.device)
        return torch.cat([self.frame_input.to(frames.device)(frames), prior], 1)

    def _split(self, xp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return xp[:, :self.channels], xp[:, self.channels:]

    def task_loss(self, params: Params, xp: torch.Tensor) -> torch.Tensor:
        """The loss of the network with ``params`` on prepared images ``xp`` (the inner and the outer loss)."""
        x, prior = self._split(xp)
        reconstruction, logits = functional_call(self.net, params, (x,))
        return reconstruction_loss(x, prior, reconstruction, logits, self.cfg.attention_floor,
                                   self.cfg.w_attention)[0]

    def meta_loss(self, tasks: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """MAML's meta-objective: per task (support, query), the query loss of the parameters adapted to the
        support from theta, averaged over the tasks (its gradient reaches theta through the inner steps)."""
        theta: Params = dict(self.net.named_parameters())
        losses = []
        for support, query in tasks:
            def support_loss(params: Params, images: torch.Tensor = support) -> torch.Tensor:
                return self.task_loss(params, images)

            fast = inner_adapt(support_loss, theta, self.cfg.inner_lr, self.cfg.inner_steps, self.cfg.first_order)
            losses.append(self.task_loss(fast, query))
        return torch.stack(losses).mean()

    def _loss(self, x: torch.Tensor, _shared: dict[str, Any]) -> LossParts:
        if self.phase == "meta":
            assert self.sampler is not None
            rng = np.random.default_rng(int(torch.randint(2**62, ())))  # the loop's per-epoch seeded torch RNG
            tasks = []
            for _ in range(self.cfg.tasks):
                support, query, _c = self.sampler.sample(rng)
                tasks.append((self.prepare(torch.from_numpy(support).to(x.device)),
                              self.prepare(torch.from_numpy(query).to(x.device))))
            loss = self.meta_loss(tasks)
            return loss, {"meta": loss}
        x_in, prior = self._split(x)
        reconstruction, logits = self.net(x_in)
        loss, rec, bce = reconstruction_loss(x_in, prior, reconstruction, logits, self.cfg.attention_floor,
                                             self.cfg.w_attention)
        return loss, {"loss": loss, "rec": rec, "attention": bce}

    def _scores(self, xp: torch.Tensor) -> torch.Tensor:
        x, _ = self._split(xp)
        reconstruction, logits = self.net(x)
        return self.gap(x, reconstruction, torch.sigmoid(logits))[0]  # type: ignore[no-any-return]

    def validation_loss(self, x: torch.Tensor) -> torch.Tensor:
        """The attention-weighted reconstruction error of the held-out normals."""
        return self._scores(x)

    def raw_score(self, x: torch.Tensor) -> torch.Tensor:
        return self._scores(x)

    def fit_facts(self) -> dict[str, Any]:
        return {"channels": self.channels, "meta_epochs": self.meta_epochs, "meta_source": self.source,
                "first_order": self.cfg.first_order, "parameters": sum(p.numel() for p in self.net.parameters())}

    # -- export --------------------------------------------------------------------------------------------
    def set_score_range(self, low: float, high: float) -> None:
        self.scale.set(low, high)

    def map_shape(self) -> tuple[int, int]:
        return self.hw

    def export_checks(self, max_batch: int, max_elements: int) -> dict[str, Any]:
        return {"max_batch": max_batch, "levels": self.cfg.levels, "latent": self.cfg.latent}

    def export_module(self) -> nn.Module:
        for module in (self.frame_input, self.net, self.gap, self.scale):
            module.cpu().eval()
        return MetaformerExport(self.frame_input, self.net, self.gap, self.scale).eval()


__all__ = ["Metaformer", "MetaformerSettings", "TaskSampler", "inner_adapt", "spectral_residual", "weighted_gap"]
