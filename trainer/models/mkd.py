"""MKD (Salehi, Sadjadi, Baselizadeh, Rohban, Rabiee, "Multiresolution Knowledge Distillation for Anomaly
Detection", CVPR 2021, arXiv 2011.11108), after the official code (github.com/rohban-lab/Knowledge_Distillation_AD:
configs/config.yaml, models/network.py, loss_functions.py, test_functions.py).

A frozen ImageNet source network (the teacher) and a smaller cloner trained from scratch to reproduce the
source's activations at several resolutions (the "critical layers") on normal images only; where the cloner
fails to follow, the image is anomalous. The official code compares four layers: the outputs of the VGG-16
blocks 2 to 5 (the max-pools after relu2_2, relu3_3, relu4_3, relu5_3: its ``output[3], [6], [9], [12]``),
stride 4, 8, 16 and 32, 128/256/512/512 channels. Per layer a value term, the mean squared difference of the
activations (``nn.MSELoss``), and a direction term, 1 - the cosine similarity of the two flattened activation
vectors (one vector per image and layer, not per position). Loss = sum over layers of L_dir + lamda * L_val,
lamda = ``lamda`` 0.01: the official code weights the value (MSE) term with lamda (the paper's equation puts
lambda on L_dir; the numbers it reports come from the code, which this follows; config.yaml gives 0.5 for
MVTec, 0.01 elsewhere). Adam lr 1e-3. Image score: that same loss per test image.

Here:
- teacher: the configured backbone, frozen, at the stage ends of strides 4, 8, 16 and 32 (``layers: auto``; Lite0
  blocks [2, 4, 10, 15]: 24, 40, 112, 320 channels), the same four resolutions as the official VGG-16 layers:
  the paper's point is that the levels together (fine texture to object parts) catch what one level misses.
  Not the ``all`` role (its stride-2 levels and the 1280-channel head add cost without a counterpart in the
  paper) and not [2, 4, 7, 10] (two stride-16 levels, no stride 32): on the washers (96 px, 30 epochs, the same
  fit) the loss scored image AUROC 0.945 with [2, 4, 10, 15] and 0.862 with [2, 4, 7, 10]. ``backbone.name:
  vgg16`` with a weights file gives timm's VGG-16 stage ends; no ImageNet VGG-16 weights on this machine, so the
  cost of the Lite0 teacher against the paper's is not measured.
- cloner: a plain VGG-like stack like the official 'B' config (narrow 3x3 conv + BatchNorm + ReLU layers of
  ``width`` 16 filters, 2x2 max-pools between resolutions), each level ending in a 3x3 conv to the teacher's
  channels, as the official cloner ends each block in a conv of the source's width. Chosen over Lite at reduced
  width because it is the paper's cloner shape (few filters, no pretrained prior, its own inductive bias) and
  because it is smaller still (Lite0 x 0.25 keeps the depthwise blocks' depth). One change: that last conv is
  linear (no ReLU), since Lite's block outputs are linear projections with signed values where VGG's pooled
  ReLUs are non-negative; the next level continues from it. Its BatchNorms train (the loop's train mode).
- the map: the paper localises by gradients of the loss w.r.t. the input (vanilla gradients, SmoothGrad, guided
  backprop), Gaussian-blurred: a backward pass, which an ONNX scorer cannot hold. The exported map is instead
  the per-position counterpart of the loss: at every position of every level cosine_distance + lamda *
  squared_distance (the channel-wise direction and value discrepancy, trainer/distillation.py), upsampled and
  summed over the levels (``fuse_levels(..., "sum")``), Gaussian-blurred (``blur_sigma`` 4 px, the paper's blur).
  It is a different map from the paper's; its pixel AUROC is measured in tests/test_trainer_mkd.py.
- recipe reduced for CPU: the official trains 201-601 epochs at batch 64-128 on 128-224 px; here ``epochs`` 60
  at batch 32, 128 px (the cloner's cost grows with the pixels: it runs full resolution), teacher features cached
  once per training frame (trainer/flows.py's FeatureCache), only the cloner trains. At 60 epochs the loss still
  falls (elpv mono: 4.9 at epoch 1, 1.22 at 20, 0.90 at 40): the CPU recipe stops short of convergence.

Measured (benchmarks/protocol.py --dataset elpv --cell mono --models mkd --seeds 1 --threads 1, shipped settings,
seed 0, 2026-12-07, a 2-core VM at load average 8-10): image AUROC 90.7, AP 93.3, F1 at the shipped threshold 77.4
(recall 63.6, false alarms 0.7 %); PatchCore 94.4 and PaDiM 95.8 on the same draw. Fit 2 218 s, 106 img/s
through the FP32 graph. Poly (--cell poly, load average 4-7): AUROC 81.2, AP 80.3, F1 57.5 (recall 41.0, false
alarms 1.1 %), fit 653 s, 284 img/s; at 30 epochs (--epochs 30) 80.2 AUROC; PatchCore 79.6, PaDiM 88.0.
Cost at 128 px: 3.07 M parameters in the graph (the Lite0 teacher to block 15 and the
0.11 M cloner), model.onnx 12.3 MB (FP16 6.3 MB); ONNX Runtime CPU FP32 271 img/s at batch 1, 213 at batch 8
(benchmarks/throughput.py, load average 9.5). Washers (tests/test_trainer_mkd.py, 96 px, 40 epochs): image AUROC
0.96, pixel AUROC of the per-position map 0.95.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Union

import torch
from torch import nn

from core.errors import UserError
from trainer.backbones import check_tap_list, is_lite, levels_of
from trainer.distillation import cosine_distance, flattened_cosine_distance, frozen, fuse_levels, squared_distance
from trainer.features import BackboneTaps, config_taps
from trainer.flows import FeatureCache, Shape, pack_maps, unpack_maps
from trainer.ingraph import MapBlur
from trainer.loop import EpochModel, LossParts, Update
from trainer.models import DISTILLATION, SURFACE_DEFECTS, ModelDefaults, ModelSettings, register_model, setting

STRIDES = (4, 8, 16, 32)  # the official critical layers' strides (VGG-16's pool2 to pool5)


def stage_end_taps(backbone: str) -> list[int]:
    """The last tap at each of strides 4, 8, 16 and 32 of ``backbone`` (a Lite's 1x1 head conv left out): the
    levels that match the official code's VGG-16 block ends."""
    levels = levels_of(backbone)
    usable = {t: s for t, (_c, s) in levels.items() if not (is_lite(backbone) and t == max(levels))}
    taps = [max(t for t, s in usable.items() if s == stride) for stride in STRIDES if stride in usable.values()]
    if len(taps) < 2:
        raise UserError(f"mkd.layers auto: backbone {backbone} has fewer than two of strides 4, 8, 16, 32; "
                        "give mkd.layers as a list of taps")
    return taps


class Cloner(nn.Module):
    """Normalised RGB [N,3,H,W] -> one map per teacher level [N,C_i,H/s_i,W/s_i]: a VGG-like stack of narrow
    conv-BN-ReLU layers with 2x2 max-pools, each level emitted by a linear 3x3 conv to the teacher's channels."""

    def __init__(self, levels: list[tuple[int, int]], width: int, convs: int) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        heads: list[nn.Module] = []
        in_ch, stride = 3, 1
        for channels, level_stride in levels:
            layers: list[nn.Module] = []
            steps = 0
            while stride < level_stride or steps == 0:  # convs then a pool per doubling (convs alone for a level
                for _ in range(convs):                    # at the previous level's stride), then the level's conv
                    layers += [nn.Conv2d(in_ch, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                               nn.ReLU(inplace=True)]
                    in_ch = width
                steps += 1
                if stride < level_stride:
                    layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))  # ceil: the teacher's stride-2 'same' sizes
                    stride *= 2
            blocks.append(nn.Sequential(*layers))
            heads.append(nn.Conv2d(width, channels, 3, padding=1))
            in_ch = channels
        self.blocks = nn.ModuleList(blocks)
        self.heads = nn.ModuleList(heads)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)  # the official cloner's initialisation

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for block, head in zip(self.blocks, self.heads, strict=True):
            x = head(block(x))
            out.append(x)
        return out


