"""GEOM (Golan & El-Yaniv, "Deep Anomaly Detection Using Geometric Transformations", NeurIPS 2018).

Transformations: horizontal flip {no, yes} x translation x {0, -s, +s} x translation y {0, -s, +s} (reflect fill)
x rot90 k in {0, 1, 2, 3}, in that product order, index 0 the identity: 72 of them; s = 8 px at 32 px, scaled with
the input (size / 4). ``geom.transformations: 8`` keeps flip x rotation only (9x less work a frame). Reflect fill is
the official code's (Keras' ``apply_affine_transform`` with scipy's ``reflect``: the edge pixel repeats, d c b a |
a b c d); +s moves the content right / down. Every transformation is a fixed permutation-with-repeats of the pixels,
so all the copies of a frame are one Gather with constant indices, in training and in the exported graph alike.

Classifier: a Wide ResNet (WRN-10-4 at 32 px, the paper's; ``geom.depth`` / ``geom.width``) on inputs in [-1, 1],
trained with Adam (lr 1e-3, Keras' default) to tell which transformation was applied. The recipe is 3 = ceil(200/72)
epochs over the 72x set with batches of 128 transformed images. Here each step takes ``batch_size`` (16) training
images and ``geom.per_image`` (8) distinct transformations of each drawn at random: 128 transformed images a step;
one loop epoch is 1/9 of an epoch over the 72x set, so the default 27 epochs make the recipe's 3 x 72 x N images
seen and 3 x 72 x N / 128 optimiser steps (for ``transformations: 8`` the recipe is ceil(200/8) = 25 epochs over
the 8x set: ``epochs: 25`` with per_image 8). Validation loss: the classifier's cross-entropy over all copies of
each held-out normal.

Score (a normality score, negated so that higher = more anomalous): one Dirichlet per transformation t fitted by
Minka's fixed point (trainer/dirichlet.py) to the softmax outputs on the training normals' copies t, then
``-(1/T) sum_t sum_j (alpha_tj - 1) log softmax(f(T_t x))_j`` (log-softmax of the logits: the same value as the
official log of the softmax, without its log(0)); ``geom.score: simple`` gives ``-(1/T) sum_t softmax(f(T_t x))_t``.
During training, before the Dirichlets exist, the simple score ranks epochs by validation AUROC (when DIR/val has
defects). The alpha become graph constants; the log-softmax and the score stay FP32 in model.fp16.onnx.

Anomaly map (a coarse pointer, not a calibrated localisation): on the identity copy, each position's share of the
classifier's margin for "untransformed" (the logits are linear in the pooled last feature map, so the map's mean
is that logit margin up to the bias), negated and upsampled bilinearly: where the frame looks least like an upright
normal part. Largest intermediate: max_batch x T x 16 x width x H x W (the first group's activations), checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.errors import UserError
from trainer.dirichlet import fit_dirichlet
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
from trainer.transformations import CopiesClassifierExport, GeometricCopies, square_side
from trainer.transformations import transformation_list as transformation_list  # re-exported (tests)

if TYPE_CHECKING:
    from trainer.frames import TrainingData

ELEMENT_LIMIT = 2**31  # TensorRT's limit on one tensor (trainer/tensorrt_readiness.py checks it too)


class GeomScore(nn.Module):
    """Classifier logits of the T copies [N*T, T] -> anomaly score [N]: negated Dirichlet (or simple) normality."""

    weight: torch.Tensor

    def __init__(self, count: int) -> None:
        super().__init__()
        self.count = count
        self.dirichlet = False
        self.register_buffer("weight", torch.eye(count) / count)

    def set_alpha(self, alpha: np.ndarray) -> None:
        """Switch to the Dirichlet score with alpha [T, T] (row t: the Dirichlet of copy t's softmax)."""
        self.weight = torch.from_numpy((alpha - 1.0) / self.count).to(torch.float32)
        self.dirichlet = True

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits.float().reshape(-1, self.count, self.count), dim=-1)
        if self.dirichlet:
            return -(logp * self.weight).sum((1, 2))
        return -(logp.exp() * self.weight).sum((1, 2))


