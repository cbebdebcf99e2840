"""The trainer's configuration schema (config/train.yaml), loaded with line-numbered errors.

Every field here is documented in config/train.yaml; CLI flags override the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from core.configfile import load_config, parse_config
from core.preprocess import RESIZE_MODES

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "train.yaml"


# Lite0 feature taps: -1 = stem, 0..15 = the last block of each stage, 16 = head (mirrors
# trainer.backbones.FEATURE_INFO, checked by a test).
BACKBONE_TAPS = (-1, 0, 2, 4, 7, 10, 14, 15, 16)


def _check_taps(taps: List[int], key: str, at_least: int = 1) -> None:
    if len(taps) < at_least or sorted(set(taps)) != taps or any(t not in BACKBONE_TAPS for t in taps):
        raise ValueError(f"{key} must be {at_least} or more increasing taps from {list(BACKBONE_TAPS)} "
                         "(-1 = stem, 16 = head)")


@dataclass
class InputConfig:
    """Model input size and how frames are fitted to it on the host (the edge fits them the same way).

    None = the model's own default size (PatchCore 160, GANomaly 64, ...), filled in by ``resolve``.
    """

    height: Optional[int] = None
    width: Optional[int] = None
    resize: str = "stretch"
    channels: str = "auto"

    def validate(self) -> None:
        if self.channels not in ("auto", "gray", "colour"):
            raise ValueError("input.channels must be auto, gray or colour")
        for value in (self.height, self.width):
            if value is None:
                continue
            if not 32 <= value <= 1024:
                raise ValueError("input height and width must be between 32 and 1024")
            if value % 16:
                raise ValueError("input height and width must be multiples of 16 (the backbone's stride)")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"input.resize must be one of {', '.join(RESIZE_MODES)}")

    @property
    def hw(self) -> tuple[int, int]:
        """(height, width); only valid after TrainConfig.resolve filled in the model's defaults."""
        if self.height is None or self.width is None:
            raise RuntimeError("input size not resolved: call TrainConfig.resolve(model_class) first")
        return self.height, self.width


@dataclass
class BackboneConfig:
    """Pretrained feature extractor."""

    name: str = "efficientnet_lite0"
    weights: Optional[str] = None
    layers: List[int] = field(default_factory=lambda: [2, 4])

    def validate(self) -> None:
        if self.name != "efficientnet_lite0":
            raise ValueError(f"backbone.name '{self.name}' is not known; use efficientnet_lite0")
        layers = self.layers
        if len(layers) != 2 or sorted(set(layers)) != layers or not all(0 <= i <= 15 for i in layers):
            raise ValueError("backbone.layers must be two increasing block indices in 0..15, e.g. [2, 4]")


@dataclass
class PatchCoreConfig:
    """PatchCore (Roth et al. 2022) hyper-parameters."""

    neighbourhood: int = 3
    projection_dim: int = 0
    coreset_ratio: float = 0.025
    coreset_projection_dim: int = 128
    max_bank_size: int = 20000
    coreset_candidates: int = 200000
    blur_sigma: float = 4.0

    def validate(self) -> None:
        if self.neighbourhood < 1 or self.neighbourhood % 2 == 0:
            raise ValueError("patchcore.neighbourhood must be an odd number >= 1")
        if not 0.0 < self.coreset_ratio <= 1.0:
            raise ValueError("patchcore.coreset_ratio must be in (0, 1]")
        if self.projection_dim < 0 or self.coreset_projection_dim < 0:
            raise ValueError("patchcore projection dims must be >= 0 (0 = off)")
        if self.coreset_candidates < 0:
            raise ValueError("patchcore.coreset_candidates must be >= 0 (0 = every patch)")
        if self.max_bank_size < 1 or self.blur_sigma < 0:
            raise ValueError("patchcore.max_bank_size must be >= 1 and blur_sigma >= 0")


@dataclass
class PadimConfig:
    """PaDiM (Defard et al. 2021): a Gaussian per feature-map position."""

    layers: List[int] = field(default_factory=lambda: [2, 4, 7])
    channels: int = 100
    covariance_eps: float = 0.01
    blur_sigma: float = 4.0

    def validate(self) -> None:
        _check_taps(self.layers, "padim.layers")
        if self.channels < 0:
            raise ValueError("padim.channels must be >= 0 (0 = every concatenated channel)")
        if self.covariance_eps <= 0 or self.blur_sigma < 0:
            raise ValueError("padim.covariance_eps must be > 0 and blur_sigma >= 0")


