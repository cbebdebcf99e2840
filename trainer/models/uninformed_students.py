"""Uninformed Students (Bergmann, Fauser, Sattlegger, Steger, "Uninformed Students: Student-Teacher Anomaly Detection
with Discriminative Latent Embeddings", CVPR 2020, arXiv 1911.02357; no official code).

Per patch size p (17, 33 or 65 px) an ensemble of M students (the paper: 3), each the paper's patch-descriptor
network for p (its supplementary's tables: p = 17: conv 6x6x128, 5x5x256, 5x5x256, 4x4xd; p = 33: conv 5x5x128,
max-pool 2, 5x5x256, max-pool 2, 2x2x256, 4x4xd; p = 65: conv 5x5x128, max-pool 2, 5x5x128, max-pool 2, 5x5x256,
max-pool 2, 4x4x256, 1x1xd; leaky ReLU, slope 5e-3, after every convolution but the last), randomly initialised
and trained on the normal images to regress the teacher's descriptor at every position, the teacher's channels
normalised by their mean and std over the training images (constants from the fit): the loss is the sum over
the students of their mean squared errors, one Adam (the paper's lr 1e-4, weight decay 1e-5) over all of them.

Score per position (the paper's): the regression error e = ||mean_i s_i - t||^2 plus the predictive variance
v = mean_i ||s_i||^2 - ||mean_i s_i||^2 (computed as mean_i ||s_i - mean||^2, the same number without the
cancellation), each standardised by its mean and std over every position of the held-out normals after training
(the paper's validation set; the fitted images when none is held out): e~ + v~. Several patch sizes: the average
of their maps, each upsampled (bilinear) to the input. The image score is the map's maximum. Every normalisation
is a constant baked into the graph.

What differs from the paper, and why:
- teacher: the paper distils an ImageNet ResNet-18's descriptor of each p x p patch into a p-sized network (with
  metric-learning and compactness losses) on ImageNet; no ImageNet images or ResNet-18 weights are on this
  machine, and the project's pretrained backbone is itself the ImageNet network that teacher imitates. So the
  teacher here is the frozen backbone's level whose receptive field is closest to p: Lite0 block 2 (24 ch, stride
  4, receptive field 19 px) for p = 17 and 33, block 4 (40 ch, stride 8, receptive field 67 px) for p = 65
  (``teacher_taps: auto``: the stride-4 level of the ``three`` role for 17 and 33, its stride-8 level for 65, on
  any backbone). Its descriptor has the level's channels (24 or 40), not d = 128: the students' last layer has
  as many. Cost: no distillation stage to train (the paper's 50 000 iterations on ImageNet), but the descriptor
  is not the paper's compact, metric-learned one, and for p = 33 its receptive field (19 px) is smaller than p.
- dense evaluation: the paper evaluates every p x p patch (fast dense feature extraction, one descriptor per
  pixel); here each student is the same stack run over the whole image with zero ("same") padding, so its
  pooling layers make it strided (p = 17: 1, 33: 4, 65: 8, the teacher levels' strides but for 17, whose output
  is average-pooled to the teacher's stride-4 grid), and the map is upsampled bilinearly to the input. Cost: a
  map at 1/4 or 1/8 of the input's resolution (small defects are blurred into a few cells), and positions near
  the border see zeros where the paper's patches would see the image.
- the CPU recipe: one patch size, 65 (the paper averages 17, 33 and 65: ``patch_sizes: [17, 33, 65]``; per pixel
  p = 17 costs 15 times the multiply-adds of 65, its 256-channel layers at full resolution, and 33 1.3 times);
  the students at a quarter of the paper's channels (``width`` 0.25: 32/64 for 128/256; a student 0.34 G
  multiply-adds a 160 px image against 4.6 G, 0.15 M parameters against 2.3 M); ``epochs`` 12 at lr 1e-3 (the
  paper: 100 at 1e-4) on cached teacher features (trainer/flows.py's FeatureCache: the backbone runs once per
  training image); input 160 px (the paper: 256).

Measured (benchmarks/protocol.py --dataset elpv --cell mono|poly --models uninformed-students --seeds 1
--threads 1, shipped settings, seed 0, 2026-12-07, a 2-core VM at load average 8-10): mono image AUROC 91.9, AP
93.5, F1 at the shipped threshold 74.3 (recall 60.1, false alarms 1.7 %), fit 1 306 s, 32 img/s; poly AUROC 80.9,
AP 80.0, F1 61.6 (recall 47.0, false alarms 3.7 %), fit 1 101 s, 43 img/s (PatchCore 94.4 / 79.6, PaDiM 95.8 /
88.0 on the same draws). The exported graph: 0.50 M parameters (three students 0.44 M, Lite0 to block 4), 2.0 MB
FP32, 1.0 MB FP16; 39 img/s at batch 1 and 29 at batch 8 through ONNX Runtime FP32 on that VM
(benchmarks/throughput.py).
With ``--set "uninformed_students.patch_sizes=[33]"`` (teacher Lite0 block 2: stride 4, receptive field 19 px)
mono falls to AUROC 82.6, AP 80.7 (fit 994 s): the finer, more local level is the worse teacher on these cells,
which is why 65 alone is shipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, List, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainer.backbones import check_tap_list, resolve_taps, role_taps
from trainer.distillation import frozen, fuse_levels
from trainer.features import BackboneTaps, config_taps
from trainer.flows import FeatureCache, Shape, pack_maps, score_and_map, unpack_maps
from trainer.ingraph import MapBlur
from trainer.loop import EpochModel, Log, LossParts, Update, resolve_device
from trainer.models import (
    DISTILLATION,
    SURFACE_DEFECTS,
    ModelDefaults,
    ModelSettings,
    RunOptions,
    register_model,
    setting,
)

if TYPE_CHECKING:
    from trainer.frames import TrainingData

LEAKY_SLOPE = 5e-3  # the paper's leaky ReLU
STD_FLOOR = 1e-6  # a constant channel (or a constant e / v) is divided by this, not by 0

# The paper's patch-descriptor networks (its supplementary), per patch size: ("conv", kernel, channels at width 1)
# or ("pool",) for a 2x2 max-pool of stride 2; channels None = the descriptor's (the teacher's channels here).
ARCHITECTURES: dict[int, list[tuple[Any, ...]]] = {
    17: [("conv", 6, 128), ("conv", 5, 256), ("conv", 5, 256), ("conv", 4, None)],
    33: [("conv", 5, 128), ("pool",), ("conv", 5, 256), ("pool",), ("conv", 2, 256), ("conv", 4, None)],
    65: [("conv", 5, 128), ("pool",), ("conv", 5, 128), ("pool",), ("conv", 5, 256), ("pool",), ("conv", 4, 256),
         ("conv", 1, None)],
}
PATCH_SIZES = tuple(sorted(ARCHITECTURES))


def student_stride(patch_size: int) -> int:
    """The output stride of the strided dense student for ``patch_size`` (2 per max-pool)."""
    return int(2 ** sum(1 for layer in ARCHITECTURES[patch_size] if layer[0] == "pool"))


class DropLastRowAndColumn(nn.Module):
    """[N,C,H+1,W+1] -> [N,C,H,W]: an even kernel's symmetric padding made "same"."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, :-1, :-1]


