"""Reverse Distillation (Deng & Li, "Anomaly Detection via Reverse Distillation from One-Class Embedding", CVPR 2022,
arXiv 2201.10703), after the official code (github.com/hq-deng/RD4AD: resnet.py, de_resnet.py, main.py, test.py).

A frozen teacher (the encoder) gives three levels of features; a trainable one-class bottleneck embedding (OCBE:
the official ``BN_layer``) fuses them into one compact embedding, and a student decoder (a reversed ResNet, the
official ``de_resnet``) rebuilds the teacher's three levels from that embedding alone. The student never sees
the image, only the embedding, so it learns to rebuild the features of normal parts and fails on anomalies.

- OCBE (multi-scale feature fusion, then one-class embedding): level 1 through two 3x3 stride-2 convolutions
  (each with batch norm and ReLU), level 2 through one, both brought to level 3's channels and size and
  concatenated with level 3; then one ResNet stage of ``embedding_blocks`` bottlenecks (the first 3x3 stride 2)
  to the embedding at stride 32.
- decoder: three stages of bottlenecks (``decoder_blocks``, the official [3, 4, 6] of the WideResNet-50 decoder),
  each opened by a bottleneck whose middle convolution (and shortcut) is a 2x2 stride-2 transposed convolution,
  emitting the teacher's level 3, 2 and 1 in turn.
- widths, scaled to the teacher's channels C1, C2, C3 as the official ones are to WideResNet-50's 256, 512, 1024:
  fusion convolutions C1 -> C2 -> C3 and C2 -> C3; embedding 2 C3 channels, its bottlenecks C3 wide (2048 and
  1024 there); decoder stage k out C_k, C_k / 2 wide (1024/512, 512/256, 256/128 there).
- loss (official main.py ``loss_fucntion``): per level the mean over the batch of 1 - cosine similarity of the
  teacher's and the student's maps FLATTENED per image, summed over the levels. The paper writes a per-position
  cosine averaged over positions; the official code, followed here, compares each whole map as one vector.
- Adam, lr 0.005, betas (0.5, 0.999), batch 16 (the official recipe); OCBE and decoder trained together.
- map and score (official test.py ``cal_anomaly_map``, mode 'a'): per level 1 - the per-position cosine
  similarity over channels, upsampled (bilinear) to the input, SUMMED over the levels, Gaussian blur sigma 4 px;
  the image score is the blurred map's maximum.

What differs from the paper and the official code, and why:
- teacher: the official WideResNet-50 (layer 1-3: 256, 512, 1024 channels at stride 4, 8, 16) has no ImageNet
  weights on this machine; the default is the configured backbone's ``three`` role (Lite0 blocks [2, 4, 7]: 24,
  40, 80 channels at stride 4, 8, 16), the OCBE and decoder scaled to it as above (0.52 M trainable parameters;
  the same construction at WideResNet-50's widths has 83.8 M). ``backbone.name: wide_resnet50_2`` with a weights
  file gives the paper's levels and the official widths (the bottleneck layout; the official ResNet-18 variant
  uses basic blocks, not built here).
- output activations: the official decoder ends every block with a ReLU, matching a ResNet teacher whose levels
  are post-ReLU. An EfficientNet block's output is linear (it takes negative values), which a ReLU-ended student
  could never match in direction, so each decoder stage's last block drops its ReLU where the teacher's level
  takes negative values (probed once on a noise frame at build time); a ResNet teacher keeps them all.
- sizes: the official code runs 256 px, where every level halves exactly; here a transposed convolution's
  output is cropped to the teacher's level size (input sides not a multiple of 32, e.g. 80 px), and a teacher
  whose levels do not halve is refused with one line.
- the map's upsampling is bilinear without corner alignment (trainer/distillation.py's ``fuse_levels``; the
  official code aligns corners) and the blur pads by normalised zeros (trainer/ingraph.py's MapBlur; scipy's
  ``gaussian_filter`` reflects): both change only the borders.
- the recipe is reduced for CPU: input 160 px (256), ``epochs`` 40 (200), on cached teacher features
  (trainer/flows.py's FeatureCache: the teacher runs once per training image, then OCBE and decoder train
  alone). What the cut costs, measured on the mono protocol below: 100 epochs (--epochs 100, epoch 86 kept) gave
  AUROC 94.6, AP 95.9, F1 84.8 against 40 epochs' 94.3, 95.8, 83.3, for 2.5x the fit time (2 069 s against 812 s);
  the training loss still falls at 100 (0.17, from 0.22 at 40). 160 against 256 px was not measured here.

Measured (benchmarks/protocol.py --dataset elpv --cell mono --models reverse-distillation --seeds 1 --threads 1,
shipped settings, seed 0, 2026-12-07, a 2-core VM at load average 9-10): image AUROC 94.3, AP 95.8, F1 at the
shipped threshold 83.3 (recall 72.5, false alarms 1.7 %); PatchCore 94.4 and PaDiM 95.8 on the same draw. Fit
812 s (about 16 s an epoch of 480 frames, the stills and their codec copies, under that load), 113 img/s through
the FP32 graph on one thread. Poly (--cell poly, same command): AUROC 86.4, AP 84.4, F1 57.2 (recall 40.8, false
alarms 1.1 %), fit 861 s; PatchCore 79.6, PaDiM 88.0. Graph: 0.80 M parameters (teacher taps 0.27 M, student
0.52 M), model.onnx 3.2 MB; benchmarks/throughput.py at 160 px, ONNX Runtime CPU, load average 10: 115 img/s at
batch 1, 284 at batch 8.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import UserError
from trainer.backbones import check_tap_list
from trainer.distillation import cosine_distance, flattened_cosine_distance, frozen, fuse_levels
from trainer.features import config_taps
from trainer.flows import FeatureCache, Shape, TapsThenHead, pack_maps, score_and_map, unpack_maps
from trainer.ingraph import MapBlur
from trainer.loop import EpochModel, LossParts, Update
from trainer.models import DISTILLATION, SURFACE_DEFECTS, ModelDefaults, ModelSettings, register_model, setting

RESAMPLES = ("none", "down", "up")


def conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1, transposed: bool = False) -> nn.Sequential:
    """A bias-free convolution and its batch norm (a 2x2 stride-2 transposed convolution when ``transposed``)."""
    conv: nn.Module
    if transposed:
        conv = nn.ConvTranspose2d(c_in, c_out, kernel, stride=stride, bias=False)
    else:
        conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(c_out))


class Bottleneck(nn.Module):
    """ResNet's bottleneck (1x1 in, 3x3, 1x1 out, each with batch norm; a shortcut; a ReLU at the end).

    ``resample``: ``down`` makes the 3x3 stride 2 (the OCBE's stage, resnet.py), ``up`` replaces it with a 2x2
    stride-2 transposed convolution (the decoder, de_resnet.py); the shortcut then resamples the same way.
    ``out_relu`` False leaves the output linear (a level matched to a teacher whose features are signed)."""

    def __init__(self, c_in: int, width: int, c_out: int, resample: str = "none", out_relu: bool = True) -> None:
        super().__init__()
        if resample not in RESAMPLES:
            raise ValueError(f"resample {resample!r}: expected one of {RESAMPLES}")
        middle = (conv_bn(width, width, 2, 2, transposed=True) if resample == "up"
                  else conv_bn(width, width, 3, 2 if resample == "down" else 1))
        self.branch = nn.Sequential(conv_bn(c_in, width, 1), nn.ReLU(), middle, nn.ReLU(), conv_bn(width, c_out, 1))
        self.shortcut: Optional[nn.Module] = None
        if resample == "up":
            self.shortcut = conv_bn(c_in, c_out, 2, 2, transposed=True)
        elif resample == "down" or c_in != c_out:
            self.shortcut = conv_bn(c_in, c_out, 1, 2 if resample == "down" else 1)
        self.out_relu = out_relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branch(x) + (x if self.shortcut is None else self.shortcut(x))
        return F.relu(out) if self.out_relu else out


def stage(c_in: int, width: int, c_out: int, blocks: int, resample: str, out_relu: bool = True) -> nn.Sequential:
    """``blocks`` bottlenecks, the first resampling and changing channels; ``out_relu`` applies to the last."""
    return nn.Sequential(*[Bottleneck(c_in if i == 0 else c_out, width, c_out, resample if i == 0 else "none",
                                      out_relu or i < blocks - 1) for i in range(blocks)])


class OneClassEmbedding(nn.Module):
    """The OCBE (official ``BN_layer``): the teacher's levels [N,C_i,h_i,w_i] -> the embedding [N,2 C3,h3/2,w3/2]."""

    def __init__(self, channels: tuple[int, int, int], blocks: int) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.fine = nn.Sequential(conv_bn(c1, c2, 3, 2), nn.ReLU(), conv_bn(c2, c3, 3, 2), nn.ReLU())
        self.middle = nn.Sequential(conv_bn(c2, c3, 3, 2), nn.ReLU())
        self.embed = stage(3 * c3, c3, 2 * c3, blocks, "down")

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        return self.embed(torch.cat([self.fine(maps[0]), self.middle(maps[1]), maps[2]], 1))  # type: ignore[no-any-return]


class ReverseDecoder(nn.Module):
    """The student (official ``de_resnet``): embedding -> the teacher's levels, finest first like the teacher's."""

    def __init__(self, c_embed: int, channels: tuple[int, int, int], sizes: list[tuple[int, int]],
                 blocks: tuple[int, int, int], linear_out: list[bool]) -> None:
        super().__init__()
        openers, rests = [], []
        c_in = c_embed
        for level, n_blocks in zip((2, 1, 0), blocks, strict=True):  # deepest level first
            c = channels[level]
            layers = stage(c_in, max(1, c // 2), c, n_blocks, "up", out_relu=not linear_out[level])
            openers.append(layers[0])
            rests.append(nn.Sequential(*list(layers)[1:]))
            c_in = c
        self.openers = nn.ModuleList(openers)
        self.rests = nn.ModuleList(rests)
        self.sizes = [sizes[2], sizes[1], sizes[0]]
        # Decided here, not from traced shapes: a transposed conv doubles its input, a stride-2 conv halved
        # rounding up, so a level whose side is odd gets one row or column more than the teacher's, cut off.
        before = [((sizes[2][0] + 1) // 2, (sizes[2][1] + 1) // 2), sizes[2], sizes[1]]
        self.crops = [(2 * b[0], 2 * b[1]) != target for b, target in zip(before, self.sizes, strict=True)]

    def forward(self, embedding: torch.Tensor) -> list[torch.Tensor]:
        out = []
        x = embedding
        for opener, rest, (h, w), crop in zip(self.openers, self.rests, self.sizes, self.crops, strict=True):
            x = opener(x)
            if crop:
                x = x[:, :, :h, :w]
            x = rest(x)
            out.append(x)
        return out[::-1]


class Student(nn.Module):
    """OCBE then decoder: the teacher's levels -> the student's rebuilt levels (what the optimiser trains)."""

    def __init__(self, embedding: OneClassEmbedding, decoder: ReverseDecoder) -> None:
        super().__init__()
        self.embedding = embedding
        self.decoder = decoder

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.decoder(self.embedding(maps))  # type: ignore[no-any-return]


def flattened_cosine_distances(teacher: list[torch.Tensor], student: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per level, per image [N]: 1 - cosine similarity of the two maps flattened to one vector each (the official
    loss's terms: their means over the batch, summed over the levels, are the loss)."""
    return [flattened_cosine_distance(t, s) for t, s in zip(teacher, student, strict=True)]


class LevelDistances(nn.Module):
    """Teacher and student levels -> the summed, upsampled per-position cosine distance map [N,1,H,W]."""

    def __init__(self, hw: tuple[int, int]) -> None:
        super().__init__()
        self.hw = hw

    def forward(self, teacher: list[torch.Tensor], student: list[torch.Tensor]) -> torch.Tensor:
        return fuse_levels([cosine_distance(t, s) for t, s in zip(teacher, student, strict=True)], self.hw, "sum")


class ReverseDistillationHead(nn.Module):
    """The teacher's levels -> (score [N], anomaly map [N,H,W]): the student's rebuild, the official map and score."""

    def __init__(self, student: Student, hw: tuple[int, int], blur_sigma: float) -> None:
        super().__init__()
        self.student = student
        self.distance = LevelDistances(hw)
        self.hw = hw
        self.blur = MapBlur(blur_sigma, hw) if blur_sigma > 0 else None

    def forward(self, maps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return score_and_map(self.distance(maps, self.student(maps)), self.blur, self.hw)


@dataclass
class ReverseDistillationSettings(ModelSettings):
    """Reverse Distillation (Deng & Li 2022): a student decoder rebuilds the frozen teacher's levels from a
    one-class embedding."""

    layers: Union[List[int], str] = setting(
        "auto", "teacher taps, finer first, or auto: stride 4, 8 and 16, the paper's WideResNet-50 layers 1-3 "
        "(Lite0: [2, 4, 7])")
    embedding_blocks: int = setting(3, "bottlenecks of the one-class embedding's stage (the official 3)")
    decoder_blocks: List[int] = setting([3, 4, 6], "bottlenecks of the decoder's stages, deepest first (the "
                                        "official WideResNet-50 decoder's [3, 4, 6])")
    lr: float = setting(0.005, "Adam learning rate (the official 0.005)")
    beta1: float = setting(0.5, "Adam beta1 (the official 0.5; beta2 0.999)")
    blur_sigma: float = setting(4.0, "Gaussian blur of the anomaly map, px (the official 4); 0 = off")
    cache_mb: int = setting(1024, "host memory for the cached teacher features of the training images, MB "
                            "(Lite0 at 160 px: 0.25 MB an image); past it the teacher runs again")

    def validate(self) -> None:
        check_tap_list(self.layers, "reverse_distillation.layers", at_least=3)
        if not isinstance(self.layers, str) and len(self.layers) != 3:
            raise ValueError("reverse_distillation.layers must be auto or exactly 3 increasing taps")
        if len(self.decoder_blocks) != 3 or min(self.decoder_blocks) < 1 or self.embedding_blocks < 1:
            raise ValueError("reverse_distillation.decoder_blocks must be 3 counts >= 1 and embedding_blocks >= 1")
        if self.lr <= 0 or not 0 <= self.beta1 < 1 or self.blur_sigma < 0 or self.cache_mb < 0:
            raise ValueError("reverse_distillation.lr must be > 0, beta1 in [0, 1), blur_sigma and cache_mb >= 0")


@register_model("reverse-distillation", settings=ReverseDistillationSettings)
class ReverseDistillation(EpochModel):
    """Reverse Distillation: a decoder rebuilds the teacher's features from a one-class embedding; where it cannot
    (a per-position cosine distance), a defect."""

    catches = SURFACE_DEFECTS
    family = DISTILLATION
    display_name = "Reverse Distillation"
    caches_features = True  # prepare() caches the teacher's features: fixed codec-robust draws (trainer/loop.py)
    map_in_score_units = True  # score = max of the map
    defaults = ModelDefaults(input_size=160, batch_size=16, epochs=40)
    trains_distributed = False  # the feature cache is this process's

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.cfg: ReverseDistillationSettings = config.settings_for(self.name)
        self.hw = config.input.hw
        self.taps = config_taps(config.backbone, self.cfg.layers, "three", "reverse_distillation.layers", at_least=3)
        frozen(self.taps)
        noise = torch.randint(0, 256, (1, *self.hw, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            probe = self.taps(noise)
        self.shapes: list[Shape] = [tuple(int(s) for s in m.shape[1:]) for m in probe]
        self._check_levels()
        channels = (self.shapes[0][0], self.shapes[1][0], self.shapes[2][0])
        self.signed = [bool((m < 0).any()) for m in probe]
        torch.manual_seed(int(config.seed))
        embedding = OneClassEmbedding(channels, self.cfg.embedding_blocks)
        blocks = (self.cfg.decoder_blocks[0], self.cfg.decoder_blocks[1], self.cfg.decoder_blocks[2])
        decoder = ReverseDecoder(2 * channels[2], channels, [(s[1], s[2]) for s in self.shapes], blocks, self.signed)
        self.student = Student(embedding, decoder)
        self.head = ReverseDistillationHead(self.student, self.hw, self.cfg.blur_sigma)
        self.optimizer = torch.optim.Adam(self.student.parameters(), lr=self.cfg.lr, betas=(self.cfg.beta1, 0.999))
        self.cache = FeatureCache(lambda frames: pack_maps(self.taps(frames)), self.cfg.cache_mb * 1_000_000)

    def _check_levels(self) -> None:
        """Three levels, each half the previous one's size (rounded up): what the OCBE's stride-2 convolutions and
        the decoder's stride-2 transposed convolutions connect."""
        sides = [s[1:] for s in self.shapes]
        halving = len(sides) == 3 and all(sides[i + 1][k] == (sides[i][k] + 1) // 2 for i in range(2) for k in range(2))
        if not halving:
            raise UserError(f"reverse-distillation: the teacher's levels {[list(s) for s in self.shapes]} (channels, "
                            f"h, w) must be three, each half the previous one's size (strides 4, 8, 16); set "
                            f"reverse_distillation.layers to auto or to such taps of backbone "
                            f"{self.config.backbone.name}")

    # -- the loop's interface ------------------------------------------------------------------------------
    def networks(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def updates(self) -> list[Update]:
        return [Update("student", self.optimizer, self._loss)]

    def _teacher_and_student(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        teacher = unpack_maps(x, self.shapes)
        return teacher, self.student(teacher)

    def _loss(self, x: torch.Tensor, _shared: dict[str, Any]) -> LossParts:
        terms = [d.mean() for d in flattened_cosine_distances(*self._teacher_and_student(x))]
        value = torch.stack(terms).sum()
        return value, {"loss": value, **{f"level{i}": t for i, t in enumerate(terms)}}

    def prepare(self, frames: torch.Tensor) -> torch.Tensor:
        self.taps.to(frames.device)
        return self.cache(frames)

    def validation_loss(self, x: torch.Tensor) -> torch.Tensor:
        """Per image the training loss: the levels' flattened cosine distances, summed."""
        return torch.stack(flattened_cosine_distances(*self._teacher_and_student(x))).sum(0)

    def raw_score(self, x: torch.Tensor) -> torch.Tensor:
        self.head.to(x.device)  # the blur's kernels are buffers of the head, not of the trained network
        return self.head(unpack_maps(x, self.shapes))[0]  # type: ignore[no-any-return]

    def fit_facts(self) -> dict[str, Any]:
        return {"levels": [list(s) for s in self.shapes], "taps": list(self.taps.taps),
                "linear_levels": self.signed, "decoder_blocks": list(self.cfg.decoder_blocks),
                "student_parameters": sum(p.numel() for p in self.student.parameters()),
                "feature_cache": self.cache.facts()}

    # -- export --------------------------------------------------------------------------------------------
    def map_shape(self) -> tuple[int, int]:
        return self.hw

    def export_checks(self, max_batch: int, max_elements: int) -> dict[str, Any]:
        return {"max_batch": max_batch, "levels": [list(s) for s in self.shapes]}

    def export_module(self) -> nn.Module:
        self.taps.cpu().eval()
        self.head.cpu().eval()
        return TapsThenHead(self.taps, self.head).eval()