@dataclass
class GeomSettings(ModelSettings):
    """GEOM (Golan & El-Yaniv 2018): a Wide ResNet told which geometric transformation was applied to a normal
    image. Input: square (it rotates by 90 degrees; translations scale as size / 4)."""

    transformations: int = setting(
        72, "72 = flip x translate x {0, -s, +s} x translate y {0, -s, +s} (reflect fill, s = size / 4) x rot90 "
        "{0, 1, 2, 3}, the paper's; 8 = flip x rot90 only: 9x less work a frame (every frame goes through the "
        "network once per transformation); its accuracy cost: benchmarks/README.md")
    depth: int = setting(10, "Wide ResNet depth, 6n + 4 (the paper's WRN-10-4 at 32 px)")
    width: int = setting(4, "Wide ResNet widening factor (16, 32, 64 x width channels); cost grows as width^2")
    per_image: int = setting(
        8, "distinct random transformations of each training image per step (at most transformations): "
        "batch_size 16 x 8 = the paper's 128 a step, and 27 epochs of the training images = its 3 epochs over the "
        "72x set (for 8 transformations: epochs 25)")
    lr: float = setting(0.001, "Adam learning rate (Keras' default, the official code's)")
    score: str = setting(
        "dirichlet", "dirichlet = the paper's normality score (a Dirichlet per transformation fitted to the "
        "softmax outputs on the training normals, Minka's fixed point); simple = mean over t of softmax(T_t x)[t]. "
        "Both negated: higher = more anomalous")

    def validate(self) -> None:
        if self.transformations not in (72, 8):
            raise ValueError("geom.transformations must be 72 (flip x translations x rotations) or 8 (flip x rot90)")
        if self.depth < 10 or (self.depth - 4) % 6:
            raise ValueError("geom.depth must be 6n + 4 with n >= 1 (10, 16, 22, 28)")
        if self.width < 1 or self.per_image < 1:
            raise ValueError("geom.width and geom.per_image must be >= 1")
        if self.lr <= 0:
            raise ValueError("geom.lr must be > 0")
        if self.score not in ("dirichlet", "simple"):
            raise ValueError("geom.score must be dirichlet or simple")