@dataclass
class SpadeConfig:
    """SPADE (Cohen & Hoshen 2020): kNN of pooled image features; the map by patch kNN among the neighbours."""

    stages: List[int] = field(default_factory=lambda: [14, 15, 16])
    k: int = 50
    map_layers: List[int] = field(default_factory=lambda: [4, 7])
    map_neighbours: int = 10
    blur_sigma: float = 4.0

    def validate(self) -> None:
        _check_taps(self.stages, "spade.stages")
        _check_taps(self.map_layers, "spade.map_layers")
        if self.k < 1 or self.map_neighbours < 1:
            raise ValueError("spade.k and spade.map_neighbours must be >= 1")
        if self.blur_sigma < 0:
            raise ValueError("spade.blur_sigma must be >= 0")


@dataclass
class MahalanobisConfig:
    """Mahalanobis AD (Rippel et al. 2020): a Gaussian per backbone level of pooled features."""

    stages: List[int] = field(default_factory=lambda: [-1, 0, 2, 4, 7, 10, 14, 15, 16])
    blur_sigma: float = 4.0

    def validate(self) -> None:
        _check_taps(self.stages, "mahalanobis.stages")
        if self.blur_sigma < 0:
            raise ValueError("mahalanobis.blur_sigma must be >= 0")


@dataclass
class CalibrationConfig:
    """How the score threshold is chosen."""

    holdout_fraction: float = 0.2
    method: str = "auto"
    quantile: float = 0.99
    margin: float = 0.5
    sigmas: float = 3.0

    def validate(self) -> None:
        if not 0.0 < self.holdout_fraction < 0.9:
            raise ValueError("calibration.holdout_fraction must be in (0, 0.9)")
        if self.method not in ("auto", "f1", "quantile"):
            raise ValueError("calibration.method must be auto, f1 or quantile")
        if not 0.5 <= self.quantile <= 1.0:
            raise ValueError("calibration.quantile must be in [0.5, 1]")
        if self.margin < 0:
            raise ValueError("calibration.margin must be >= 0")
        if self.sigmas < 0:
            raise ValueError("calibration.sigmas must be >= 0")


@dataclass
class CodecAugmentConfig:
    """Codec-robust training (trainer/degrade.py): degraded copies of the still images of normal parts."""

    enabled: Optional[bool] = None  # None = auto: on when any training image is a still
    copies: int = 1
    jpeg_quality: List[int] = field(default_factory=lambda: [50, 95])
    brightness: float = 0.04
    contrast: float = 0.05

    def validate(self) -> None:
        if not 1 <= self.copies <= 8:
            raise ValueError("codec_augment.copies must be in 1..8")
        q = self.jpeg_quality
        if len(q) != 2 or not 1 <= q[0] <= q[1] <= 100:
            raise ValueError("codec_augment.jpeg_quality must be [low, high] with 1 <= low <= high <= 100")
        if not 0 <= self.brightness <= 0.5 or not 0 <= self.contrast <= 0.5:
            raise ValueError("codec_augment.brightness and contrast must be in [0, 0.5] (fractions)")


@dataclass
class RetrainConfig:
    """``edge-train retrain``: what the challenger is compared on and the rule that promotes it."""

    fresh_fraction: float = 0.25
    duplicate_difference: float = 1.5
    auroc_tolerance: float = 0.0
    false_alarm_tolerance: float = 0.0
    miss_tolerance: float = 0.0

    def validate(self) -> None:
        if not 0.0 < self.fresh_fraction < 1.0:
            raise ValueError("retrain.fresh_fraction must be in (0, 1)")
        if not 0.0 <= self.duplicate_difference <= 64.0:
            raise ValueError("retrain.duplicate_difference must be in [0, 64] grey levels (0 = exact duplicates only)")
        if not 0.0 <= self.auroc_tolerance <= 0.5:
            raise ValueError("retrain.auroc_tolerance must be in [0, 0.5]")
        if not 0.0 <= self.false_alarm_tolerance <= 1.0 or not 0.0 <= self.miss_tolerance <= 1.0:
            raise ValueError("retrain.false_alarm_tolerance and miss_tolerance must be in [0, 1]")


