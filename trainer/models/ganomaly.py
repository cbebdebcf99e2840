"""GANomaly (Akcay, Atapour-Abarghouei & Breckon, ACCV 2018), following the official code's recipe.

Generator: encoder G_E -> latent z (nz) -> decoder G_D -> reconstruction x^ -> second encoder E -> z^.
Discriminator: a DCGAN encoder with one output. Generator loss w_adv * L2 between the discriminator's
last feature maps of x and x^ (feature matching) + w_con * L1(x, x^) + w_enc * L2(z, z^), weights (1, 50, 1);
discriminator loss BCE(real) + BCE(fake), averaged; the discriminator is re-initialised when its loss falls
below 1e-5 (it has won and would stop teaching). Adam 2e-4, betas (0.5, 0.999), batch 64, 15 epochs.
Score: mean((z - z^)^2), min-max scaled in the graph with constants from calibration data (the official
code scales with the test set's own min and max, which a station cannot know). Anomaly map: the smoothed
per-pixel reconstruction difference, so an operator sees where a part differs.
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
from trainer.networks import DcganDecoder, DcganDiscriminator, DcganEncoder


class GanomalyGenerator(nn.Module):
    """x -> (x^, z, z^): encoder, decoder, encoder."""

    def __init__(self, size: int, channels: int, nz: int, width: int) -> None:
        super().__init__()
        self.encoder1 = DcganEncoder(size, channels, nz, width)
        self.decoder = DcganDecoder(size, channels, nz, width)
        self.encoder2 = DcganEncoder(size, channels, nz, width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = self.encoder1(x)
        fake = self.decoder(z)
        return fake, z, self.encoder2(fake)


def latent_score(z: torch.Tensor, z_hat: torch.Tensor) -> torch.Tensor:
    """GANomaly's anomaly score: mean squared distance between the two latent codes, per image."""
    return (z - z_hat).pow(2).flatten(1).mean(1)


class GanomalyExport(nn.Module):
    """frames uint8 [N,H,W,3] BGR -> (score float32 [N], anomaly_map float32 [N,H,W])."""

    def __init__(self, frame_input: FrameInput, generator: GanomalyGenerator, scale: ScoreScale,
                 amap: ReconstructionMap) -> None:
        super().__init__()
        self.frame_input = frame_input
        self.generator = generator
        self.scale = scale
        self.amap = amap

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.frame_input(frames)
        fake, z, z_hat = self.generator(x)
        return self.scale(latent_score(z, z_hat)), self.amap(x, fake)


@dataclass
class GanomalySettings(ModelSettings):
    """GANomaly (Akcay et al. 2018), the official code's defaults. Input: a square power of two from 32 (32, 64,
    128, 256)."""

    nz: int = setting(100, "latent size")
    ngf: int = setting(64, "generator width (channels of the first layer; doubling each level down)")
    ndf: int = setting(64, "discriminator width")
    lr: float = setting(0.0002, "Adam learning rate (generator and discriminator)")
    beta1: float = setting(0.5, "Adam beta1 (beta2 0.999)")
    w_adv: float = setting(1.0, "weight of the feature-matching adversarial loss (L2 on discriminator features)")
    w_con: float = setting(50.0, "weight of the contextual loss (L1 between image and reconstruction)")
    w_enc: float = setting(1.0, "weight of the encoder loss (L2 between the two latent codes)")
    map_sigma: float = setting(2.0, "Gaussian blur of the anomaly map (per-pixel reconstruction difference), "
                               "pixels; 0 = off")

    def validate(self) -> None:
        check_adversarial(self.lr, self.beta1, self.map_sigma, "ganomaly")
        if min(self.nz, self.ngf, self.ndf) < 1:
            raise ValueError("ganomaly.nz, ngf and ndf must be >= 1")
        if min(self.w_adv, self.w_con, self.w_enc) < 0:
            raise ValueError("ganomaly loss weights must be >= 0")


@register_model("ganomaly", settings=GanomalySettings)
class Ganomaly(AdversarialModel):
    """GANomaly: adversarially trained encoder-decoder-encoder; latent distance as the anomaly score."""

    display_name = "GANomaly"
    defaults = ModelDefaults(input_size=64, batch_size=64, epochs=15)

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.generator = GanomalyGenerator(self.size, self.channels, self.cfg.nz, self.cfg.ngf)
        self.discriminator = DcganDiscriminator(self.size, self.channels, self.cfg.ndf)
        self.init_weights()

    def generator_loss(self, x: torch.Tensor, shared: dict[str, Any]) -> LossParts:
        fake, z, z_hat = self.generator(x)
        shared["fake"] = fake
        _, feat_real = self.discriminator(x)
        _, feat_fake = self.discriminator(fake)
        adv = F.mse_loss(feat_fake, feat_real)  # feature matching on the discriminator's last feature map
        con = F.l1_loss(fake, x)
        enc = F.mse_loss(z_hat, z)
        loss = self.cfg.w_adv * adv + self.cfg.w_con * con + self.cfg.w_enc * enc
        return loss, {"loss_g": loss, "adv": adv, "con": con, "enc": enc}

    def discriminator_loss(self, x: torch.Tensor, fake: torch.Tensor) -> LossParts:
        real, false = self.real_fake_bce(x, fake)
        loss = 0.5 * (real + false)
        return loss, {"loss_d": loss}

    def validation_loss(self, x: torch.Tensor) -> torch.Tensor:
        fake, z, z_hat = self.generator(x)
        return self.cfg.w_con * (fake - x).abs().flatten(1).mean(1) + self.cfg.w_enc * latent_score(z, z_hat)

    def raw_score(self, x: torch.Tensor) -> torch.Tensor:
        _, z, z_hat = self.generator(x)
        return latent_score(z, z_hat)

    def export_module(self) -> nn.Module:
        self.for_export()
        assert isinstance(self.generator, GanomalyGenerator)
        return GanomalyExport(self.frame_input, self.generator, self.scale, self.amap).eval()
