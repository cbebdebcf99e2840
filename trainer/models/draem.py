"""DRAEM (Zavrtanik, Kristan, Skocaj, "DRAEM - A discriminatively trained reconstruction embedding for surface
anomaly detection", ICCV 2021), after the official code (github.com/VitjanZ/DRAEM: ``model_unet.py``'s
ReconstructiveSubNetwork and DiscriminativeSubNetwork, ``loss.py``'s FocalLoss and SSIM, ``data_loader.py``'s
augment_image, ``perlin.py``'s rand_perlin_2d_np, ``test_DRAEM.py``'s score), with the optional SSPCAB block
(Ristea et al., "Self-Supervised Predictive Convolutional Attentive Blocks for Anomaly Detection", CVPR 2022;
github.com/ristea/sspcab ``sspcab_torch.py``).

Two networks trained from scratch together (one Adam over both, as the official code):
- the reconstructive sub-network, an encoder-decoder without skips (4 max-pools, base width ``rec_width``),
  restores an image carrying a synthetic anomaly to its normal look: loss L2 + (1 - SSIM) against the clean
  image (SSIM window 11, Gaussian sigma 1.5, zero padding, C1 = 0.01^2, C2 = 0.03^2);
- the discriminative sub-network, a U-Net (5 max-pools, base width ``disc_width``), takes the image
  concatenated with its reconstruction (reconstruction first, as there) and segments the anomaly: 2-class
  softmax, the official focal loss (gamma 2, no alpha, the target one-hot clamped to [1e-5, 1 - 1e-5] and
  1e-5 added to p_t before the log).
The anomaly map is the softmax's anomaly channel at full resolution; the image score is the maximum of that map
after a ``score_window`` x ``score_window`` mean filter (the official 21 x 21 at 256 px, zero padding counted;
``score_window: 0`` scales 21 with the input's shorter side to the nearest odd size: 5 at 64 px, 7 at 96 px,
13 at 160 px). Both run inside the exported graph; the graph scales the uint8 frame to [0, 1] and keeps the
BGR channel order, as the official code does (cv2.imread's BGR, divided by 255, never converted to RGB).

The synthetic anomaly (official augment_image; OpenCV/numpy in place of imgaug, which is not installed here):
a Perlin noise of 2^a x 2^b cells (a, b uniform in 0..5), rotated by U(-90, 90) degrees (zeros outside, as the
official imgaug Affine), thresholded at 0.5 gives the mask M; a texture image augmented by 3 of the official 10
operations (gamma contrast 0.5-2 per channel, brightness x0.8-1.2 + -30..30 on luma, PIL sharpness 0-2, hue
and saturation +-50, solarize with p 0.5 above 32-128, posterize to 1-8 bits, invert, autocontrast with a 0-20 %
cut-off, equalize, rotate +-45 degrees) fills it with opacity beta:
img_aug = (1 - M) img + (1 - beta) T M + beta img M. Half the images (``anomaly_share``) get one, the others stay
normal (mask 0); as officially, 30 % of the training images are first rotated by U(-90, 90) degrees
(``rotate_share``).

Where the anomalies' textures come from (``textures``): the official source is the DTD texture set, which cannot
be downloaded here, so it is a setting:
- a folder path: every image under it (recursively), as the official ``anomaly_source_path`` (DTD or any other);
- ``self`` (default): another image of the training batch (the image itself in a batch of one), rolled by a
  random offset so its structures land elsewhere, then augmented as a DTD texture would be;
- ``procedural``: textures made in numpy at the input size, at random one of: fractal Perlin noise between two
  random colours, stripes (random period, angle, colours, sine or square profile), checks (random cell,
  rotation), colour blobs (random ellipses, blurred), each with fine noise.
``self`` is the default because it measured better and steadier on the washers (below): the same 1 000-step fit
of the test's washers gave image AUROC 0.980 / pixel 0.948 with ``self`` against 0.965 / 0.920 procedural, and
on a second draw of washers (seed 3), scored every 20 epochs, ``self`` climbed to 0.99 by epoch 80 and stayed
above 0.89 from epoch 60 on, while ``procedural`` swung between 0.47 and 0.94 from epoch 40 on; over 3 seeds of
50 epochs 0.884 +- 0.009 against 0.817 +- 0.142. Its anomalies are the part's own grey metal,
edges and holes out of place: closer to scratches, cracks and missing chunks than a zebra stripe is.

SSPCAB (``sspcab: true``): as anomalib's DRAEM + SSPCAB does (the official sspcab repository ships the block and
its loss, not the DRAEM integration), the reconstructive
encoder's last block (two 3x3 conv + BN + ReLU at 8 x rec_width channels) is replaced by the block: a masked
convolution whose receptive field is four k x k sub-kernels at the corners around a masked centre at dilation d
(the official kernel_dim 1, dilation 1: a 5 x 5 window of which only the four corners are seen), ReLU, then
squeeze-and-excitation channel attention (reduction 8). Its own loss, the mean squared error between the block's
input and output, is added to DRAEM's with weight ``sspcab_lambda`` (0.1). Here the four sub-kernels are one
(2k + 2d + 1)^2 convolution whose weights outside the corners are held at zero by a fixed mask, with padding
k + d: the same function (the four official biases sum into one), one Conv node and no Pad in the graph.

What differs from the paper and its code, and why:
- widths: the official 128 (reconstructive) and 64 (discriminative) make 97.7 M parameters; a training step of 8
  images at 160 px takes 0.74 s of one CPU core at the defaults 16 and 8 (1.5 M parameters) and 1.67 s at 32
  and 16 (6.1 M); the paper's, 64 x the defaults' work, about 50 s (not run). ``rec_width: 128, disc_width: 64``
  gives the paper's networks. On the test's washers (64 px, 80 epochs) 32 and 16 gave image AUROC 0.948, pixel
  0.933, against 0.963, 0.948 at 16 and 8, for twice the work: no gain at this budget; the paper's widths
  are not measured.
- the recipe (official: 256 px, batch 8, Adam lr 1e-4, 700 epochs, the lr x 0.2 at 80 % and 90 % of them, the
  last epoch kept) is reduced for CPU: 160 px, 100 epochs, lr 1e-3 (same batch and schedule). At lr 1e-4 the
  washers' 40-epoch fit (200 steps) stayed below chance (image AUROC 0.40, procedural textures) where 1e-3 gave
  0.85. At 1e-3 and no decay the AUROC swings from epoch to epoch (0.47-0.94 procedural, 0.82-0.995 self, scored
  every 20 epochs of a 200-epoch run on a second draw of washers): the decay at 80 and 90 % settles it, and
  the epoch kept is the loop's (lowest validation loss: the same DRAEM loss on the held-out normals, each with
  a fixed synthetic anomaly drawn from the image's bytes), which followed the swings (higher where AUROC fell).
  The input must be a multiple of 32 (the U-Net pools 5 times); 160 px is not measured for accuracy.
- beta: the paper's U(0.1, 1.0) (``opacity``); the official code draws U(0, 0.8).
- SSIM's dynamic range is the images' 1 (the official code guesses it from the reconstruction's own range,
  which is 1 too once it is in [0, 1]).
- a grey frame (B = G = R) gets a grey texture (the mean of its channels): a grey camera never sees colour, so
  the network could otherwise learn colour alone.
- SSPCAB is off by default: on the washers it cost 0.05 image AUROC on each of 3 seeds (below), and off is the
  paper's DRAEM.

Measured (2026-12-07, the 2-core VM at load average 4-9, one thread; scored through the exported ONNX graph):
- the test's washers (64 px, 50 washers: 40 fitted + 10 held out; 20 + 20 test parts; widths 16 and 8, self
  textures, lr 1e-3, batch 8): 50 epochs (250 steps): image AUROC 0.902, pixel 0.888, fit 60 s
  (46 s of CPU); 70 epochs: 0.915, pixel 0.920; 80 epochs (400 steps, the test's recipe): 0.963, pixel 0.948,
  fit 59 s, the test file 64 s of CPU and 67 s of wall time at load average 1-2 (113 s at 8); 100 epochs:
  0.982, pixel 0.947; 200 epochs: 0.980, pixel 0.948 (procedural textures: 0.965, 0.920).
- over 3 seeds with the test's recipe (benchmarks/accuracy_synthetic.py --model draem --seeds 3 --size 64 --train
  50 --set input.height=64 --set input.width=64 --set epochs=80 --set batch_size=8 --set draem.rec_width=16 --set
  draem.disc_width=8; 40 good + 80 defective test parts): image AUROC 0.972 +- 0.016 (0.974, 0.987, 0.956),
  pixel 0.976 +- 0.014; by kind: missing 0.99, spot 0.98, crack 0.98, scratch 0.94; F1 at the threshold from
  good parts 0.75. With ``sspcab: true`` (the same command plus --set draem.sspcab=true): 0.921 +- 0.004 (0.917,
  0.922, 0.924), pixel 0.944 +- 0.021 (missing 0.86, crack 0.92): SSPCAB costs 0.05 on every seed here. With 50
  epochs (--set epochs=50): 0.884 +- 0.009 (0.878, 0.881, 0.894), pixel 0.946 +- 0.028; SSPCAB on 0.842 +- 0.083
  (0.833, 0.764, 0.929), pixel 0.907; ``textures: procedural`` 0.817 +- 0.142 (0.773, 0.702, 0.975), pixel
  0.686 +- 0.197 (spots 1.00: coloured textures look like stains; missing 0.65, crack 0.77): worse and far
  less steady than ``self``. So SSPCAB stays off: the SSPCAB paper reports its DRAEM gain on MVTec at the full
  recipe (700 epochs, the paper's widths), which this CPU cannot run.
- ELPV mono solar cells (2026-12-07, idle VM, 2 threads; benchmarks/protocol.py --dataset elpv --cell mono
  --models draem --seeds 1 --threads 2 --size 128 --epochs 40, then --first-seed 1 --seeds 2; 128 px and 40
  epochs for CPU time, 400 s a fit): image AUROC 87.0, 79.5 and **29.6** (seeds 0, 1, 2): 65.4 +- 31.2, against
  PatchCore's 94.2 +- 0.2. On seed 2 the real defects (dark cracks and inactive regions of
  electroluminescence images) score below the functional cells: what the network learnt to segment (pasted
  texture with the image's own statistics) is not what these defects look like, and nothing in the training says
  so (no labelled defects; the epoch is chosen by the held-out normals' loss). Poly cells (--cell poly, the same
  settings, seeds 0-2): 44.3, 44.9, 62.1, 50.4 +- 10.1 (chance), against PatchCore's 80.2 +- 0.6. Unstable on
  these cells; not a model for them at this recipe.
- not measured: the paper's widths.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, List, Optional

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.errors import UserError
from trainer.loop import EpochModel, Log, LossParts, Update
from trainer.models import (
    SURFACE_DEFECTS,
    SYNTHETIC_ANOMALIES,
    ModelDefaults,
    ModelSettings,
    RunOptions,
    register_model,
    setting,
)

if TYPE_CHECKING:
    from trainer.frames import TrainingData

PAPER_SIZE = 256  # the official input size, which the 21 x 21 score window is written for
PAPER_SCORE_WINDOW = 21
FOCAL_SMOOTH = 1e-5  # the official FocalLoss's smooth
TEXTURE_SOURCES = ("procedural", "self")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
DOWN = 32  # the discriminative U-Net pools 5 times: input sides must be multiples of 32


@dataclass
class DraemSettings(ModelSettings):
    """DRAEM (Zavrtanik et al. 2021): a reconstructive and a discriminative network trained together on synthetic
    anomalies (Perlin-noise masks filled with textures); the discriminative network's map is the output."""

    rec_width: int = setting(16, "base width of the reconstructive encoder-decoder (the paper's 128: 69 M "
                             "parameters against 1.1 M)")
    disc_width: int = setting(8, "base width of the discriminative U-Net (the paper's 64: 28 M parameters against "
                              "0.45 M)")
    textures: str = setting("self", "what fills the synthetic anomalies: self (other training images, rolled), "
                            "procedural (stripes, checks, Perlin noise, colour blobs made in numpy), or a folder "
                            "of texture images (the paper's DTD, or any)")
    anomaly_share: float = setting(0.5, "chance that a training image gets a synthetic anomaly (the official 0.5)")
    opacity: List[float] = setting([0.1, 1.0], "range of beta, the share of the normal image kept inside the "
                                   "anomaly (the paper's [0.1, 1.0]; the official code's [0, 0.8])")
    rotate_share: float = setting(0.3, "chance that a training image is first rotated by up to 90 degrees (the "
                                  "official 0.3)")
    lr: float = setting(0.001, "Adam learning rate, both networks (the official 1e-4 for 700 epochs; at 1e-4 the "
                        "washers' 200-step fit stayed at chance: image AUROC 0.40 against 0.85 at 1e-3)")
    lr_drops: List[float] = setting([0.8, 0.9], "learning rate x 0.2 after these fractions of the epochs (the "
                                    "official [0.8, 0.9])")
    score_window: int = setting(0, "side of the mean filter on the map before its maximum is the score, px (odd); "
                                "0 = the official 21 at 256 px scaled to the input")
    sspcab: bool = setting(False, "replace the reconstructive encoder's last block by SSPCAB (Ristea et al. 2022) "
                           "and add its own reconstruction loss")
    sspcab_lambda: float = setting(0.1, "weight of SSPCAB's loss (the official DRAEM + SSPCAB 0.1)")
    sspcab_kernel: int = setting(1, "SSPCAB's sub-kernel side k (the official 1)")
    sspcab_dilation: int = setting(1, "SSPCAB's dilation d, the masked centre's distance to the sub-kernels (the "
                                   "official 1)")

    def validate(self) -> None:
        if self.rec_width < 1 or self.disc_width < 1:
            raise ValueError("draem.rec_width and disc_width must be >= 1")
        if not self.textures:
            raise ValueError("draem.textures must be procedural, self or a folder of texture images")
        if not 0 <= self.anomaly_share <= 1 or not 0 <= self.rotate_share <= 1:
            raise ValueError("draem.anomaly_share and rotate_share must be in [0, 1]")
        if len(self.opacity) != 2 or not 0 <= self.opacity[0] <= self.opacity[1] <= 1:
            raise ValueError("draem.opacity must be [low, high] with 0 <= low <= high <= 1")
        if self.lr <= 0 or any(not 0 < f <= 1 for f in self.lr_drops):
            raise ValueError("draem.lr must be > 0 and lr_drops fractions in (0, 1]")
        if self.score_window < 0 or (self.score_window and self.score_window % 2 == 0):
            raise ValueError("draem.score_window must be odd, or 0 for the official 21 scaled to the input")
        if self.sspcab_lambda < 0 or self.sspcab_kernel < 1 or self.sspcab_dilation < 1:
            raise ValueError("draem.sspcab_lambda must be >= 0, sspcab_kernel and sspcab_dilation >= 1")