def direction_and_value(teacher: torch.Tensor, student: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image [N] x2 of one level: 1 - cosine similarity of the flattened activations (L_dir) and their mean
    squared difference (L_val), the official loss's two terms."""
    t, s = teacher.flatten(1), student.flatten(1)
    return flattened_cosine_distance(t, s), (t - s).pow(2).mean(1)


class MkdHead(nn.Module):
    """(teacher maps, cloner maps) -> (score [N]: the MKD loss per image, map [N,H,W]: per-position direction +
    lamda value discrepancy summed over the levels, blurred)."""

    def __init__(self, lamda: float, hw: tuple[int, int], blur_sigma: float) -> None:
        super().__init__()
        self.lamda = float(lamda)
        self.hw = hw
        self.blur = MapBlur(blur_sigma, hw) if blur_sigma > 0 else None

    def loss_terms(self, teacher: list[torch.Tensor], student: list[torch.Tensor]) -> list[tuple[torch.Tensor,
                                                                                                     torch.Tensor]]:
        return [direction_and_value(t, s) for t, s in zip(teacher, student, strict=True)]

    def score(self, teacher: list[torch.Tensor], student: list[torch.Tensor]) -> torch.Tensor:
        """Per image: sum over levels of L_dir + lamda L_val (the training loss and the paper's image score)."""
        terms = self.loss_terms(teacher, student)
        return torch.stack([d + self.lamda * v for d, v in terms], 0).sum(0)

    def forward(self, teacher: list[torch.Tensor], student: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        maps = [cosine_distance(t, s) + self.lamda * squared_distance(t, s)
                for t, s in zip(teacher, student, strict=True)]
        amap = fuse_levels(maps, self.hw, "sum")
        if self.blur is not None:
            amap = self.blur(amap)
        return self.score(teacher, student), amap.reshape(-1, *self.hw)


class MkdGraph(nn.Module):
    """The exported graph: uint8 BGR frames [N,H,W,3] -> (score [N], anomaly map [N,H,W]); the teacher's
    normalised input feeds both networks."""

    def __init__(self, teacher: BackboneTaps, cloner: Cloner, head: MkdHead) -> None:
        super().__init__()
        self.teacher = teacher
        self.cloner = cloner
        self.head = head

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.teacher.input(frames)
        teacher = self.teacher.backbone.features(x, self.teacher.taps)
        score, amap = self.head(teacher, self.cloner(x))
        return score, amap


@dataclass
class MkdSettings(ModelSettings):
    """MKD (Salehi et al. 2021): a small cloner trained from scratch to follow a frozen teacher at four levels."""

    layers: Union[List[int], str] = setting(
        "auto", "teacher taps, finer first, or auto: the stage ends at stride 4, 8, 16 and 32, the official "
                "VGG-16 blocks 2-5 (Lite0: [2, 4, 10, 15])")
    width: int = setting(16, "filters of the cloner's narrow conv layers (the official cloner's 16)")
    convs: int = setting(2, "narrow conv-BN-ReLU layers per resolution step of the cloner (the official: 2)")
    lamda: float = setting(0.01, "weight of the value (MSE) term beside the direction term (the official code's "
                                 "lamda: 0.01, 0.5 for MVTec)")
    lr: float = setting(0.001, "Adam learning rate (the official 1e-3)")
    cache_mb: int = setting(1024, "host memory for the cached teacher features of the training images, MB "
                                  "(Lite0 at 128 px: 0.13 MB an image); past it the teacher runs again")
    blur_sigma: float = setting(4.0, "Gaussian blur of the anomaly map, px (the paper's sigma 4); 0 = off")

    def validate(self) -> None:
        check_tap_list(self.layers, "mkd.layers", at_least=2)
        if self.width < 1 or self.convs < 1 or self.cache_mb < 0:
            raise ValueError("mkd.width and mkd.convs must be >= 1 and cache_mb >= 0")
        if self.lamda < 0 or self.lr <= 0 or self.blur_sigma < 0:
            raise ValueError("mkd.lr must be > 0; lamda and blur_sigma >= 0")


@register_model("mkd", settings=MkdSettings)
class Mkd(EpochModel):
    """MKD: a small cloner imitates a frozen teacher at four resolutions; where it fails, the part is anomalous."""

    catches = SURFACE_DEFECTS
    family = DISTILLATION
    display_name = "MKD"
    caches_features = True  # prepare() caches the teacher's features: fixed codec-robust draws (trainer/loop.py)
    defaults = ModelDefaults(input_size=128, batch_size=32, epochs=60)
    trains_distributed = False  # the feature cache is this process's
    # FP32 in model.fp16.onnx: the distances (the per-image sums of squares over a whole level, C x h x w values,
    # pass FP16's 65504 on the fine levels), and the input normalisation with the teacher's stem (conv and ReLU6,
    # Lite's names): FP16's step at the normalised pixels (up to 2.6) is 2e-3, seen by both networks. On the
    # washers (96 px, tests/test_trainer_mkd.py's fit) the head alone left a score error of 9.5e-4 of the scale and
    # reversed 1 of 400 good/defect pairs; with the input and stem 5.8e-4 and none (the first ten Lite blocks
    # too: 1.4e-4, at ten times the FP32 nodes).
    fp32_scopes = ("/head/", "/input/", "/_conv_stem", "/Clip")

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.cfg: MkdSettings = config.settings_for(self.name)
        self.hw = config.input.hw
        backbone = str(config.backbone.name)
        layers = stage_end_taps(backbone) if self.cfg.layers == "auto" else self.cfg.layers
        teacher = config_taps(config.backbone, layers, "all", "mkd.layers", at_least=2)
        self.teacher: BackboneTaps = frozen(teacher)  # type: ignore[assignment]
        with torch.no_grad():
            probe = self.teacher(torch.zeros(1, *self.hw, 3, dtype=torch.uint8))
        self.shapes: list[Shape] = [tuple(int(s) for s in m.shape[1:]) for m in probe]
        torch.manual_seed(int(config.seed))
        strides = [max(1, round(self.hw[0] / s[1])) for s in self.shapes]
        self.cloner = Cloner([(s[0], st) for s, st in zip(self.shapes, strides, strict=True)], self.cfg.width,
                             self.cfg.convs)
        with torch.no_grad():
            got = [tuple(m.shape[1:]) for m in self.cloner.eval()(torch.zeros(1, 3, *self.hw))]
        if got != self.shapes:
            raise UserError(f"mkd: the cloner's maps {got} do not match the teacher's {self.shapes} at input "
                            f"{self.hw[0]}x{self.hw[1]}; use an input size that is a multiple of 32")
        self.head = MkdHead(self.cfg.lamda, self.hw, self.cfg.blur_sigma)
        self.optimizer = torch.optim.Adam(self.cloner.parameters(), lr=self.cfg.lr)
        self.cache = FeatureCache(lambda frames: pack_maps(self.teacher(frames)), self.cfg.cache_mb * 1_000_000)
        self.image_size = 3 * self.hw[0] * self.hw[1]

    # -- the loop's interface ------------------------------------------------------------------------------
    def networks(self) -> dict[str, nn.Module]:
        return {"cloner": self.cloner}

    def updates(self) -> list[Update]:
        return [Update("cloner", self.optimizer, self._loss)]

    def _split(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """prepare()'s rows -> (teacher maps, cloner maps)."""
        image = x[:, :self.image_size].reshape(-1, 3, *self.hw)
        return unpack_maps(x[:, self.image_size:], self.shapes), self.cloner(image)

    def _loss(self, x: torch.Tensor, _shared: dict[str, Any]) -> LossParts:
        terms = self.head.loss_terms(*self._split(x))
        direction = torch.stack([d.mean() for d, _v in terms]).sum()
        value = torch.stack([v.mean() for _d, v in terms]).sum()
        total = direction + self.head.lamda * value
        return total, {"loss": total, "direction": direction, "value": value}

    def prepare(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames -> [B, 3HW + teacher features]: the normalised image (the cloner's input, computed each time)
        beside the teacher's cached maps."""
        self.teacher.to(frames.device)
        image = self.teacher.input(frames).flatten(1)
        return torch.cat([image, self.cache(frames)], 1)

    def validation_loss(self, x: torch.Tensor) -> torch.Tensor:
        """Per image the MKD loss (the score)."""
        return self.head.score(*self._split(x))

    def raw_score(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.score(*self._split(x))

    def fit_facts(self) -> dict[str, Any]:
        return {"levels": [list(s) for s in self.shapes], "taps": list(self.teacher.taps),
                "cloner_parameters": sum(p.numel() for p in self.cloner.parameters()),
                "feature_cache": self.cache.facts()}

    # -- export --------------------------------------------------------------------------------------------
    def map_shape(self) -> tuple[int, int]:
        return self.hw

    def export_checks(self, max_batch: int, max_elements: int) -> dict[str, Any]:
        return {"max_batch": max_batch, "levels": [list(s) for s in self.shapes]}

    def export_module(self) -> nn.Module:
        self.teacher.cpu().eval()
        self.cloner.cpu().eval()
        return MkdGraph(self.teacher, self.cloner, self.head.cpu()).eval()
