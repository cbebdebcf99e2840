"""The trainer's configuration schema (config/train.yaml), loaded with line-numbered errors.

The sections every run shares are declared here; each model's section is the settings dataclass its own file
registers (trainer/models/base.py), found through the registry, so this module never names a model. The full
schema class is built from the registry when first needed (``train_config_schema``), which imports the model
files and so torch: the CLI checks its arguments before. ``config/train.yaml``'s model sections are generated
from the same registry (``render_train_yaml``, ``edge-train config --dump``). CLI flags override the file.
"""

from __future__ import annotations

import dataclasses
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence, Union

import yaml

from core.configfile import load_config, parse_config
from core.errors import UserError
from core.preprocess import RESIZE_MODES
from core.thresholds import DEFAULT_FALSE_ALARM_RATE, DEFAULT_POLICY, DEFAULT_RECALL, Policy
from trainer.models.base import (
    AnomalyModel,
    ModelDefaults,
    ModelSettings,
    field_docs,
    model_sections,
    section_key,
    section_models,
    settings_title,
)

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "train.yaml"
DEFAULT_MODEL = "patchcore"  # the one place the default model is named (tests/test_model_names.py)

# config/train.yaml's generated part lies between these two lines (``render_train_yaml``).
BEGIN_MODELS = "# ---- model sections: generated from the models' settings by `edge-train config --dump`; edit the"
BEGIN_MODELS_2 = "# ---- defaults and docs in trainer/models/<model>.py, then regenerate ----"
END_MODELS = "# ---- end of the generated model sections ----"
# calibration.method, from before calibration.policy: what each value is read as
LEGACY_METHODS = {"auto": DEFAULT_POLICY, "f1": "best-f1", "quantile": "quantile"}
COMMENT_COLUMN = 26  # where a key's comment starts in config/train.yaml
LINE_WIDTH = 118


MAX_TILES = 8  # input.tiles per side: 8 x 8 tiles of 160 px is a 1280 px frame, 64 model passes a frame
MAX_TILE_OVERLAP = 0.5  # input.tile_overlap: beyond half, tiles mostly repeat each other


@dataclass
class InputConfig:
    """Model input size and how frames are fitted to it on the host (the edge fits them the same way).

    None = the model's own default size (its ``ModelDefaults.input_size``), filled in by ``resolve``.
    ``tiles`` = [rows, cols] (trainer/tiling.py): the station sends frames of rows*height x cols*width
    (``frame_hw``), and the exported graph scores their tiles of height x width (``hw``) in one batch;
    ``tile_overlap`` > 0 makes neighbouring tiles share that share of themselves (the frame is smaller by it).
    """

    height: Optional[int] = None
    width: Optional[int] = None
    resize: str = "stretch"
    channels: str = "auto"
    tiles: Optional[List[int]] = None
    tile_overlap: float = 0.0

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
        if self.tiles is not None and (len(self.tiles) != 2 or not all(1 <= t <= MAX_TILES for t in self.tiles)):
            raise ValueError(f"input.tiles must be [rows, cols], each 1..{MAX_TILES} (e.g. [2, 2]), or null: no tiling")
        if not 0.0 <= self.tile_overlap <= MAX_TILE_OVERLAP:
            raise ValueError(f"input.tile_overlap must be between 0 and {MAX_TILE_OVERLAP} (a share of a tile)")

    @property
    def hw(self) -> tuple[int, int]:
        """(height, width) of the model's input (a tile's, with tiling); only valid after TrainConfig.resolve
        filled in the model's defaults."""
        if self.height is None or self.width is None:
            raise RuntimeError("input size not resolved: call TrainConfig.resolve(model_class) first")
        return self.height, self.width

    @property
    def tile_grid(self) -> Optional[tuple[int, int]]:
        """(rows, cols) with tiling, else None."""
        return None if self.tiles is None else (int(self.tiles[0]), int(self.tiles[1]))

    @property
    def tile_stride(self) -> tuple[int, int]:
        """(sh, sw): from one tile to the next, the tile less its overlap (the tile's size: side by side)."""
        h, w = self.hw
        return h - round(h * self.tile_overlap), w - round(w * self.tile_overlap)

    @property
    def frame_hw(self) -> tuple[int, int]:
        """(height, width) of the frames the station sends and the exported graph takes: ``hw`` without tiling,
        height + (rows-1)*sh x width + (cols-1)*sw with it (rows*height x cols*width without overlap)."""
        (h, w), (sh, sw) = self.hw, self.tile_stride
        rows, cols = self.tile_grid or (1, 1)
        return h + (rows - 1) * sh, w + (cols - 1) * sw