def patch_descriptor(patch_size: int, out_channels: int, width: float = 1.0) -> nn.Sequential:
    """The paper's descriptor network for ``patch_size`` as a dense, zero-padded ("same") stack: an image
    [N,3,H,W] -> descriptors [N, out_channels, H/stride, W/stride]; the last convolution is linear (it regresses
    the normalised teacher, which is signed)."""
    layers: list[nn.Module] = []
    channels = 3
    spec = ARCHITECTURES[patch_size]
    for i, layer in enumerate(spec):
        if layer[0] == "pool":
            layers.append(nn.MaxPool2d(2, 2))
            continue
        _, kernel, width_one = layer
        out = out_channels if width_one is None else max(1, round(width_one * width))
        # zero padding "same": an even kernel k is padded k/2 on every side, then its one extra output row and
        # column dropped (a Pad op's sizes are unknown to ONNX shape inference, which TensorRT readiness refuses)
        layers.append(nn.Conv2d(channels, out, kernel, padding=kernel // 2))
        if kernel % 2 == 0:
            layers.append(DropLastRowAndColumn())
        if i < len(spec) - 1:
            layers.append(nn.LeakyReLU(LEAKY_SLOPE))
        channels = out
    return nn.Sequential(*layers)


class StudentEnsemble(nn.Module):
    """M students of one patch size: the image [N,3,H,W] -> their descriptors [N,M,C,h,w] on the teacher's grid."""

    def __init__(self, patch_size: int, n_students: int, channels: int, width: float, grid: tuple[int, int],
                 own_grid: tuple[int, int]) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.students = nn.ModuleList(patch_descriptor(patch_size, channels, width) for _ in range(n_students))
        self.grid = grid
        # The students' grid to the teacher's: an integer average-pool when it is a multiple of it, else bilinear.
        ratio = own_grid[0] // grid[0]
        self.pool = ratio if ratio > 1 and own_grid == (grid[0] * ratio, grid[1] * ratio) else 1
        self.resample = own_grid != grid and self.pool == 1

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        outs = []
        for student in self.students:
            s = student(image)
            if self.pool > 1:
                s = F.avg_pool2d(s, self.pool)
            elif self.resample:
                s = F.interpolate(s, size=self.grid, mode="bilinear", align_corners=False)
            outs.append(s)
        return torch.stack(outs, 1)


class Scoring(nn.Module):
    """The paper's score from the teacher's maps and the students' descriptors, with the fit's constants: per
    patch size the teacher's channel mean and std, and the mean and std of e and of v over held-out positions."""

    def __init__(self, channels: list[int], hw: tuple[int, int], blur_sigma: float) -> None:
        super().__init__()
        self.n = len(channels)
        self.hw = hw
        for i, c in enumerate(channels):
            self.register_buffer(f"teacher_mean{i}", torch.zeros(1, c, 1, 1))
            self.register_buffer(f"teacher_std{i}", torch.ones(1, c, 1, 1))
            self.register_buffer(f"ev_stats{i}", torch.tensor([0.0, 1.0, 0.0, 1.0]))  # e mean, e std, v mean, v std
        self.blur = MapBlur(blur_sigma, hw) if blur_sigma > 0 else None

    def buffer(self, name: str, i: int) -> torch.Tensor:
        value = getattr(self, f"{name}{i}")
        assert isinstance(value, torch.Tensor)
        return value

    def normalised_teacher(self, i: int, teacher: torch.Tensor) -> torch.Tensor:
        return (teacher - self.buffer("teacher_mean", i)) / self.buffer("teacher_std", i)

    @staticmethod
    def error_and_variance(students: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """students [N,M,C,h,w], normalised teacher [N,C,h,w] -> e, v [N,1,h,w]: ||mean - t||^2 and
        mean_i ||s_i - mean||^2 (= mean_i ||s_i||^2 - ||mean||^2, the paper's predictive variance)."""
        mean = students.mean(1)
        error = (mean - teacher).pow(2).sum(1, keepdim=True)
        variance = (students - mean.unsqueeze(1)).pow(2).sum(2).mean(1, keepdim=True)
        return error, variance

    def scale_map(self, i: int, students: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """e~ + v~ [N,1,h,w] of patch size ``i`` from the raw teacher map [N,C,h,w]."""
        error, variance = self.error_and_variance(students, self.normalised_teacher(i, teacher))
        stats = self.buffer("ev_stats", i)
        return (error - stats[0]) / stats[1] + (variance - stats[2]) / stats[3]

    def forward(self, teachers: list[torch.Tensor], students: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        maps = [self.scale_map(i, s, t) for i, (t, s) in enumerate(zip(teachers, students, strict=True))]
        return score_and_map(fuse_levels(maps, self.hw, "mean"), self.blur, self.hw)


class UninformedStudentsGraph(nn.Module):
    """frames uint8 [N,H,W,3] BGR -> (score [N], map [N,H,W]): teacher levels and student ensembles on the same
    ImageNet-normalised image, then the scoring (kept FP32 in the FP16 graph: see ``fp32_scopes``)."""

    def __init__(self, taps: BackboneTaps, ensembles: nn.ModuleList, scoring: Scoring, level_of: list[int]) -> None:
        super().__init__()
        self.taps = taps
        self.ensembles = ensembles
        self.scoring = scoring
        self.level_of = list(level_of)

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.taps.input(frames)
        levels = self.taps.backbone.features(image, self.taps.taps)
        students = [ensemble(image) for ensemble in self.ensembles]
        return self.scoring([levels[k] for k in self.level_of], students)  # type: ignore[no-any-return]


@dataclass
class UninformedStudentsSettings(ModelSettings):
    """Uninformed Students (Bergmann et al. 2020): ensembles of patch-descriptor students regress a frozen teacher."""

    patch_sizes: List[int] = setting([65], "the students' patch sizes p, each 17, 33 or 65 px; several: their maps "
                                     "averaged (the paper's multi-scale [17, 33, 65]; 17 costs 15x 65 on CPU)")
    students: int = setting(3, "students per patch size (the paper's ensemble: 3)")
    teacher_taps: Union[List[int], str] = setting(
        "auto", "the teacher's backbone tap per patch size, or auto: the level whose receptive field is closest to "
        "p (Lite0: block 2, stride 4, for 17 and 33; block 4, stride 8, for 65)")
    width: float = setting(0.25, "the students' channels as a fraction of the paper's 128/256 (1.0: the paper's; "
                           "the CPU recipe's 0.25 costs 1/14 of its multiply-adds)")
    lr: float = setting(0.001, "Adam learning rate (the paper's 1e-4 over 100 epochs; 1e-3 for the CPU recipe's 12)")
    weight_decay: float = setting(0.00001, "Adam weight decay (the paper's 1e-5)")
    cache_mb: int = setting(1024, "host memory for the cached teacher features of the training images, MB "
                            "(Lite0 block 4 at 160 px: 64 KB an image); past it the backbone runs again")
    blur_sigma: float = setting(0.0, "Gaussian blur of the anomaly map, px (the paper has none); 0 = off")

    def validate(self) -> None:
        if not self.patch_sizes or any(p not in ARCHITECTURES for p in self.patch_sizes) \
                or len(set(self.patch_sizes)) != len(self.patch_sizes):
            raise ValueError("uninformed_students.patch_sizes must be distinct values of 17, 33 and 65")
        if isinstance(self.teacher_taps, str):
            check_tap_list(self.teacher_taps, "uninformed_students.teacher_taps")
        elif len(self.teacher_taps) != len(self.patch_sizes):
            raise ValueError("uninformed_students.teacher_taps must be auto or one tap per patch size")
        if self.students < 1 or self.width <= 0 or self.cache_mb < 0:
            raise ValueError("uninformed_students.students must be >= 1, width > 0 and cache_mb >= 0")
        if self.lr <= 0 or self.weight_decay < 0 or self.blur_sigma < 0:
            raise ValueError("uninformed_students.lr must be > 0; weight_decay and blur_sigma >= 0")


def teacher_taps_for(backbone: str, patch_sizes: list[int], taps: Union[list[int], str]) -> list[int]:
    """One teacher tap per patch size: ``taps`` as given, or auto (the ``three`` role's stride-4 level for p 17
    and 33, its stride-8 level for 65: on Lite0 the levels whose receptive fields, 19 and 67 px, are closest)."""
    if isinstance(taps, str):
        three = role_taps(backbone, "three")
        return [three[0] if p < 65 else three[1] for p in patch_sizes]
    return list(taps)


def channel_moments(sums: torch.Tensor, squares: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std (population, floored) from float64 sums and sums of squares over ``count`` values."""
    mean = sums / count
    std = (squares / count - mean.pow(2)).clamp_min(0).sqrt().clamp_min(STD_FLOOR)
    return mean.float(), std.float()


@register_model("uninformed-students", settings=UninformedStudentsSettings)
class UninformedStudents(EpochModel):
    """Uninformed Students: ensembles of students regress a frozen teacher's descriptors; their error and their
    disagreement, standardised, are the anomaly map."""

    catches = SURFACE_DEFECTS
    family = DISTILLATION
    display_name = "Uninformed Students"
    caches_features = True  # prepare() caches the teacher's features (trainer/loop.py)
    map_in_score_units = True  # score = max of the unsmoothed map (blur off by default)
    defaults = ModelDefaults(input_size=160, batch_size=8, epochs=12)
    trains_distributed = False  # the feature cache and the fit-time statistics are this process's
    # The scoring (teacher normalisation, e and v and their standardisation) stays FP32 in model.fp16.onnx: v is
    # the spread of M nearly equal student outputs and its standardisation divides by its small std, which FP16's
    # 11-bit mantissa leaves to rounding.
    fp32_scopes = ("/scoring/",)

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.cfg: UninformedStudentsSettings = config.settings_for(self.name)
        self.hw: tuple[int, int] = config.input.hw
        name = str(config.backbone.name)
        per_scale = teacher_taps_for(name, list(self.cfg.patch_sizes), self.cfg.teacher_taps)
        unique = resolve_taps(name, sorted(set(per_scale)), "three", "uninformed_students.teacher_taps")
        self.taps = frozen(config_taps(config.backbone, unique, "three", "uninformed_students.teacher_taps"))
        self.level_of = [unique.index(t) for t in per_scale]
        with torch.no_grad():
            probe = self.taps(torch.zeros(1, *self.hw, 3, dtype=torch.uint8))
        self.shapes: list[Shape] = [tuple(int(s) for s in m.shape[1:]) for m in probe]
        torch.manual_seed(int(config.seed))
        ensembles = []
        for p, k in zip(self.cfg.patch_sizes, self.level_of, strict=True):
            c, h, w = self.shapes[k]
            stride = student_stride(p)
            own = (self.hw[0] // stride, self.hw[1] // stride)
            ensembles.append(StudentEnsemble(p, self.cfg.students, c, self.cfg.width, (h, w), own))
        self.ensembles = nn.ModuleList(ensembles)
        self.scoring = Scoring([self.shapes[k][0] for k in self.level_of], self.hw, self.cfg.blur_sigma)
        self.optimizer = torch.optim.Adam(self.ensembles.parameters(), lr=self.cfg.lr,
                                          weight_decay=self.cfg.weight_decay)
        self.cache = FeatureCache(lambda frames: pack_maps(self.taps(frames)), self.cfg.cache_mb * 1_000_000)

    # -- the loop's interface ------------------------------------------------------------------------------
    def networks(self) -> dict[str, nn.Module]:
        return {"students": self.ensembles, "scoring": self.scoring}

    def updates(self) -> list[Update]:
        return [Update("students", self.optimizer, self._loss)]

    def prepare(self, frames: torch.Tensor) -> torch.Tensor:
        """The ImageNet-normalised image (the students' input) and the cached teacher maps, packed."""
        self.taps.to(frames.device)
        return torch.cat([self.taps.input(frames).flatten(1), self.cache(frames)], 1)

    def _unpacked(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        image, *levels = unpack_maps(x, [(3, *self.hw), *self.shapes])
        return image, [levels[k] for k in self.level_of]

    def _squared_errors(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per patch size, each student's mean squared error to the normalised teacher, per image [N, M]."""
        image, teachers = self._unpacked(x)
        out = []
        for i, (ensemble, teacher) in enumerate(zip(self.ensembles, teachers, strict=True)):
            target = self.scoring.normalised_teacher(i, teacher).unsqueeze(1)
            out.append((ensemble(image) - target).pow(2).mean((2, 3, 4)))
        return out

    def _loss(self, x: torch.Tensor, _shared: dict[str, Any]) -> LossParts:
        terms = [e.mean(0).sum() for e in self._squared_errors(x)]  # the sum over students of their MSEs
        value = torch.stack(terms).sum()
        return value, {"loss": value, **{f"p{p}": t for p, t in zip(self.cfg.patch_sizes, terms, strict=True)}}

    def validation_loss(self, x: torch.Tensor) -> torch.Tensor:
        """Per image the students' mean squared error, averaged over students and patch sizes."""
        return torch.stack([e.mean(1) for e in self._squared_errors(x)]).mean(0)

    def raw_score(self, x: torch.Tensor) -> torch.Tensor:
        image, teachers = self._unpacked(x)
        return self.scoring(teachers, [ensemble(image) for ensemble in self.ensembles])[0]  # type: ignore[no-any-return]

    # -- the fit: teacher statistics, the loop, then e and v statistics ------------------------------------
    def fit(self, data: TrainingData, log: Log = lambda _m: None, run: Optional[RunOptions] = None) -> dict[str, Any]:
        self.require_training_images(data)
        device = resolve_device(run.device if run is not None else "auto")
        batch = int(self.config.batch_size)
        # the loop's own frames (fixed codec draws), so this pass fills the feature cache the epochs then read
        self._teacher_statistics(data.loader(data.fit_paths, batch, fixed_draws=True), device)
        facts = super().fit(data, log, run)
        held_out = data.holdout_paths or data.fit_paths
        self._error_statistics(data.loader(held_out, batch), device)
        log(f"uninformed-students: e and v standardised on {len(held_out)} "
            f"{'held-out' if data.holdout_paths else 'fitted'} images")
        return {**facts, "ev_stats": [[round(float(v), 6) for v in self.scoring.buffer("ev_stats", i)]
                                      for i in range(len(self.ensembles))]}

    @torch.no_grad()
    def _teacher_statistics(self, loader: Any, device: torch.device) -> None:
        """Each teacher level's channel mean and std over every position of the training frames."""
        sums: dict[int, list[torch.Tensor]] = {}
        count = 0
        for frames in loader:
            _image, teachers = self._unpacked(self.prepare(frames.to(device)))
            for i, t in enumerate(teachers):
                t64 = t.double()
                acc = sums.setdefault(i, [torch.zeros_like(t64[0, :, 0, 0]), torch.zeros_like(t64[0, :, 0, 0])])
                acc[0] += t64.sum((0, 2, 3))
                acc[1] += t64.pow(2).sum((0, 2, 3))
            count += int(frames.shape[0])
        for i, (total, squares) in sums.items():
            positions = count * self.shapes[self.level_of[i]][1] * self.shapes[self.level_of[i]][2]
            mean, std = channel_moments(total, squares, positions)
            self.scoring.buffer("teacher_mean", i).copy_(mean.view(1, -1, 1, 1))
            self.scoring.buffer("teacher_std", i).copy_(std.view(1, -1, 1, 1))

    @torch.no_grad()
    def _error_statistics(self, loader: Any, device: torch.device) -> None:
        """The mean and std of e and of v over every position of ``loader``'s frames, per patch size."""
        self.ensembles.to(device).eval()
        self.scoring.to(device)
        moments = np.zeros((len(self.ensembles), 4))  # sum e, sum e^2, sum v, sum v^2
        count = np.zeros(len(self.ensembles))
        for frames in loader:
            image, teachers = self._unpacked(self.prepare(frames.to(device)))
            for i, (ensemble, teacher) in enumerate(zip(self.ensembles, teachers, strict=True)):
                e, v = Scoring.error_and_variance(ensemble(image), self.scoring.normalised_teacher(i, teacher))
                e64, v64 = e.double(), v.double()
                moments[i] += [float(e64.sum()), float(e64.pow(2).sum()), float(v64.sum()), float(v64.pow(2).sum())]
                count[i] += e.numel()
        for i in range(len(self.ensembles)):
            e_mean, e_std = channel_moments(torch.tensor(moments[i, 0]), torch.tensor(moments[i, 1]), int(count[i]))
            v_mean, v_std = channel_moments(torch.tensor(moments[i, 2]), torch.tensor(moments[i, 3]), int(count[i]))
            self.scoring.buffer("ev_stats", i).copy_(torch.stack([e_mean, e_std, v_mean, v_std]))

    def fit_facts(self) -> dict[str, Any]:
        return {"patch_sizes": list(self.cfg.patch_sizes), "students": self.cfg.students,
                "teacher_taps": [list(self.taps.taps)[k] for k in self.level_of],
                "teacher_levels": [list(self.shapes[k]) for k in self.level_of],
                "student_parameters": sum(p.numel() for p in self.ensembles.parameters()),
                "feature_cache": self.cache.facts()}

    # -- export --------------------------------------------------------------------------------------------
    def map_shape(self) -> tuple[int, int]:
        return self.hw

    def export_checks(self, max_batch: int, max_elements: int) -> dict[str, Any]:
        return {"max_batch": max_batch, "teacher_levels": [list(self.shapes[k]) for k in self.level_of]}

    def export_module(self) -> nn.Module:
        self.taps.cpu().eval()
        self.ensembles.cpu().eval()
        self.scoring.cpu().eval()
        return UninformedStudentsGraph(self.taps, self.ensembles, self.scoring, self.level_of).eval()