@register_model("geom", settings=GeomSettings)
class Geom(EpochModel):
    """GEOM: a Wide ResNet told which of 72 geometric transformations was applied; Dirichlet normality score."""

    catches = FOREIGN_OBJECTS
    family = SELF_SUPERVISED
    display_name = "GEOM"
    defaults = ModelDefaults(input_size=32, batch_size=16, epochs=27)
    # log-softmax and the weighted sum over T x T entries: FP32 in model.fp16.onnx.
    fp32_scopes = ("/score/",)

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.cfg: GeomSettings = config.settings_for(self.name)
        self.size = square_side(config.input.hw, self.name)
        self.channels = 1 if config.input.channels == "gray" else 3  # 'auto' is resolved from the data upstream
        torch.manual_seed(int(config.seed))
        self.frame_input = FrameInput(self.channels)
        self.copies = GeometricCopies(self.size, self.cfg.transformations)
        self.count = self.copies.count
        if self.cfg.per_image > self.count:
            raise UserError(f"geom.per_image {self.cfg.per_image} exceeds the {self.count} transformations; lower it")
        self.net = WideResNet(self.channels, self.count, self.cfg.depth, self.cfg.width)
        self.score_head = GeomScore(self.count)
        self._updates: list[Update] = []
        self._cache: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self.alpha: Optional[np.ndarray] = None

    # -- the shared loop's contract ------------------------------------------------------------------------
    def networks(self) -> dict[str, nn.Module]:
        return {"classifier": self.net}

    def updates(self) -> list[Update]:
        if not self._updates:
            self._updates = [Update("classifier", torch.optim.Adam(self.net.parameters(), lr=self.cfg.lr),
                                    self.classification_loss)]
        return self._updates

    def prepare(self, frames: torch.Tensor) -> torch.Tensor:
        self._cache = None
        return self.frame_input.to(frames.device)(frames)

    def classification_loss(self, x: torch.Tensor, shared: dict[str, Any]) -> LossParts:
        """Cross-entropy of per_image distinct random transformations of every image of the batch."""
        b, k = int(x.shape[0]), int(self.cfg.per_image)
        labels = torch.rand(b, self.count, device=x.device).argsort(1)[:, :k]
        copies = self.copies.to(x.device)(x).reshape(b, self.count, *x.shape[1:])
        chosen = copies[torch.arange(b, device=x.device)[:, None], labels].reshape(b * k, *x.shape[1:])
        logits, _ = self.net(chosen)
        target = labels.reshape(-1)
        loss = F.cross_entropy(logits, target)
        accuracy = (logits.argmax(1) == target).float().mean()
        return loss, {"loss": loss, "accuracy": accuracy}

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of all copies [B*T, T], computed once for validation_loss and raw_score of the same batch.

        One image's copies at a time: on a 2-core CPU 72 copies a pass ran 2x faster than a batch of 16
        images' 1152 at once (activations that fit the caches).
        """
        if self._cache is None or self._cache[0] is not x:
            copies = self.copies.to(x.device)(x)
            self._cache = (x, torch.cat([self.net(part)[0].float() for part in copies.split(self.count)]))
        return self._cache[1]

    def validation_loss(self, x: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(self._logits(x).reshape(-1, self.count, self.count), -1)
        return -logp.diagonal(dim1=1, dim2=2).mean(1)

    def raw_score(self, x: torch.Tensor) -> torch.Tensor:
        return self.score_head.to(x.device)(self._logits(x))

    def fit(self, data: TrainingData, log: Callable[[str], None] = lambda _m: None,
            run: Optional[RunOptions] = None) -> dict[str, Any]:
        """The shared loop trains the classifier; then a Dirichlet per transformation on the training normals."""
        self.require_training_images(data)
        if self.cfg.score == "dirichlet" and len(data.fit_paths) < 2:  # one image: no spread to fit (NaN alpha)
            raise UserError(f"geom: its Dirichlet score needs at least 2 training images, {len(data.fit_paths)} "
                            "given; add images to train/good or set geom.score: simple")
        facts = super().fit(data, log, run)
        self._cache = None
        if self.cfg.score == "dirichlet":
            facts["dirichlet"] = self.fit_dirichlets(data, log)
        return facts

    @torch.no_grad()
    def fit_dirichlets(self, data: TrainingData, log: Callable[[str], None]) -> dict[str, Any]:
        """Mean softmax and mean log-softmax of each copy over the training normals -> alpha [T, T]."""
        device = next(self.net.parameters()).device
        self.net.eval()
        sum_p = np.zeros((self.count, self.count))
        sum_logp = np.zeros((self.count, self.count))
        n = 0
        for frames in data.loader(data.fit_paths, int(self.config.batch_size)):
            x = self.prepare(frames.to(device))
            logp = torch.log_softmax(self._logits(x).reshape(-1, self.count, self.count), -1).double().cpu()
            sum_p += logp.exp().sum(0).numpy()
            sum_logp += logp.sum(0).numpy()
            n += int(frames.shape[0])
        if n == 0:
            raise UserError("geom: no training images to fit the Dirichlets on; add images to train/good")
        alpha = np.stack([fit_dirichlet(sum_p[t] / n, sum_logp[t] / n) for t in range(self.count)])
        self.alpha = alpha
        self.score_head.set_alpha(alpha)
        self._cache = None
        log(f"geom: {self.count} Dirichlets fitted on {n} training images (alpha of the right class: median "
            f"{np.median(np.diag(alpha)):.3g}; total precision median {np.median(alpha.sum(1)):.3g})")
        return {"images": n, "alpha_diagonal_median": round(float(np.median(np.diag(alpha))), 4),
                "alpha_sum_median": round(float(np.median(alpha.sum(1))), 4)}

    def fit_facts(self) -> dict[str, Any]:
        return {"channels": self.channels, "transformations": self.count, "per_image": int(self.cfg.per_image),
                "network": f"WRN-{self.cfg.depth}-{self.cfg.width}", "score": self.cfg.score,
                "parameters": sum(p.numel() for p in self.net.parameters())}

    # -- export --------------------------------------------------------------------------------------------
    def map_shape(self) -> tuple[int, int]:
        return self.size, self.size

    def export_batch_limit(self, max_elements: int, n_images: Optional[int] = None) -> Optional[int]:
        """The T copies of every frame go through the network at once: TensorRT's 2^31 elements bound the batch."""
        return (ELEMENT_LIMIT - 1) // (self.count * max(self.net.widths[:2]) * self.size * self.size)

    def export_checks(self, max_batch: int, max_elements: int) -> dict[str, Any]:
        """The T copies of every frame go through the network at once: its widest activations within 2^31."""
        widest = max(self.net.widths[:2]) * self.size * self.size
        largest = max_batch * self.count * widest
        if largest >= ELEMENT_LIMIT:
            raise UserError(f"geom: export.max_batch {max_batch} x {self.count} transformations x {widest} "
                            f"activations exceeds TensorRT's 2^31 elements; lower export.max_batch, geom.width, "
                            "geom.transformations or the input size")
        return {"max_batch": max_batch, "transformations": self.count, "copies_at_max_batch": max_batch * self.count,
                "largest_activation_elements": largest, "element_limit": ELEMENT_LIMIT,
                "score": "dirichlet" if self.score_head.dirichlet else "simple"}

    def export_module(self) -> nn.Module:
        if self.cfg.score == "dirichlet" and self.alpha is None:
            raise RuntimeError("Geom.export_module() called before fit()")
        for net in (self.frame_input, self.copies, self.net, self.score_head):
            net.cpu().eval()
        w = self.net.fc.weight.detach()
        return CopiesClassifierExport(self.frame_input, self.copies, self.net, self.score_head,
                                      w[0] - w.mean(0)).eval()