@dataclass
class BackboneConfig:
    """Pretrained feature extractor (trainer/backbones.py): a Lite variant or any timm CNN by name.

    ``weights``: a state-dict file; empty = the Lite package's weights or timm's hub cache; ``random`` = untrained
    (tests only). ``layers``: the memory-bank model's two taps, or ``auto`` (the backbone's stride-4/8 pair on Lite,
    stride 8/16 elsewhere); the taps of a backbone must fit it, which is checked when the model is built.
    """

    name: str = "efficientnet_lite0"
    weights: Optional[str] = None
    layers: Union[List[int], str] = "auto"

    def validate(self) -> None:
        if not self.name or not all(ch.isalnum() or ch in "_.-" for ch in self.name):
            raise ValueError(f"backbone.name '{self.name}' is not a backbone name: efficientnet_lite0, "
                             "efficientnet_lite1, efficientnet_lite2 or a timm model such as wide_resnet50_2")
        layers = self.layers
        if isinstance(layers, str):
            if layers != "auto":
                raise ValueError("backbone.layers must be auto or two increasing taps, e.g. [2, 4]")
        elif len(layers) != 2 or sorted(set(layers)) != layers:
            raise ValueError("backbone.layers must be auto or two increasing taps, e.g. [2, 4]")


@dataclass
class CalibrationConfig:
    """How the score threshold (the operating point a station acts on) is chosen: core/thresholds.py's policies."""

    holdout_fraction: float = 0.2
    policy: str = DEFAULT_POLICY
    target_false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE
    target_recall: float = DEFAULT_RECALL
    quantile: float = 0.99
    margin: float = 0.5
    sigmas: float = 3.0
    method: Optional[str] = None  # before calibration.policy: auto = the default policy, f1 = best-f1, quantile

    def validate(self) -> None:
        if not 0.0 < self.holdout_fraction < 0.9:
            raise ValueError("calibration.holdout_fraction must be in (0, 0.9)")
        if self.method not in (None, *LEGACY_METHODS):
            raise ValueError("calibration.method is replaced by calibration.policy: write policy: false-alarm-rate, "
                             "recall, best-f1 or quantile instead")
        if self.method in ("f1", "quantile") and self.policy != DEFAULT_POLICY:
            raise ValueError(f"calibration.method {self.method} and calibration.policy {self.policy} are both set: "
                             f"keep only policy (method {self.method} is policy {LEGACY_METHODS[self.method]})")
        if not 0.5 <= self.quantile <= 1.0:
            raise ValueError("calibration.quantile must be in [0.5, 1]")
        if self.margin < 0:
            raise ValueError("calibration.margin must be >= 0")
        if self.sigmas < 0:
            raise ValueError("calibration.sigmas must be >= 0")
        self.rule()  # the policy's name and targets

    def rule(self) -> Policy:
        """The policy in force: ``policy``, or what a config written before policies meant by ``method``."""
        name = LEGACY_METHODS[self.method] if self.method in ("f1", "quantile") else self.policy
        return Policy(name, self.target_false_alarm_rate, self.target_recall, self.quantile, self.margin, self.sigmas)

    def legacy_note(self) -> Optional[str]:
        """What a config's ``method`` key is read as, for the fit's notes; None without one."""
        if self.method is None:
            return None
        return (f"calibration.method {self.method} (a key from before calibration.policy) is read as "
                f"calibration.policy {LEGACY_METHODS[self.method]}; write that instead")


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
    labelled_train_fraction: float = 0.5

    def validate(self) -> None:
        if not 0.0 < self.fresh_fraction < 1.0:
            raise ValueError("retrain.fresh_fraction must be in (0, 1)")
        if not 0.0 < self.labelled_train_fraction < 1.0:
            raise ValueError("retrain.labelled_train_fraction must be in (0, 1)")
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
class ReportConfig:
    """What goes into report.json and the PNG plots."""

    overlays: int = 6  # hardest cases per side in hardest_cases.png; 0: no grid
    parity_frames: int = 8