# -- the anomaly source ---------------------------------------------------------------------------------------
def rand_perlin_2d(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """The official rand_perlin_2d_np: gradient noise with res[0] x res[1] cells, values about in [-1, 1]; each
    side of ``shape`` a multiple of its ``res``."""
    delta = (res[0] / shape[0], res[1] / shape[1])
    d = (shape[0] // res[0], shape[1] // res[1])
    grid = np.mgrid[0:res[0]:delta[0], 0:res[1]:delta[1]].transpose(1, 2, 0)[:shape[0], :shape[1]] % 1
    angles = 2 * math.pi * rng.random((res[0] + 1, res[1] + 1))
    gradients = np.stack((np.cos(angles), np.sin(angles)), axis=-1)

    def corner(dy: int, dx: int) -> np.ndarray:
        g = gradients[dy:dy + res[0], dx:dx + res[1]].repeat(d[0], 0).repeat(d[1], 1)
        return ((grid[..., 0] - dy) * g[..., 0] + (grid[..., 1] - dx) * g[..., 1])  # type: ignore[no-any-return]

    t = 6 * grid ** 5 - 15 * grid ** 4 + 10 * grid ** 3
    n0 = corner(0, 0) + t[..., 0] * (corner(1, 0) - corner(0, 0))
    n1 = corner(0, 1) + t[..., 0] * (corner(1, 1) - corner(0, 1))
    return math.sqrt(2) * (n0 + t[..., 1] * (n1 - n0))  # type: ignore[no-any-return]


def perlin_noise(hw: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Perlin noise of any size: drawn on the next multiple of ``res`` and cropped (the official sizes divide)."""
    padded = (-(-hw[0] // res[0]) * res[0], -(-hw[1] // res[1]) * res[1])
    return rand_perlin_2d(padded, res, rng)[:hw[0], :hw[1]]


def rotate(image: np.ndarray, degrees: float, linear: bool = True) -> np.ndarray:
    """Rotation about the centre keeping the size, zeros outside (imgaug's Affine(rotate) defaults)."""
    h, w = image.shape[:2]
    matrix = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), degrees, 1.0)
    flags = cv2.INTER_LINEAR if linear else cv2.INTER_NEAREST
    out = cv2.warpAffine(image, matrix, (w, h), flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return np.asarray(out).reshape(image.shape)


def perlin_mask(hw: tuple[int, int], rng: np.random.Generator, threshold: float = 0.5) -> np.ndarray:
    """The official anomaly mask: Perlin noise of 2^a x 2^b cells (a, b in 0..5), rotated by U(-90, 90) degrees,
    thresholded: float32 [H,W] of 0 and 1."""
    res = (2 ** int(rng.integers(0, 6)), 2 ** int(rng.integers(0, 6)))
    noise = rotate(perlin_noise(hw, res, rng).astype(np.float32), float(rng.uniform(-90, 90)))
    return (noise > threshold).astype(np.float32)


def blend_anomaly(image: np.ndarray, texture: np.ndarray, mask: np.ndarray, beta: float) -> np.ndarray:
    """The paper's eq. 1: (1 - M) img + (1 - beta) T M + beta img M, all float in [0, 1], M [H,W] or [H,W,1]."""
    m = mask[..., None] if mask.ndim == 2 else mask
    return ((1 - m) * image + (1 - beta) * texture * m + beta * image * m).astype(np.float32)


def _lut(image: np.ndarray, table: np.ndarray) -> np.ndarray:
    return np.asarray(table, np.uint8)[image]


def _gamma(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    gammas = rng.uniform(0.5, 2.0, 3)  # per channel
    return np.stack([_lut(image[..., c], 255 * (np.arange(256) / 255) ** g + 0.5) for c, g in enumerate(gammas)],
                    -1)


def _brightness(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    ycc = cv2.cvtColor(image, cv2.COLOR_BGR2YCrCb).astype(np.float32)
    ycc[..., 0] = ycc[..., 0] * rng.uniform(0.8, 1.2) + rng.uniform(-30, 30)
    return np.asarray(cv2.cvtColor(np.clip(ycc, 0, 255).round().astype(np.uint8), cv2.COLOR_YCrCb2BGR))


def _sharpness(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """PIL's ImageEnhance.Sharpness: blend with PIL's SMOOTH filter by a factor in [0, 2] (borders kept)."""
    kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13
    smooth = np.asarray(cv2.filter2D(image.astype(np.float32), -1, kernel))
    smooth[0], smooth[-1], smooth[:, 0], smooth[:, -1] = image[0], image[-1], image[:, 0], image[:, -1]
    factor = rng.uniform(0.0, 2.0)
    return np.clip(smooth + factor * (image - smooth), 0, 255).round().astype(np.uint8)  # type: ignore[no-any-return]


def _hue_saturation(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV).astype(np.int32)
    hue, sat = rng.integers(-50, 51, 2)  # per channel: one value for hue, another for saturation
    hsv[..., 0] = (hsv[..., 0] + int(round(hue * 180 / 255))) % 180  # imgaug's hue units are 255 to a turn
    hsv[..., 1] = np.clip(hsv[..., 1] + sat, 0, 255)
    return np.asarray(cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2BGR))


def _solarize(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if rng.random() >= 0.5:
        return image
    threshold = rng.integers(32, 129)
    return np.where(image >= threshold, 255 - image, image).astype(np.uint8)


def _posterize(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    bits = int(rng.integers(1, 9))
    return (image & np.uint8((0xFF << (8 - bits)) & 0xFF)).astype(np.uint8)


def _invert(image: np.ndarray, _rng: np.random.Generator) -> np.ndarray:
    return (255 - image).astype(np.uint8)


def _autocontrast(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """PIL's autocontrast per channel: cut ``cutoff`` % of each end of the histogram, stretch the rest to 0-255."""
    cutoff = rng.uniform(0, 20)
    out = np.empty_like(image)
    for c in range(image.shape[2]):
        lo, hi = np.percentile(image[..., c], [cutoff, 100 - cutoff])
        if hi <= lo:
            out[..., c] = image[..., c]
            continue
        out[..., c] = np.clip((image[..., c].astype(np.float32) - lo) * 255 / (hi - lo), 0, 255).round()
    return out


def _equalize(image: np.ndarray, _rng: np.random.Generator) -> np.ndarray:
    return np.stack([np.asarray(cv2.equalizeHist(np.ascontiguousarray(image[..., c])))
                     for c in range(image.shape[2])], -1)


def _rotate45(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return rotate(image, float(rng.uniform(-45, 45)))


# The official 10 texture augmentations (imgaug in data_loader.py), in its order.
TEXTURE_AUGMENTATIONS: tuple[Callable[[np.ndarray, np.random.Generator], np.ndarray], ...] = (
    _gamma, _brightness, _sharpness, _hue_saturation, _solarize, _posterize, _invert, _autocontrast, _equalize,
    _rotate45)


def augment_texture(texture: np.ndarray, rng: np.random.Generator, n: int = 3) -> np.ndarray:
    """``n`` of the official augmentations, chosen without replacement, in a random order (uint8 BGR)."""
    out = np.ascontiguousarray(texture)
    for i in rng.choice(len(TEXTURE_AUGMENTATIONS), n, replace=False):
        out = np.ascontiguousarray(TEXTURE_AUGMENTATIONS[int(i)](out, rng))
    return out


def procedural_texture(hw: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A texture made in numpy (uint8 BGR [H,W,3]): fractal Perlin noise between two colours, stripes, checks or
    colour blobs, with fine noise: a stand-in for DTD's describable textures where DTD cannot be had."""
    h, w = hw
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    kind = int(rng.integers(4))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == 0:  # fractal Perlin noise, 1-4 octaves
        base = 2 ** int(rng.integers(0, 4))
        t = np.zeros(hw, np.float32)
        for octave in range(int(rng.integers(1, 5))):
            f = base * 2 ** octave
            if f > min(h, w) // 2:
                break
            t += 0.5 ** octave * perlin_noise(hw, (f, f), rng).astype(np.float32)
        t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    elif kind == 1:  # stripes
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(3, max(4.0, min(h, w) / 3))
        phase = (xx * math.cos(angle) + yy * math.sin(angle)) / period * 2 * math.pi
        t = 0.5 + 0.5 * np.sin(phase)
        if rng.random() < 0.5:
            t = (t > 0.5).astype(np.float32)
    elif kind == 2:  # checks
        angle = rng.uniform(0, math.pi)
        cell = rng.uniform(3, max(4.0, min(h, w) / 4))
        u = (xx * math.cos(angle) + yy * math.sin(angle)) / cell
        v = (-xx * math.sin(angle) + yy * math.cos(angle)) / cell
        t = ((np.floor(u) + np.floor(v)) % 2).astype(np.float32)
    else:  # colour blobs
        out = np.empty((h, w, 3), np.float32)
        out[:] = c0
        for _ in range(int(rng.integers(5, 30))):
            centre = (int(rng.integers(w)), int(rng.integers(h)))
            axes = (int(rng.integers(1, max(2, w // 4))), int(rng.integers(1, max(2, h // 4))))
            cv2.ellipse(out, centre, axes, float(rng.uniform(0, 180)), 0, 360, rng.uniform(0, 255, 3).tolist(), -1)
        out = np.asarray(cv2.GaussianBlur(out, (0, 0), float(rng.uniform(0.5, 2.0))))
        out += rng.normal(0, rng.uniform(0, 12), out.shape).astype(np.float32)
        return np.clip(out, 0, 255).round().astype(np.uint8)  # type: ignore[no-any-return]
    out = c0 * (1 - t[..., None]) + c1 * t[..., None]
    out += rng.normal(0, rng.uniform(0, 12), out.shape)
    return np.clip(out, 0, 255).round().astype(np.uint8)  # type: ignore[no-any-return]


def texture_files(folder: Path) -> list[Path]:
    """The images under ``folder`` (recursively, sorted): the official anomaly source is DTD's */*.jpg."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def synthesize(image: np.ndarray, texture: np.ndarray, rng: np.random.Generator, anomaly_share: float,
               opacity: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """The official augment_image on one image (float32 [H,W,3] in [0, 1]) with an augmented texture (uint8):
    (the image with a Perlin-masked texture anomaly or as it was, the float32 mask [H,W])."""
    hw = (image.shape[0], image.shape[1])
    mask = perlin_mask(hw, rng)
    beta = float(rng.uniform(*opacity))
    if rng.random() >= anomaly_share or not mask.any():
        return image, np.zeros(hw, np.float32)
    if (image == image[..., :1]).all():  # a grey camera's frame: a grey texture (no colour to learn from)
        texture = np.repeat(texture.mean(-1, keepdims=True), 3, -1)
    return blend_anomaly(image, texture.astype(np.float32) / 255, mask, beta), mask


# -- the losses -----------------------------------------------------------------------------------------------
def focal_loss(probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """The official FocalLoss on softmax probabilities [N,C,H,W] and a class map [N,1,H,W] or [N,H,W]: per pixel
    -(1 - p_t)^gamma log(p_t) with p_t = sum(clamp(one-hot, 1e-5, 1 - 1e-5) * p) + 1e-5; per image the mean."""
    n, c = probs.shape[:2]
    one_hot = F.one_hot(target.reshape(n, -1).long(), c).permute(0, 2, 1).to(probs.dtype)  # [N, C, P]
    one_hot = one_hot.clamp(FOCAL_SMOOTH / (c - 1), 1.0 - FOCAL_SMOOTH)
    pt = (one_hot * probs.reshape(n, c, -1)).sum(1) + FOCAL_SMOOTH
    return (-(1 - pt).pow(gamma) * pt.log()).mean(1)


def _ssim_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - size // 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] @ g[None, :]).view(1, 1, size, size)


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, value_range: float = 1.0) -> torch.Tensor:
    """Per image the mean SSIM of [N,C,H,W] images (the official loss.py: Gaussian window 11, sigma 1.5, per
    channel, zero padding, C1 = (0.01 L)^2, C2 = (0.03 L)^2)."""
    c = a.shape[1]
    w = _ssim_window(window).to(a).expand(c, 1, window, window)
    pad = window // 2

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, w, padding=pad, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * value_range) ** 2, (0.03 * value_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)


# -- the networks ---------------------------------------------------------------------------------------------
def _double_conv(c_in: int, c_mid: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_mid, 3, padding=1), nn.BatchNorm2d(c_mid), nn.ReLU(inplace=True),
                         nn.Conv2d(c_mid, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class Upsample2(nn.Module):
    """The official nn.Upsample(scale_factor=2, bilinear, align_corners=True), with the output size a constant of
    the exported graph (a scale factor leaves the sizes unknown to ONNX shape inference past FP16 casts)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = (int(x.shape[-2]) * 2, int(x.shape[-1]) * 2)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def _up(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(Upsample2(), nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class MaskedConv(nn.Conv2d):
    """SSPCAB's masked convolution: four k x k sub-kernels at the corners of a (2k + 2d + 1)^2 window, the
    (2d + 1)^2 square around the centre and the bands between the corners held at zero: the output at a position
    never depends on the input there (the official four convolutions on shifted crops, as one)."""

    mask: torch.Tensor

    def __init__(self, channels: int, k: int, d: int) -> None:
        size = 2 * k + 2 * d + 1
        super().__init__(channels, channels, size, padding=k + d)
        mask = torch.zeros(1, 1, size, size)
        for rows in (slice(0, k), slice(size - k, size)):
            for cols in (slice(0, k), slice(size - k, size)):
                mask[..., rows, cols] = 1
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


class SqueezeExcitation(nn.Module):
    """The official SELayer: channel weights sigmoid(fc2(relu(fc1(mean over positions)))), reduction ``r``."""

    def __init__(self, channels: int, r: int = 8) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, max(1, channels // r))
        self.fc2 = nn.Linear(max(1, channels // r), channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3))))))
        return x * weights[:, :, None, None]


class Sspcab(nn.Module):
    """SSPCAB (official sspcab_torch.py): masked convolution, ReLU, squeeze-and-excitation."""

    def __init__(self, channels: int, k: int = 1, d: int = 1, r: int = 8) -> None:
        super().__init__()
        self.masked = MaskedConv(channels, k, d)
        self.se = SqueezeExcitation(channels, r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.se(torch.relu(self.masked(x)))  # type: ignore[no-any-return]


class Reconstructive(nn.Module):
    """The official ReconstructiveSubNetwork: an encoder of 5 double-conv blocks (4 max-pools; widths w, 2w, 4w,
    8w, 8w) and a decoder of 4 upsample + conv and double-conv stages back to 3 channels, no skips. With SSPCAB
    the encoder's last block is the SSPCAB block (anomalib's DRAEM + SSPCAB)."""

    def __init__(self, w: int, sspcab: Optional[tuple[int, int]] = None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_double_conv(3, w, w), _double_conv(w, 2 * w, 2 * w),
                                     _double_conv(2 * w, 4 * w, 4 * w), _double_conv(4 * w, 8 * w, 8 * w)])
        self.block5: nn.Module = Sspcab(8 * w, *sspcab) if sspcab else _double_conv(8 * w, 8 * w, 8 * w)
        self.decoder = nn.Sequential(
            _up(8 * w, 8 * w), _double_conv(8 * w, 8 * w, 4 * w), _up(4 * w, 4 * w), _double_conv(4 * w, 4 * w, 2 * w),
            _up(2 * w, 2 * w), _double_conv(2 * w, 2 * w, w), _up(w, w), _double_conv(w, w, w),
            nn.Conv2d(w, 3, 3, padding=1))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the last block's input, its output): SSPCAB's loss compares the two."""
        for i, block in enumerate(self.blocks):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
        inner = F.max_pool2d(x, 2)
        return inner, self.block5(inner)

    def forward(self, x: torch.Tensor, with_block5: bool = False) -> Any:
        """The reconstruction; with ``with_block5`` also the last block's input and output (the training loss
        asks through forward, so a DistributedDataParallel wrapper routes it)."""
        inner, outer = self.encode(x)
        rec = self.decoder(outer)
        return (rec, inner, outer) if with_block5 else rec


class Discriminative(nn.Module):
    """The official DiscriminativeSubNetwork: a U-Net of 6 double-conv blocks (5 max-pools; w, 2w, 4w, 8w, 8w, 8w)
    and 5 upsample + conv stages each concatenated with the encoder block of its size, to ``out`` channels."""

    def __init__(self, c_in: int, w: int, out: int = 2) -> None:
        super().__init__()
        widths = [w, 2 * w, 4 * w, 8 * w, 8 * w, 8 * w]
        self.encoder = nn.ModuleList([_double_conv(c, c_out, c_out)
                                      for c, c_out in zip([c_in, *widths[:-1]], widths, strict=True)])
        # decoder stages from the bottom: (up from, up to, skip) = (8w, 8w, 8w), (8w, 4w, 8w), (4w, 2w, 4w), ...
        ups = [(8 * w, 8 * w, 8 * w), (8 * w, 4 * w, 8 * w), (4 * w, 2 * w, 4 * w), (2 * w, w, 2 * w), (w, w, w)]
        self.ups = nn.ModuleList([_up(a, b) for a, b, _ in ups])
        self.merges = nn.ModuleList([_double_conv(b + s, b, b) for _a, b, s in ups])
        self.out = nn.Conv2d(w, out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for up, merge, skip in zip(self.ups, self.merges, reversed(skips[:-1]), strict=True):
            x = merge(torch.cat([up(x), skip], 1))
        return self.out(x)  # type: ignore[no-any-return]


def init_weights(module: nn.Module) -> None:
    """The official weights_init: conv weights N(0, 0.02), batch-norm scales N(1, 0.02) and shifts 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def score_window(setting_value: int, hw: tuple[int, int]) -> int:
    """The mean filter's side: the setting, or the official 21 at 256 px scaled to the shorter side, odd."""
    if setting_value:
        return setting_value
    return max(1, 2 * int(PAPER_SCORE_WINDOW * min(hw) / PAPER_SIZE / 2) + 1)


class FrameScale(nn.Module):
    """uint8 BGR frames [N,H,W,3] -> float [N,3,H,W] in [0, 1], BGR kept (the official cv2 read, / 255)."""

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return frames.to(torch.float32).permute(0, 3, 1, 2) * (1.0 / 255.0)


class MapScore(nn.Module):
    """Discriminator logits [N,2,H,W] -> (score [N]: max of the mean-filtered anomaly channel, map [N,H,W])."""

    def __init__(self, window: int) -> None:
        super().__init__()
        self.window = window

    def forward(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        amap = torch.softmax(logits, 1)[:, 1:]
        pooled = F.avg_pool2d(amap, self.window, stride=1, padding=self.window // 2, count_include_pad=True)
        return pooled.amax((1, 2, 3)), amap[:, 0]


class DraemExport(nn.Module):
    """frames uint8 [N,H,W,3] BGR -> (score float32 [N], anomaly_map float32 [N,H,W]), all inside the graph."""

    def __init__(self, reconstructive: Reconstructive, discriminative: Discriminative, window: int) -> None:
        super().__init__()
        self.frame_scale = FrameScale()
        self.reconstructive = reconstructive
        self.discriminative = discriminative
        self.score = MapScore(window)

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.frame_scale(frames)
        rec = self.reconstructive(x)
        return self.score(self.discriminative(torch.cat([rec, x], 1)))  # type: ignore[no-any-return]


@register_model("draem", settings=DraemSettings)
class Draem(EpochModel):
    """DRAEM: a reconstructive network learns to remove synthetic anomalies, a discriminative one to find where
    the image and its reconstruction differ; its map is the output."""

    catches = SURFACE_DEFECTS
    family = SYNTHETIC_ANOMALIES
    display_name = "DRAEM"
    defaults = ModelDefaults(input_size=160, batch_size=8, epochs=100)
    # The score's 2-class softmax, mean filter and maximum stay FP32 in model.fp16.onnx (near-tied scores).
    fp32_scopes = ("/score/",)

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.cfg: DraemSettings = config.settings_for(self.name)
        self.hw: tuple[int, int] = tuple(config.input.hw)  # type: ignore[assignment]
        if self.hw[0] % DOWN or self.hw[1] % DOWN:
            raise UserError(f"{self.name}: input {self.hw[0]}x{self.hw[1]}: DRAEM's U-Net halves the image 5 times, "
                            f"so height and width must be multiples of {DOWN} (e.g. 64, 96, 160, 256)")
        self.texture_paths: list[Path] = []
        if self.cfg.textures not in TEXTURE_SOURCES:
            folder = Path(self.cfg.textures).expanduser()
            if not folder.is_dir():
                raise UserError(f"draem.textures: {folder} is no folder; use procedural, self or a folder of "
                                "texture images")
            self.texture_paths = texture_files(folder)
            if not self.texture_paths:
                raise UserError(f"draem.textures: {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        torch.manual_seed(int(config.seed))
        sspcab = (self.cfg.sspcab_kernel, self.cfg.sspcab_dilation) if self.cfg.sspcab else None
        self.reconstructive = Reconstructive(self.cfg.rec_width, sspcab)
        self.discriminative = Discriminative(6, self.cfg.disc_width)
        self.reconstructive.apply(init_weights)
        self.discriminative.apply(init_weights)
        self.frame_scale = FrameScale()
        self.window = score_window(self.cfg.score_window, self.hw)
        self.map_score = MapScore(self.window)
        self.optimizer = torch.optim.Adam([*self.reconstructive.parameters(), *self.discriminative.parameters()],
                                          lr=self.cfg.lr)

    # -- the synthetic anomalies ----------------------------------------------------------------------------
    def _texture(self, images: np.ndarray, i: int, rng: np.random.Generator) -> np.ndarray:
        """An augmented texture (uint8 BGR [H,W,3]) for image ``i`` of ``images`` (float [N,H,W,3] in [0, 1])."""
        if self.cfg.textures == "procedural":
            raw = procedural_texture(self.hw, rng)
        elif self.cfg.textures == "self":
            other = (i + int(rng.integers(1, len(images)))) % len(images) if len(images) > 1 else i
            shift = (int(rng.integers(self.hw[0])), int(rng.integers(self.hw[1])))
            raw = np.roll((images[other] * 255).round().astype(np.uint8), shift, (0, 1))
        else:
            path = self.texture_paths[int(rng.integers(len(self.texture_paths)))]
            read = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if read is None:
                raise UserError(f"draem.textures: {path} cannot be read as an image")
            raw = np.asarray(cv2.resize(read, (self.hw[1], self.hw[0]), interpolation=cv2.INTER_AREA))
        return augment_texture(raw, rng)

    def anomalies(self, x: torch.Tensor, rng: np.random.Generator, rotate_share: float = 0.0
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(the clean images, with anomalies, the masks [N,1,H,W]) for the images ``x`` [N,3,H,W] in [0, 1]."""
        images = x.permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)
        if rotate_share > 0:
            images = np.stack([rotate(im, float(rng.uniform(-90, 90))) if rng.random() < rotate_share else im
                               for im in images])
        pairs = [synthesize(im, self._texture(images, i, rng), rng, self.cfg.anomaly_share,
                            (self.cfg.opacity[0], self.cfg.opacity[1])) for i, im in enumerate(images)]
        clean = torch.from_numpy(images).permute(0, 3, 1, 2)
        augmented = torch.from_numpy(np.stack([p[0] for p in pairs])).permute(0, 3, 1, 2)
        masks = torch.from_numpy(np.stack([p[1] for p in pairs]))[:, None]
        return clean.to(x), augmented.to(x), masks.to(x)

    # -- the loop's interface -------------------------------------------------------------------------------
    def networks(self) -> dict[str, nn.Module]:
        return {"reconstructive": self.reconstructive, "discriminative": self.discriminative}

    def updates(self) -> list[Update]:
        drops = sorted(self.cfg.lr_drops)

        def factor(epoch: int, epochs: int) -> float:  # the official MultiStepLR: x 0.2 past each milestone
            return 0.2 ** sum(1 for f in drops if epoch > f * epochs)

        return [Update("draem", self.optimizer, self._loss, lr_factor=factor)]

    def prepare(self, frames: torch.Tensor) -> torch.Tensor:
        return self.frame_scale(frames)

    def losses(self, clean: torch.Tensor, augmented: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per image: the L2 and SSIM losses of the reconstruction, the focal loss of the segmentation, and
        SSPCAB's own loss (0 without it)."""
        rec, inner, outer = self.reconstructive(augmented, with_block5=True)
        probs = torch.softmax(self.discriminative(torch.cat([rec, augmented], 1)).float(), 1)
        out = {"l2": (rec.float() - clean).pow(2).flatten(1).mean(1),
               "ssim": 1 - ssim(rec.float(), clean),
               "focal": focal_loss(probs, masks)}
        out["sspcab"] = ((outer.float() - inner.float()).pow(2).flatten(1).mean(1) if self.cfg.sspcab
                         else torch.zeros_like(out["l2"]))
        return out

    def total(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """L2 + SSIM + focal (+ lambda SSPCAB), per image."""
        return parts["l2"] + parts["ssim"] + parts["focal"] + self.cfg.sspcab_lambda * parts["sspcab"]

    def _loss(self, x: torch.Tensor, _shared: dict[str, Any]) -> LossParts:
        # the draws follow torch's generator, which the loop seeds per epoch: a resumed run draws the same
        rng = np.random.default_rng(int(torch.randint(2 ** 62, (1,)).item()))
        clean, augmented, masks = self.anomalies(x, rng, self.cfg.rotate_share)
        parts = {k: v.mean() for k, v in self.losses(clean, augmented, masks).items()}
        loss = self.total(parts)
        if not self.cfg.sspcab:
            parts.pop("sspcab")
        return loss, {"loss": loss, **parts}

    def validation_loss(self, x: torch.Tensor) -> torch.Tensor:
        """Per held-out normal image the same loss with a fixed synthetic anomaly (drawn from the image's bytes,
        so every epoch is judged on the same ones; half of them stay normal as in training)."""
        drawn = []
        for image in x:
            digest = hashlib.blake2b(image.cpu().numpy().tobytes(), digest_size=8).digest()
            drawn.append(self.anomalies(image[None], np.random.default_rng(int.from_bytes(digest, "little"))))
        clean, augmented, masks = (torch.cat(parts) for parts in zip(*drawn, strict=True))
        return self.total(self.losses(clean, augmented, masks))

    def raw_score(self, x: torch.Tensor) -> torch.Tensor:
        rec = self.reconstructive(x)
        return self.map_score(self.discriminative(torch.cat([rec, x], 1)).float())[0]  # type: ignore[no-any-return]

    def fit(self, data: TrainingData, log: Log = lambda _m: None, run: Optional[RunOptions] = None) -> dict[str, Any]:
        source = (f"{len(self.texture_paths)} texture images from {self.cfg.textures}" if self.texture_paths else
                  {"procedural": "procedural textures", "self": "the training images"}[self.cfg.textures])
        log(f"{self.name}: synthetic anomalies filled with {source}; "
            f"SSPCAB {'on' if self.cfg.sspcab else 'off'}; score window {self.window} px")
        return super().fit(data, log, run)

    def fit_facts(self) -> dict[str, Any]:
        return {"textures": self.cfg.textures if not self.texture_paths else "folder",
                "texture_images": len(self.texture_paths), "sspcab": self.cfg.sspcab, "score_window": self.window,
                "reconstructive_parameters": sum(p.numel() for p in self.reconstructive.parameters()),
                "discriminative_parameters": sum(p.numel() for p in self.discriminative.parameters())}

    # -- export ---------------------------------------------------------------------------------------------
    def map_shape(self) -> tuple[int, int]:
        return self.hw

    def export_batch_limit(self, max_elements: int, n_images: Optional[int] = None) -> Optional[int]:
        """The first blocks' full-resolution feature maps grow with the batch."""
        return max_elements // self._largest_per_image()

    def _largest_per_image(self) -> int:
        w = max(self.cfg.rec_width, 2 * self.cfg.disc_width)  # the U-Net's last merge sees w + w channels
        return w * self.hw[0] * self.hw[1]

    def export_checks(self, max_batch: int, max_elements: int) -> dict[str, Any]:
        largest = max_batch * self._largest_per_image()
        if largest > max_elements:
            raise UserError(f"{self.name}: export.max_batch {max_batch} at {self.hw[0]}x{self.hw[1]} makes a "
                            f"{largest}-element feature map, past export.max_distance_elements {max_elements}; "
                            "lower export.max_batch, the input size or the widths")
        return {"max_batch": max_batch, "largest_tensor_elements": largest, "score_window": self.window}

    def export_module(self) -> nn.Module:
        self.reconstructive.cpu().eval()
        self.discriminative.cpu().eval()
        return DraemExport(self.reconstructive, self.discriminative, self.window).eval()