@dataclass
class ExportConfig:
    """ONNX export and the bounds that keep the graph runnable on TensorRT / ONNX Runtime."""

    opset: int = 17
    max_batch: int = 16
    max_distance_elements: int = 2097152
    fp16: bool = True
    score_only: bool = True

    def validate(self) -> None:
        if self.opset < 17:
            raise ValueError("export.opset must be >= 17")
        if self.max_batch < 1:
            raise ValueError("export.max_batch must be >= 1")
        if not 1 <= self.max_distance_elements < 2**31:
            raise ValueError("export.max_distance_elements must be in [1, 2^31)")


@dataclass
class TrainingConfig:
    """The shared training loop (trainer/loop.py) of every model trained by epochs."""

    workers: int = 2
    select: str = "auto"
    amp: bool = True
    log_every: int = 20

    def validate(self) -> None:
        if self.workers < 0:
            raise ValueError("training.workers must be >= 0")
        if self.select not in ("auto", "last", "val_loss", "val_auroc"):
            raise ValueError("training.select must be auto, last, val_loss or val_auroc")
        if self.log_every < 1:
            raise ValueError("training.log_every must be >= 1")


@dataclass
class GanomalyConfig:
    """GANomaly (Akcay et al. 2018); defaults are the official code's."""

    nz: int = 100
    ngf: int = 64
    ndf: int = 64
    lr: float = 0.0002
    beta1: float = 0.5
    w_adv: float = 1.0
    w_con: float = 50.0
    w_enc: float = 1.0
    map_sigma: float = 2.0

    def validate(self) -> None:
        _check_gan(self.lr, self.beta1, self.map_sigma, "ganomaly")
        if min(self.nz, self.ngf, self.ndf) < 1:
            raise ValueError("ganomaly.nz, ngf and ndf must be >= 1")
        if min(self.w_adv, self.w_con, self.w_enc) < 0:
            raise ValueError("ganomaly loss weights must be >= 0")


@dataclass
class SkipGanomalyConfig:
    """Skip-GANomaly (Akcay et al. 2019); loss weights and score mix are the paper's."""

    ngf: int = 64
    ndf: int = 64
    lr: float = 0.0002
    beta1: float = 0.5
    w_adv: float = 1.0
    w_con: float = 40.0
    w_lat: float = 1.0
    score_lambda: float = 0.9
    map_sigma: float = 2.0

    def validate(self) -> None:
        _check_gan(self.lr, self.beta1, self.map_sigma, "skip_ganomaly")
        if min(self.ngf, self.ndf) < 1:
            raise ValueError("skip_ganomaly.ngf and ndf must be >= 1")
        if min(self.w_adv, self.w_con, self.w_lat) < 0:
            raise ValueError("skip_ganomaly loss weights must be >= 0")
        if not 0.0 <= self.score_lambda <= 1.0:
            raise ValueError("skip_ganomaly.score_lambda must be in [0, 1]")


@dataclass
class GeomConfig:
    """GEOM (Golan & El-Yaniv 2018): a Wide ResNet classifying geometric transformations; defaults are the paper's."""

    transformations: int = 72
    depth: int = 10
    width: int = 4
    per_image: int = 8
    lr: float = 0.001
    score: str = "dirichlet"

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


def _check_gan(lr: float, beta1: float, map_sigma: float, key: str) -> None:
    if lr <= 0 or not 0 <= beta1 < 1:
        raise ValueError(f"{key}.lr must be > 0 and beta1 in [0, 1)")
    if map_sigma < 0:
        raise ValueError(f"{key}.map_sigma must be >= 0")


