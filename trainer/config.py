"""The trainer's configuration schema (config/train.yaml), loaded with line-numbered errors.

Every field here is documented in config/train.yaml; CLI flags override the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from edge.configfile import load_config, parse_config

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "train.yaml"


@dataclass
class InputConfig:
    """Model input size; frames are resized to it on the host with cv2.resize (as the edge does)."""

    height: int = 160
    width: int = 160

    def validate(self) -> None:
        if not (32 <= self.height <= 1024 and 32 <= self.width <= 1024):
            raise ValueError("input height and width must be between 32 and 1024")
        if self.height % 16 or self.width % 16:
            raise ValueError("input height and width must be multiples of 16 (the backbone's stride)")


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
    coreset_ratio: float = 0.1
    coreset_projection_dim: int = 128
    max_bank_size: int = 20000
    blur_sigma: float = 4.0

    def validate(self) -> None:
        if self.neighbourhood < 1 or self.neighbourhood % 2 == 0:
            raise ValueError("patchcore.neighbourhood must be an odd number >= 1")
        if not 0.0 < self.coreset_ratio <= 1.0:
            raise ValueError("patchcore.coreset_ratio must be in (0, 1]")
        if self.projection_dim < 0 or self.coreset_projection_dim < 0:
            raise ValueError("patchcore projection dims must be >= 0 (0 = off)")
        if self.max_bank_size < 1 or self.blur_sigma < 0:
            raise ValueError("patchcore.max_bank_size must be >= 1 and blur_sigma >= 0")


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
class ExportConfig:
    """ONNX export and the bounds that keep the graph runnable on TensorRT / ONNX Runtime."""

    opset: int = 17
    max_batch: int = 16
    max_distance_elements: int = 33554432
    fp16: bool = True

    def validate(self) -> None:
        if self.opset < 17:
            raise ValueError("export.opset must be >= 17")
        if self.max_batch < 1:
            raise ValueError("export.max_batch must be >= 1")
        if not 1 <= self.max_distance_elements < 2**31:
            raise ValueError("export.max_distance_elements must be in [1, 2^31)")


@dataclass
class ReportConfig:
    """What goes into report.json and the PNG plots."""

    overlays: int = 4
    parity_frames: int = 8


@dataclass
class TrainConfig:
    """Top level of config/train.yaml."""

    model: str = "patchcore"
    seed: int = 0
    epochs: Optional[int] = None
    batch_size: int = 16
    input: InputConfig = field(default_factory=InputConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    patchcore: PatchCoreConfig = field(default_factory=PatchCoreConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError("epochs must be >= 1")


def load_train_config(path: Optional[str | Path] = None) -> TrainConfig:
    """Load ``path`` (default config/train.yaml next to the package; built-in defaults if that is absent)."""
    if path is None:
        return load_config(DEFAULT_CONFIG, TrainConfig) if DEFAULT_CONFIG.is_file() else TrainConfig()
    return load_config(path, TrainConfig)


def parse_train_config(text: str, source: str = "<train config>") -> TrainConfig:
    """Parse YAML text (tests, overrides)."""
    return parse_config(text, TrainConfig, source=source)
