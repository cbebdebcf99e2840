"""Skip-GANomaly (Akcay, Atapour-Abarghouei & Breckon, IJCNN 2019): GANomaly's successor with a U-Net generator.

Generator: pix2pix's U-Net (skip connections between mirrored encoder and decoder levels). Discriminator: the
DCGAN one. Generator loss w_adv * BCE(D(x^), real) + w_con * L1(x, x^) + w_lat * L2 between the
discriminator's last feature maps of x and x^, with the paper's weights (1, 40, 1) (the official
repository's option defaults put w_con at 50; we follow the paper). Discriminator loss BCE(real) + BCE(fake)
as in the paper (the official code also adds the latent term to it), re-initialised when it falls below 1e-5.
The official code's input noise is not added. Score A(x) = 0.9 * mean((x - x^)^2) + 0.1 * mean((f(x) - f(x^))^2),
f the discriminator's features, min-max scaled in the graph with constants from calibration data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer.adversarial import AdversarialModel, check_adversarial
from trainer.ingraph import FrameInput, ReconstructionMap, ScoreScale
from trainer.loop import LossParts
from trainer.models import ModelDefaults, ModelSettings, register_model, setting
from trainer.networks import DcganDiscriminator, UnetGenerator


def skip_score(x: torch.Tensor, fake: torch.Tensor, feat_real: torch.Tensor, feat_fake: torch.Tensor,
               lam: float) -> torch.Tensor:
    """λ · reconstruction error + (1 − λ) · discriminator-feature error, per image."""
    rec = (x - fake).pow(2).flatten(1).mean(1)
    lat = (feat_real - feat_fake).pow(2).flatten(1).mean(1)
    return lam * rec + (1.0 - lam) * lat


class SkipGanomalyExport(nn.Module):
    """frames uint8 [N,H,W,3] BGR -> (score float32 [N], anomaly_map float32 [N,H,W])."""

    def __init__(self, frame_input: FrameInput, generator: UnetGenerator, discriminator: DcganDiscriminator,
                 scale: ScoreScale, amap: ReconstructionMap, lam: float) -> None:
        super().__init__()
        self.frame_input = frame_input
        self.generator = generator
        self.discriminator = discriminator
        self.scale = scale
        self.amap = amap
        self.lam = lam

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.frame_input(frames)
        fake = self.generator(x)
        _, feat_real = self.discriminator(x)
        _, feat_fake = self.discriminator(fake)
        return self.scale(skip_score(x, fake, feat_real, feat_fake, self.lam)), self.amap(x, fake)


@dataclass
class SkipGanomalySettings(ModelSettings):
    """Skip-GANomaly (Akcay et al. 2019): U-Net generator; the paper's loss weights and score mix. Input: a square
    power of two from 32 (32, 64, 128, 256)."""

    ngf: int = setting(64, "U-Net width (channels of the first level, up to 8x deeper down)")
    ndf: int = setting(64, "discriminator width")
    lr: float = setting(0.0002, "Adam learning rate")
    beta1: float = setting(0.5, "Adam beta1 (beta2 0.999)")
    w_adv: float = setting(1.0, "adversarial loss weight (BCE of the discriminator on the reconstruction)")
    w_con: float = setting(40.0, "contextual loss weight (L1); the official repository's default is 50, the "
                           "paper's 40")
    w_lat: float = setting(1.0, "latent loss weight (L2 between discriminator features of image and "
                           "reconstruction)")
    score_lambda: float = setting(0.9, "score = lambda x reconstruction error + (1 - lambda) x feature error")
    map_sigma: float = setting(2.0, "Gaussian blur of the anomaly map, pixels; 0 = off")

    def validate(self) -> None:
        check_adversarial(self.lr, self.beta1, self.map_sigma, "skip_ganomaly")
        if min(self.ngf, self.ndf) < 1:
            raise ValueError("skip_ganomaly.ngf and ndf must be >= 1")
        if min(self.w_adv, self.w_con, self.w_lat) < 0:
            raise ValueError("skip_ganomaly loss weights must be >= 0")
        if not 0.0 <= self.score_lambda <= 1.0:
            raise ValueError("skip_ganomaly.score_lambda must be in [0, 1]")


@register_model("skip-ganomaly", settings=SkipGanomalySettings)
class SkipGanomaly(AdversarialModel):
    """Skip-GANomaly: U-Net generator + DCGAN discriminator; reconstruction and feature errors as the score."""

    display_name = "Skip-GANomaly"
    defaults = ModelDefaults(input_size=64, batch_size=64, epochs=15)

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.generator = UnetGenerator(self.size, self.channels, self.cfg.ngf)
        self.discriminator = DcganDiscriminator(self.size, self.channels, self.cfg.ndf)
        self.init_weights()

    def generator_loss(self, x: torch.Tensor, shared: dict[str, Any]) -> LossParts:
        fake = self.generator(x)
        shared["fake"] = fake
        pred_fake, feat_fake = self.discriminator(fake)
        _, feat_real = self.discriminator(x)
        adv = F.binary_cross_entropy_with_logits(pred_fake, torch.ones_like(pred_fake))
        con = F.l1_loss(fake, x)
        lat = F.mse_loss(feat_fake, feat_real)
        loss = self.cfg.w_adv * adv + self.cfg.w_con * con + self.cfg.w_lat * lat
        return loss, {"loss_g": loss, "adv": adv, "con": con, "lat": lat}

    def discriminator_loss(self, x: torch.Tensor, fake: torch.Tensor) -> LossParts:
        real, false = self.real_fake_bce(x, fake)
        loss = real + false
        return loss, {"loss_d": loss}

    def validation_loss(self, x: torch.Tensor) -> torch.Tensor:
        return (self.generator(x) - x).abs().flatten(1).mean(1)

    def raw_score(self, x: torch.Tensor) -> torch.Tensor:
        fake = self.generator(x)
        _, feat_real = self.discriminator(x)
        _, feat_fake = self.discriminator(fake)
        return skip_score(x, fake, feat_real, feat_fake, self.cfg.score_lambda)

    def export_module(self) -> nn.Module:
        self.for_export()
        assert isinstance(self.generator, UnetGenerator) and isinstance(self.discriminator, DcganDiscriminator)
        return SkipGanomalyExport(self.frame_input, self.generator, self.discriminator, self.scale, self.amap,
                                  self.cfg.score_lambda).eval()