@dataclass
class TrainConfig:
    """Top level of config/train.yaml: the shared sections; each registered model's section is added to it.

    ``TrainConfig()`` returns an instance of the full schema (``train_config_schema()``, a subclass with one
    field per model section), so ``dataclasses.asdict`` of any config carries every section, as before.
    """

    model: str = DEFAULT_MODEL
    seed: int = 0
    device: str = "auto"
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    input: InputConfig = field(default_factory=InputConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    codec_augment: CodecAugmentConfig = field(default_factory=CodecAugmentConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def __new__(cls, *args: Any, **kwargs: Any) -> TrainConfig:
        if cls is TrainConfig:  # the shared part alone is never a whole config: build the full schema's
            cls = train_config_schema()
        return super().__new__(cls)

    def __reduce__(self) -> tuple[Any, ...]:
        # the full schema class is made at run time, so pickle (and deepcopy) rebuild through the registry
        return _rebuild_train_config, (dict(self.__dict__),)

    def settings_for(self, model: str) -> Any:
        """The settings section of ``model`` (its registered settings dataclass instance)."""
        key = section_key(model)
        if key not in {f.name for f in dataclasses.fields(self)}:
            raise UserError(f"model '{model}' has no settings section '{key}' in this config")
        return getattr(self, key)

    def validate(self) -> None:
        check_device(self.device)
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError("epochs must be >= 1")

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


def check_device(device: str) -> None:
    """A ValueError unless ``device`` is auto, cpu, cuda or cuda:N (torch-free: the CLI checks --device early)."""
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError("device must be auto, cpu, cuda or cuda:N")


_SCHEMAS: dict[tuple[tuple[str, type], ...], type[TrainConfig]] = {}


def train_config_schema() -> type[TrainConfig]:
    """TrainConfig plus one field per registered model section (the model files are imported: torch)."""
    sections = tuple(model_sections().items())
    if sections not in _SCHEMAS:
        clashes = [key for key, _ in sections if key in {f.name for f in dataclasses.fields(TrainConfig)}]
        if clashes:
            raise ValueError(f"model section(s) {clashes} clash with the shared config sections; rename the model")
        fields = [(key, settings, field(default_factory=settings)) for key, settings in sections]
        schema = dataclasses.make_dataclass("TrainConfig", fields, bases=(TrainConfig,))
        schema.__module__ = __name__
        _SCHEMAS[sections] = schema
    return _SCHEMAS[sections]


def _rebuild_train_config(state: dict[str, Any]) -> TrainConfig:
    config = object.__new__(train_config_schema())
    config.__dict__.update(state)
    return config


def load_train_config(path: Optional[str | Path] = None) -> TrainConfig:
    """Load ``path`` (default config/train.yaml next to the package; built-in defaults if that is absent)."""
    if path is None:
        return load_config(DEFAULT_CONFIG, train_config_schema()) if DEFAULT_CONFIG.is_file() else TrainConfig()
    return load_config(path, train_config_schema())


def parse_train_config(text: str, source: str = "<train config>") -> TrainConfig:
    """Parse YAML text (tests, overrides)."""
    return parse_config(text, train_config_schema(), source=source)


def parse_override(text: str) -> tuple[str, Any]:
    """A benchmark's ``--set a.b=VALUE`` (VALUE read as YAML: 0.1, true, [4, 10]); the schema checks the key when
    the config is parsed. ValueError (argparse's type errors) for text that is not KEY=VALUE."""
    key, sep, value = text.partition("=")
    if not sep or not re.fullmatch(r"[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)*", key.strip()):
        raise ValueError(f"{text!r}: expected KEY=VALUE with a dotted config key, e.g. epochs=12 or input.height=64")
    return key.strip(), yaml.safe_load(value)


def merge_config(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over``'s keys on ``base``, nested dicts merged key by key (neither is changed)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merge_config(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out


def with_overrides(cfg: dict[str, Any], overrides: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    """``cfg`` with each dotted ``(key, value)`` of ``parse_override`` set."""
    for key, value in overrides:
        *parents, leaf = key.split(".")
        nested: dict[str, Any] = {leaf: value}
        for part in reversed(parents):
            nested = {part: nested}
        cfg = merge_config(cfg, nested)
    return cfg


# -- config/train.yaml's model sections, generated from the registry -----------------------------------------


def yaml_value(value: Any) -> str:
    """``value`` written as config/train.yaml shows it (floats always with a dot, so YAML 1.1 reads a number)."""
    if isinstance(value, float):
        text = repr(value)
        mantissa, _, exponent = text.partition("e")
        if exponent and "." not in mantissa:
            text = f"{mantissa}.0e{exponent}"
        return text
    if isinstance(value, list):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    dumped = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return dumped[:-4].rstrip() if dumped.endswith("\n...") else dumped


def _commented(first: str, doc: str) -> list[str]:
    """``first`` followed by ``# doc`` at COMMENT_COLUMN, the doc wrapped onto aligned comment lines."""
    if not doc:
        return [first]
    return textwrap.wrap(doc, width=LINE_WIDTH, initial_indent=first.ljust(COMMENT_COLUMN - 1) + " # ",
                         subsequent_indent=" " * COMMENT_COLUMN + "# ", break_long_words=False,
                         break_on_hyphens=False)


def _comment_lines(text: str) -> list[str]:
    return textwrap.wrap(text, width=LINE_WIDTH, initial_indent="  # ", subsequent_indent="  # ",
                         break_long_words=False, break_on_hyphens=False)


def settings_yaml(key: str, settings: type[ModelSettings], model: type[AnomalyModel]) -> list[str]:
    """One model's section: its title and what it is for as comments, then each key, its default and its doc."""
    d = model.defaults
    epochs = f"epochs {d.epochs}" if d.epochs is not None else "no epochs (epochs is ignored)"
    lines = [f"{key}:"]
    title = settings_title(settings)
    if title:
        lines += _comment_lines(title)
    lines += _comment_lines(f"--model {model.name}, for {model.catches or 'what its file says'}; the null keys "
                            f"above become input {d.input_size} px, batch_size {d.batch_size}, {epochs}.")
    for name, default, doc in field_docs(settings):
        lines += _commented(f"  {name}: {yaml_value(default)}", doc)
    return lines


def model_sections_yaml() -> str:
    """Every registered model's section, as config/train.yaml holds them between the markers."""
    models = section_models()
    blocks = ["\n".join(settings_yaml(key, settings, models[key])) for key, settings in model_sections().items()]
    return "\n\n".join(blocks) + "\n"


def render_train_yaml(text: str, source: str = str(DEFAULT_CONFIG)) -> str:
    """``text`` (a train.yaml) with the part between the markers replaced by the registry's model sections."""
    lines = text.splitlines(keepends=True)
    stripped = [line.rstrip("\n") for line in lines]
    try:
        begin = stripped.index(BEGIN_MODELS)
        end = stripped.index(END_MODELS)
    except ValueError:
        raise UserError(f"{source}: no generated model sections (a line '{BEGIN_MODELS}' ... and a line "
                        f"'{END_MODELS}'); start from the shipped config/train.yaml") from None
    if end < begin or stripped[begin + 1] != BEGIN_MODELS_2:
        raise UserError(f"{source}: the markers of the generated model sections are out of order; restore them")
    return "".join(lines[:begin + 2]) + "\n" + model_sections_yaml() + "\n" + "".join(lines[end:])
