"""What the GAN-based models share: a generator and a discriminator trained in alternation by the shared loop.

A subclass builds its two networks and gives the two losses, its validation loss, its raw score and its export
graph; this base wires the Adam optimisers (the papers' lr and betas), the in-graph frame input, score scaling
and reconstruction map, and the re-initialisation of a discriminator whose loss has collapsed below 1e-5
(the official code's remedy: a discriminator that has won teaches the generator nothing).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer.ingraph import FrameInput, ReconstructionMap, ScoreScale
from trainer.loop import EpochModel, LossParts, Update
from trainer.models import FOREIGN_OBJECTS, GENERATIVE
from trainer.networks import check_power_of_two, init_dcgan_weights

COLLAPSED_DISCRIMINATOR_LOSS = 1e-5


def check_adversarial(lr: float, beta1: float, map_sigma: float, key: str) -> None:
    """The settings every GAN-based model has: a ValueError naming ``key`` (its config section) when one is off."""
    if lr <= 0 or not 0 <= beta1 < 1:
        raise ValueError(f"{key}.lr must be > 0 and beta1 in [0, 1)")
    if map_sigma < 0:
        raise ValueError(f"{key}.map_sigma must be >= 0")


class AdversarialModel(EpochModel):
    """Generator + discriminator; the model's settings section holds lr, beta1 and map_sigma (``check_adversarial``)."""

    scales_scores = True
    family = GENERATIVE
    catches = FOREIGN_OBJECTS  # whole-image scores: what departs from a good part as a whole
    # The export modules' min-max score scaling (their ``scale`` attribute, ScoreScale): it multiplies by
    # 1 / (high - low), which can exceed FP16's largest value (65504) and magnifies the raw score's FP16
    # rounding; in FP16 a briefly trained encoder-decoder-encoder GAN's scores moved by 0.87 of their scale, with
    # it FP32 by 0.005.
    fp32_scopes = ("/scale/",)
    generator: nn.Module
    discriminator: nn.Module

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.cfg = config.settings_for(self.name)
        self.hw = config.input.hw
        self.size = check_power_of_two(self.hw, self.name)
        self.channels = 1 if config.input.channels == "gray" else 3  # 'auto' is resolved from the data upstream
        torch.manual_seed(int(config.seed))
        self.frame_input = FrameInput(self.channels)
        self.scale = ScoreScale()
        self.amap = ReconstructionMap(self.cfg.map_sigma, self.hw)
        self._updates: list[Update] = []
        self.reinitialised = 0

    def init_weights(self) -> None:
        """DCGAN initialisation of both networks (call once they are built)."""
        self.generator.apply(init_dcgan_weights)
        self.discriminator.apply(init_dcgan_weights)

    @abstractmethod
    def generator_loss(self, x: torch.Tensor, shared: dict[str, Any]) -> LossParts:
        """The generator's loss; must leave its reconstruction in ``shared['fake']`` for the discriminator."""

    @abstractmethod
    def discriminator_loss(self, x: torch.Tensor, fake: torch.Tensor) -> LossParts:
        """The discriminator's loss on real ``x`` and the (detached) reconstruction ``fake``; logs 'loss_d'."""

    def real_fake_bce(self, x: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The discriminator's BCE on real images (target 1) and reconstructions (target 0), from its logits."""
        pred_real, _ = self.discriminator(x)
        pred_fake, _ = self.discriminator(fake)
        return (F.binary_cross_entropy_with_logits(pred_real, torch.ones_like(pred_real)),
                F.binary_cross_entropy_with_logits(pred_fake, torch.zeros_like(pred_fake)))

    def networks(self) -> dict[str, nn.Module]:
        return {"generator": self.generator, "discriminator": self.discriminator}

    def updates(self) -> list[Update]:
        if not self._updates:
            betas = (self.cfg.beta1, 0.999)
            self._updates = [
                Update("generator", torch.optim.Adam(self.generator.parameters(), lr=self.cfg.lr, betas=betas),
                       self.generator_loss),
                Update("discriminator", torch.optim.Adam(self.discriminator.parameters(), lr=self.cfg.lr,
                                                         betas=betas),
                       lambda x, shared: self.discriminator_loss(x, shared["fake"].detach())),
            ]
        return self._updates

    def prepare(self, frames: torch.Tensor) -> torch.Tensor:
        return self.frame_input.to(frames.device)(frames)

    def after_step(self, logs: dict[str, float]) -> None:
        if logs.get("loss_d", 1.0) < COLLAPSED_DISCRIMINATOR_LOSS:
            self.discriminator.apply(init_dcgan_weights)
            self.reinitialised += 1

    def fit_facts(self) -> dict[str, Any]:
        return {"channels": self.channels, "discriminator_reinitialised": self.reinitialised}

    def set_score_range(self, low: float, high: float) -> None:
        self.scale.set(low, high)

    def map_shape(self) -> tuple[int, int]:
        return self.hw

    def for_export(self) -> None:
        """Both networks on the CPU in eval mode: the export graph is traced from them."""
        for net in (self.frame_input, self.generator, self.discriminator):
            net.cpu().eval()
