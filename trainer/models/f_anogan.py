"""f-AnoGAN (Schlegl, Seeböck, Waldstein, Langs & Schmidt-Erfurth, "f-AnoGAN: Fast unsupervised anomaly detection
with generative adversarial networks", Medical Image Analysis 2019), after the official code
(github.com/tSchlegl/f-AnoGAN: ``wgangp_64x64.py``, ``z_encoding_izif.py``).

Two trainings, one after the other, both through the shared loop (trainer/loop.py):
1. a Wasserstein GAN with gradient penalty (WGAN-GP, Gulrajani et al. 2017) of the normal images: generator G
   z -> x (z ~ N(0, I), 128-d), critic D with layer normalisation (a batch norm would couple the images the
   penalty treats one by one); n_critic = 5 critic steps per generator step, penalty weight 10, Adam 1e-4,
   betas (0, 0.9). The critic's loss D(G(z)) - D(x) + 10 (|grad D(x^)| - 1)^2, x^ on the segment between a real
   and a generated image; the generator's -D(G(z)).
2. the izi_f encoder E x -> z, with G and D frozen: izi_f(x) = mean((x - G(E(x)))^2) + kappa * mean((f(x) -
   f(G(E(x))))^2), f the critic's last feature map (before its output layer), kappa 1; RMSprop 5e-5 (the
   official optimiser; 5e-4 here, see below).
Score: izi_f(x) per image (the official ``anomaly_scoring``'s ``dual_iloss`` distance), min-max scaled in the
graph with constants from calibration data. Map: the per-pixel residual |x - G(E(x))| (mean over channels,
smoothed by ``map_sigma``). One forward pass E -> G -> D, exported like every other model.

The GAN parts (the latent generator, the discriminator whose feature map the scores compare, the sampling of z)
are ``LatentGan``, which AnoGAN (trainer/models/anogan.py, the same GAN searched per image instead of encoded)
shares. Both are built from the project's DCGAN networks (trainer/networks.py) and trained through GANomaly's
adversarial base (trainer/adversarial.py).

What differs from the paper and its code, and why:
- networks: the official 64x64 ResNets (four residual blocks each, 64-512 channels) are replaced by the project's
  DCGAN encoder/decoder/discriminator (4x4 strided convolutions, ``ngf``/``ndf`` channels doubling per level),
  which every other GAN model here shares and whose operators TensorRT and the FP16 export already handle; the
  critic's batch norms become layer norms (GroupNorm with one group: per image over channels and positions, with
  a per-channel scale and shift, the official ``Layernorm`` over axes 1, 2, 3). Any square power of two from 32
  works, not only 64.
- training length: the official 100 000 generator iterations and 50 000 encoder iterations are counted here in
  epochs (``epochs`` for the GAN, ``encoder_epochs`` for the encoder); the GAN's epoch is not chosen by
  validation (the official code trains a fixed number of iterations; a critic's value is no image-quality measure):
  ``training.select: auto`` keeps its last epoch, the encoder's is chosen as every model's (validation izi_f on
  held-out normals, or validation AUROC with DIR/val defects).
- the n_critic critic steps of a generator step see the same real batch (the loop hands each update the batch
  it drew; the official code draws a fresh real batch for each), each with fresh samples of z.
- the fit keeps its two trainings' checkpoints apart: the GAN's in the run's checkpoint folder, the encoder's in
  its ``encoder/`` subfolder; ``--resume`` continues whichever was interrupted.

Measured (2026-12-07, the 2-core VM at load average 7-11, one thread; scored through the exported ONNX graph):
- generated washers with a planted foreign object (make_dataset(..., kinds=OBJECT_KINDS), 64 px, 60 good parts
  (48 fitted, 12 held out), seed 7, 20 + 20 test parts; tests/test_trainer_f_anogan.py's recipe: 16 wide, GAN 50
  epochs at batch 16, lr 2e-4, 2 critic steps, encoder 60 epochs at lr 1e-3): image AUROC 0.82, pixel 0.77;
  33 s of CPU for the whole test file. GANomaly on the same data (16 wide, 50 epochs, batch 16, its paper's
  recipe otherwise): image AUROC 0.52, pixel 0.99 (its latent score misses the object its reconstruction shows).
  The same f-AnoGAN with WGAN-GP's 5 critic steps and lr 3e-4: 0.845, pixel 0.70 (1.6x the CPU); with the official
  lr 1e-4 and 5 critic steps, 100 GAN and 100 encoder epochs (encoder lr 5e-4): 0.84, pixel 0.61 (3x the CPU);
  40 + 40 epochs: 0.72; at 32 px the object is a few pixels and the score at chance (0.59).
- the same recipe over 3 seeds of the data (seeds 0, 1, 2; /tmp script calling fit_bundle and evaluate_bundle as
  the test does): image AUROC 0.94, 0.825, 0.925 (mean 0.897), pixel 0.74, 0.72, 0.69; GANomaly on the same three
  (16 wide, 50 epochs): 0.48, 0.68, 0.61 (mean 0.59), pixel 0.995, 0.989, 0.992. AnoGAN (trainer/models/anogan.py)
  with this GAN and its search instead of the encoder: 0.51 on seed 7.
- generated washers with surface defects (benchmarks/accuracy_synthetic.py --model f-anogan --seeds 3 --size 64
  --train 60 --set input.height=64 --set input.width=64 --set epochs=50 --set batch_size=16, the test's f_anogan
  keys; 40 + 80 test parts): image AUROC 0.702 +- 0.029 (0.727, 0.671, 0.707), pixel 0.810 +- 0.004; by kind
  missing 0.85, crack 0.79, scratch 0.58, spot 0.58: thin or small surface marks are the patch models' job.
- ELPV mono solar cells (benchmarks/protocol.py --dataset elpv --cell mono --models f-anogan --seeds 1 --threads 1
  with the test's recipe: --set batch_size=16 --set epochs=50 and the f_anogan keys above; 64 px, seed 0): image
  AUROC 80.9, AP 86.2, F1 at the shipped threshold 61.3 (recall 44.7, false alarms 1.4 %), best F1 76.2; fit 1065 s
  at load 10-14, 837 img/s through the FP32 graph; PatchCore 94.2 there; GANomaly at the same size, width, epochs
  and batch (--models ganomaly --set ganomaly.ngf=16 ...): AUROC 62.5, AP 65.0, best F1 69.2.
- the official encoder rate (5e-5) is meant for 50 000 iterations; in the few hundred steps a CPU fit gets it
  barely moves the encoder (20 epochs of 1 step at batch 32: izi_f 0.85 -> 0.78, image AUROC 0.45): the shipped
  default is 5e-4 (measured above with the official GAN recipe: 0.84), the test's recipe 1e-3.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from trainer import distributed
from trainer.adversarial import AdversarialModel, check_adversarial
from trainer.distillation import frozen
from trainer.ingraph import FrameInput, ReconstructionMap, ScoreScale
from trainer.loop import BEST, RUN, EpochTrainer, Log, LossParts, Update, resolve_device
from trainer.models import ModelDefaults, ModelSettings, RunOptions, register_model, setting
from trainer.networks import DcganDecoder, DcganDiscriminator, DcganEncoder, init_dcgan_weights

if TYPE_CHECKING:
    from trainer.frames import TrainingData

ENCODER_CHECKPOINTS = "encoder"  # the encoder's training run, inside the fit's checkpoint folder


# -- the GAN both Schlegl models train -------------------------------------------------------------------------
def layer_normed(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm2d replaced by a layer norm over (C, H, W) with a per-channel affine
    (GroupNorm with one group): a WGAN-GP critic must treat each image alone (Gulrajani et al. 2017, 4)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, nn.GroupNorm(1, child.num_features))
        else:
            layer_normed(child)
    return module


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """WGAN-GP's penalty: mean over the batch of (||grad_x^ D(x^)||_2 - 1)^2, x^ = a x + (1 - a) x~ with a ~ U(0, 1)
    drawn per image: the critic kept 1-Lipschitz along the lines between real and generated images."""
    alpha = torch.rand(real.shape[0], 1, 1, 1, device=real.device, dtype=real.dtype)
    mixed = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    out, _ = critic(mixed)
    grad, = torch.autograd.grad(out.sum(), mixed, create_graph=True)
    return (grad.flatten(1).norm(2, dim=1) - 1).pow(2).mean()


def izi_f(x: torch.Tensor, fake: torch.Tensor, feat_x: torch.Tensor, feat_fake: torch.Tensor,
          kappa: float) -> torch.Tensor:
    """f-AnoGAN's izi_f per image: mean squared image residual + kappa x mean squared residual of the critic's
    features (the encoder's training loss and the anomaly score alike)."""
    image = (x - fake).pow(2).flatten(1).mean(1)
    features = (feat_x - feat_fake).pow(2).flatten(1).mean(1)
    return image + kappa * features


GAN_OBJECTIVES = (WGAN_GP, DCGAN) = ("wgan-gp", "dcgan")


class LatentGan(AdversarialModel):
    """A GAN of normal images, z -> x (the project's DCGAN decoder) against a discriminator whose last feature map
    the anomaly scores compare, trained by one of two objectives: ``wgan-gp`` (f-AnoGAN's: a layer-normed critic,
    n_critic critic steps a generator step, the gradient penalty; Adam betas (beta1, 0.9)) or ``dcgan`` (AnoGAN's:
    BCE, the generator's loss non-saturating, the discriminator re-initialised when it has won; betas (beta1,
    0.999)). The settings section holds nz, ngf, ndf, lr, beta1, n_critic, gp_weight and map_sigma."""

    uniform_latent = False  # z ~ N(0, I) (f-AnoGAN's official sampling); True: z ~ U(-1, 1) (DCGAN's, AnoGAN's)

    def __init__(self, config: Any, objective: str) -> None:
        super().__init__(config)
        self.objective = objective
        self.generator = DcganDecoder(self.size, self.channels, self.cfg.nz, self.cfg.ngf)
        self.discriminator = DcganDiscriminator(self.size, self.channels, self.cfg.ndf)
        if objective == WGAN_GP:
            layer_normed(self.discriminator)
        self.init_weights()

    def sample_z(self, n: int, like: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``n`` latent codes [n, nz, 1, 1] on ``like``'s device, from the GAN's prior."""
        shape = (n, self.cfg.nz, 1, 1)
        if self.uniform_latent:
            z = torch.rand(shape, generator=generator) * 2 - 1
        else:
            z = torch.randn(shape, generator=generator)
        return z.to(like.device)

    def generated(self, x: torch.Tensor) -> torch.Tensor:
        """As many generated images as ``x`` has real ones (fresh z)."""
        return self.generator(self.sample_z(x.shape[0], x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The discriminator's last feature map (before its output layer): what the scores compare."""
        return self.discriminator(x)[1]

    # -- the two objectives ----------------------------------------------------------------------------------
    def critic_loss(self, x: torch.Tensor, fake: torch.Tensor) -> LossParts:
        """WGAN-GP's critic loss D(x~) - D(x) + gp_weight * penalty; logs the Wasserstein estimate D(x) - D(x~)."""
        real_out, _ = self.discriminator(x)
        fake_out, _ = self.discriminator(fake)
        distance = real_out.mean() - fake_out.mean()
        penalty = gradient_penalty(self.discriminator, x, fake)
        loss = -distance + self.cfg.gp_weight * penalty
        return loss, {"loss_c": loss, "wasserstein": distance, "gp": penalty}

    def generator_loss(self, x: torch.Tensor, shared: dict[str, Any]) -> LossParts:
        fake = self.generated(x)
        shared["fake"] = fake
        pred, _ = self.discriminator(fake)
        if self.objective == WGAN_GP:
            loss = -pred.mean()
        else:  # DCGAN's non-saturating loss: -log D(G(z))
            loss = F.binary_cross_entropy_with_logits(pred, torch.ones_like(pred))
        return loss, {"loss_g": loss}

    def discriminator_loss(self, x: torch.Tensor, fake: torch.Tensor) -> LossParts:
        if self.objective == WGAN_GP:
            return self.critic_loss(x, fake)
        real, false = self.real_fake_bce(x, fake)
        loss = real + false
        return loss, {"loss_d": loss}

    def gan_updates(self) -> list[Update]:
        """One batch's steps: WGAN-GP's n_critic critic steps (each on freshly generated images) then the
        generator's; DCGAN's generator step then the discriminator's on the same generated images."""
        if self.objective == DCGAN:
            return AdversarialModel.updates(self)  # Adam (beta1, 0.999), generator then discriminator
        betas = (self.cfg.beta1, 0.9)
        critic = Update("critic", torch.optim.Adam(self.discriminator.parameters(), lr=self.cfg.lr, betas=betas),
                        lambda x, _shared: self.critic_loss(x, self._fresh_fake(x)))
        generator = Update("generator", torch.optim.Adam(self.generator.parameters(), lr=self.cfg.lr, betas=betas),
                           self.generator_loss)
        return [critic] * self.cfg.n_critic + [generator]

    def _fresh_fake(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.generated(x)

    def updates(self) -> list[Update]:
        if not self._updates:
            self._updates = self.gan_updates()
        return self._updates

    def after_step(self, logs: dict[str, float]) -> None:
        """DCGAN: re-initialise a discriminator that has won (GANomaly's remedy); a WGAN critic's loss is a signed
        distance estimate, never a collapsed BCE."""
        if self.objective == DCGAN:
            super().after_step(logs)

    def export_checks(self, max_batch: int, max_elements: int) -> dict[str, Any]:
        return {"max_batch": max_batch}


# -- f-AnoGAN ------------------------------------------------------------------------------------------------
@dataclass
class FAnoganSettings(ModelSettings):
    """f-AnoGAN (Schlegl et al. 2019): a WGAN-GP of the normal images, then an encoder trained against the frozen
    generator and critic (izi_f); score izi_f, map the image residual. ``epochs`` counts the GAN's epochs. Input:
    a square power of two from 32 (32, 64, 128, 256)."""

    nz: int = setting(128, "latent size (the official 128)")
    ngf: int = setting(64, "generator width (channels of its last hidden layer; doubling each level up)")
    ndf: int = setting(64, "critic and encoder width (channels of the first layer; doubling each level down)")
    lr: float = setting(0.0001, "Adam learning rate of the generator and critic (WGAN-GP's 1e-4)")
    beta1: float = setting(0.0, "Adam beta1 of the generator and critic (WGAN-GP's 0; beta2 0.9)")
    n_critic: int = setting(5, "critic steps per generator step (WGAN-GP's 5)")
    gp_weight: float = setting(10.0, "weight of the gradient penalty (WGAN-GP's lambda 10)")
    encoder_epochs: int = setting(100, "epochs of the encoder's training (izi_f) once the GAN is trained")
    encoder_lr: float = setting(0.0005, "RMSprop learning rate of the encoder (the official 5e-5 is meant for 50 000 "
                                "iterations; in a few hundred it barely moves)")
    kappa: float = setting(1.0, "weight of the critic-feature residual in izi_f and the score (the official 1)")
    map_sigma: float = setting(2.0, "Gaussian blur of the anomaly map (per-pixel residual |x - G(E(x))|), "
                               "pixels; 0 = off")

    def validate(self) -> None:
        check_adversarial(self.lr, self.beta1, self.map_sigma, "f_anogan")
        if min(self.nz, self.ngf, self.ndf, self.n_critic, self.encoder_epochs) < 1:
            raise ValueError("f_anogan.nz, ngf, ndf, n_critic and encoder_epochs must be >= 1")
        if self.gp_weight < 0 or self.kappa < 0 or self.encoder_lr <= 0:
            raise ValueError("f_anogan.gp_weight and kappa must be >= 0 and encoder_lr > 0")


class FAnoganExport(nn.Module):
    """frames uint8 [N,H,W,3] BGR -> (izi_f score float32 [N], residual map float32 [N,H,W]): E -> G -> D once."""

    def __init__(self, frame_input: FrameInput, encoder: DcganEncoder, generator: DcganDecoder,
                 critic: DcganDiscriminator, scale: ScoreScale, amap: ReconstructionMap, kappa: float) -> None:
        super().__init__()
        self.frame_input = frame_input
        self.encoder = encoder
        self.generator = generator
        self.critic = critic
        self.scale = scale
        self.amap = amap
        self.kappa = kappa

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.frame_input(frames)
        fake = self.generator(self.encoder(x))
        _, feat_x = self.critic(x)
        _, feat_fake = self.critic(fake)
        return self.scale(izi_f(x, fake, feat_x, feat_fake, self.kappa)), self.amap(x, fake)


@register_model("f-anogan", settings=FAnoganSettings)
class FAnogan(LatentGan):
    """f-AnoGAN: a WGAN-GP of normal images and an encoder into its latent space; izi_f as the score."""

    display_name = "f-AnoGAN"
    defaults = ModelDefaults(input_size=64, batch_size=64, epochs=100)
    trains_distributed = False  # two trainings in a row, the second with the first's networks frozen beside it

    def __init__(self, config: Any) -> None:
        super().__init__(config, WGAN_GP)
        self.cfg: FAnoganSettings = config.settings_for(self.name)
        self.encoder = DcganEncoder(self.size, self.channels, self.cfg.nz, self.cfg.ndf)
        self.encoder.apply(init_dcgan_weights)
        self.phase = "gan"  # "gan", then "encoder"
        self._encoder_updates: list[Update] = []

    # -- the two trainings ----------------------------------------------------------------------------------
    def encoder_loss(self, x: torch.Tensor, _shared: dict[str, Any]) -> LossParts:
        """izi_f through the frozen generator and critic; only the encoder learns."""
        fake = self.generator(self.encoder(x))
        loss = izi_f(x, fake, self.features(x), self.features(fake), self.cfg.kappa).mean()
        return loss, {"izi_f": loss}

    def networks(self) -> dict[str, nn.Module]:
        if self.phase == "encoder":
            return {"encoder": self.encoder}
        return {"generator": self.generator, "discriminator": self.discriminator}

    def updates(self) -> list[Update]:
        if self.phase == "gan":
            return super().updates()
        if not self._encoder_updates:
            self._encoder_updates = [Update("encoder", torch.optim.RMSprop(self.encoder.parameters(),
                                                                           lr=self.cfg.encoder_lr),
                                            self.encoder_loss)]
        return self._encoder_updates

    def validation_loss(self, x: torch.Tensor) -> torch.Tensor:
        if self.phase == "gan":
            return -self.discriminator(x)[0]  # how real the critic finds held-out normals (logged, not selected on)
        return self.raw_score(x)

    def raw_score(self, x: torch.Tensor) -> torch.Tensor:
        if self.phase == "gan":
            return -self.discriminator(x)[0]
        fake = self.generator(self.encoder(x))
        return izi_f(x, fake, self.features(x), self.features(fake), self.cfg.kappa)

    def fit(self, data: TrainingData, log: Log = lambda _m: None, run: Optional[RunOptions] = None) -> dict[str, Any]:
        """The GAN's training, then the encoder's (each through the shared loop); ``--resume`` continues the one
        that was interrupted."""
        self.require_training_images(data)
        run = run or RunOptions()
        where = run.checkpoint_dir
        gan_done = run.resume and where is not None and _completed(where)
        self.phase = "gan"
        if gan_done:
            assert where is not None
            state = torch.load(where / BEST, map_location="cpu", weights_only=True)["networks"]
            for name, net in self.networks().items():
                net.load_state_dict(state[name])
            gan: dict[str, Any] = {"resumed": "the GAN's training had finished; its networks were loaded"}
            log(f"{self.name}: the GAN's training had finished ({where / RUN}); resuming the encoder's")
        else:
            select = "last" if run.select == "auto" else run.select
            log(f"{self.name}: training the WGAN-GP ({self.config.epochs} epochs, {self.cfg.n_critic} critic steps "
                "a generator step)")
            gan = EpochTrainer(self, data, dataclasses.replace(run, select=select), log).run()
        device = distributed.device_for(distributed.environment(), resolve_device(run.device))
        for net in (self.generator, self.discriminator):
            frozen(net.to(device))
        self.phase = "encoder"
        encoder_run = dataclasses.replace(run, checkpoint_dir=None if where is None else where / ENCODER_CHECKPOINTS,
                                          resume=run.resume and where is not None
                                          and (where / ENCODER_CHECKPOINTS / "last.pt").is_file(),
                                          stop_after_epoch=None)
        log(f"{self.name}: training the encoder (izi_f, kappa {self.cfg.kappa:g}) for {self.cfg.encoder_epochs} "
            "epochs against the frozen generator and critic")
        trainer = EpochTrainer(self, data, encoder_run, log)
        trainer.epochs = int(self.cfg.encoder_epochs)
        encoder = trainer.run()
        gan_summary = {k: v for k, v in gan.items() if k not in ("history",)}
        return {**encoder, "gan": {**gan_summary, "history": gan.get("history", [])}, **self.fit_facts()}

    # -- export ----------------------------------------------------------------------------------------------
    def export_module(self) -> nn.Module:
        self.for_export()
        self.encoder.cpu().eval()
        assert isinstance(self.generator, DcganDecoder) and isinstance(self.discriminator, DcganDiscriminator)
        return FAnoganExport(self.frame_input, self.encoder, self.generator, self.discriminator, self.scale,
                             self.amap, self.cfg.kappa).eval()


def _completed(checkpoints: Path) -> bool:
    """Did the training whose run.json is in ``checkpoints`` finish (status complete)?"""
    path = checkpoints / RUN
    try:
        return bool(json.loads(path.read_text(encoding="utf-8")).get("status") == "complete")
    except (OSError, ValueError):
        return False