@dataclass
class DeepSvddConfig:
    """Deep SVDD (Ruff et al. 2018); defaults are the official code's MNIST run (trainer/models/deep_svdd.py)."""

    objective: str = "one-class"
    nu: float = 0.1
    widths: List[int] = field(default_factory=list)
    rep_dim: int = 0
    pretrain_epochs: int = 150
    lr: float = 0.0001
    weight_decay: float = 0.5e-6
    pretrain_weight_decay: float = 0.5e-3
    lr_milestone: int = 50
    centre_eps: float = 0.1
    warm_up_epochs: int = 10
    map_sigma: float = 2.0

    def validate(self) -> None:
        if self.objective not in ("one-class", "soft-boundary"):
            raise ValueError("deep_svdd.objective must be one-class or soft-boundary")
        if not 0.0 < self.nu <= 1.0:
            raise ValueError("deep_svdd.nu must be in (0, 1]")
        if len(self.widths) > 4 or any(w < 1 for w in self.widths):
            # 4 levels pool 16x: inputs are multiples of 16, so every level halves evenly
            raise ValueError("deep_svdd.widths must be up to 4 channel counts >= 1 ([] = the paper's net)")
        if self.rep_dim < 0 or self.pretrain_epochs < 0 or self.lr_milestone < 0 or self.warm_up_epochs < 0:
            raise ValueError("deep_svdd.rep_dim, pretrain_epochs, lr_milestone and warm_up_epochs must be >= 0")
        if self.lr <= 0 or self.weight_decay < 0 or self.pretrain_weight_decay < 0:
            raise ValueError("deep_svdd.lr must be > 0 and the weight decays >= 0")
        if self.centre_eps < 0 or self.map_sigma < 0:
            raise ValueError("deep_svdd.centre_eps and map_sigma must be >= 0")


@dataclass
class ReportConfig:
    """What goes into report.json and the PNG plots."""

    overlays: int = 6  # hardest cases per side in hardest_cases.png; 0: no grid
    parity_frames: int = 8


@dataclass
class TrainConfig:
    """Top level of config/train.yaml."""

    model: str = "patchcore"
    seed: int = 0
    device: str = "auto"
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    input: InputConfig = field(default_factory=InputConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    patchcore: PatchCoreConfig = field(default_factory=PatchCoreConfig)
    ganomaly: GanomalyConfig = field(default_factory=GanomalyConfig)
    skip_ganomaly: SkipGanomalyConfig = field(default_factory=SkipGanomalyConfig)
    padim: PadimConfig = field(default_factory=PadimConfig)
    spade: SpadeConfig = field(default_factory=SpadeConfig)
    mahalanobis: MahalanobisConfig = field(default_factory=MahalanobisConfig)
    deep_svdd: DeepSvddConfig = field(default_factory=DeepSvddConfig)
    geom: GeomConfig = field(default_factory=GeomConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    codec_augment: CodecAugmentConfig = field(default_factory=CodecAugmentConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def validate(self) -> None:
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError("epochs must be >= 1")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError("device must be auto, cpu, cuda or cuda:N")

    def resolve(self, defaults: ModelDefaults, all_gray: Optional[bool] = None) -> TrainConfig:
        """Fill the keys left at null or auto with the model's defaults and the data's facts; returns self.

        ``all_gray``: every training image is single-channel (from the data scan); ``input.channels: auto``
        then becomes gray, else colour.
        """
        if self.input.channels == "auto" and all_gray is not None:
            self.input.channels = "gray" if all_gray else "colour"
        if self.input.height is None:
            self.input.height = defaults.input_size
        if self.input.width is None:
            self.input.width = defaults.input_size
        if self.batch_size is None:
            self.batch_size = defaults.batch_size
        if self.epochs is None and defaults.epochs is not None:
            self.epochs = defaults.epochs
        return self


@dataclass(frozen=True)
class ModelDefaults:
    """What a model uses for the keys a config leaves at null."""

    input_size: int = 160
    batch_size: int = 16
    epochs: Optional[int] = None


def load_train_config(path: Optional[str | Path] = None) -> TrainConfig:
    """Load ``path`` (default config/train.yaml next to the package; built-in defaults if that is absent)."""
    if path is None:
        return load_config(DEFAULT_CONFIG, TrainConfig) if DEFAULT_CONFIG.is_file() else TrainConfig()
    return load_config(path, TrainConfig)


def parse_train_config(text: str, source: str = "<train config>") -> TrainConfig:
    """Parse YAML text (tests, overrides)."""
    return parse_config(text, TrainConfig, source=source)
