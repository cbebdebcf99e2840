"""What every model file stands on: the registry, the model interface and the settings base class.

Like timm's ``register_model``: a model is one file that declares its class and its settings dataclass and
registers both by name (``@register_model("<name>", settings=<Settings>)``). The config loader asks this
registry for the dataclass of each model's section and never imports a model file by name; nothing here
imports a model file or the config module, so the circle config -> models -> config cannot form.

Where models are found: every module of this package, and every module of the extra packages named by
``register_plugin_package("<package>")`` or by the environment variable ``EDGE_TRAIN_MODEL_PACKAGES``
(comma-separated importable package names). A model file is named after its model, dashes as underscores
(``skip-ganomaly`` -> ``skip_ganomaly.py``), so ``known_model_names`` answers from file names without
importing torch; modules named ``base`` or starting with ``_`` hold no model.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import importlib.util
import os
import pkgutil
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, TypeVar

import numpy as np

from core.errors import UserError

if TYPE_CHECKING:  # this module stays torch-free, so a wrong --model answers before torch loads
    from torch import nn

    from trainer.frames import TrainingData

# What a model catches (``AnomalyModel.catches``), listed by ``edge-train fit --help`` and docs/training.md.
SURFACE_DEFECTS = "patch features: local surface defects (scratches, spots, cracks)"
FOREIGN_OBJECTS = "image-level: wrong or foreign objects, whole-image departures"

# The family a model belongs to (``AnomalyModel.family``): how the literature groups the methods, and how
# ``edge-train fit --help`` and the README's table list them (in this order).
FEATURE_MEMORY = "pretrained features: memory banks and Gaussians"
NORMALIZING_FLOWS = "normalizing flows on pretrained features"
DISTILLATION = "knowledge distillation: students that imitate a frozen teacher"
SYNTHETIC_ANOMALIES = "synthetic anomalies: classifiers of the defects the model paints itself"
ONE_CLASS = "one-class boundaries: a compact region of normality"
SELF_SUPERVISED = "self-supervised: transformation and contrastive tasks"
GENERATIVE = "generative reconstruction: GANs and autoencoders"
FAMILIES = (FEATURE_MEMORY, NORMALIZING_FLOWS, DISTILLATION, SYNTHETIC_ANOMALIES, ONE_CLASS, SELF_SUPERVISED,
            GENERATIVE)

BUILTIN_PACKAGE = "trainer.models"
PLUGIN_ENV = "EDGE_TRAIN_MODEL_PACKAGES"  # comma-separated packages whose modules are model files too
NOT_MODEL_MODULES = frozenset({"base"})  # modules of a model package that hold no model

_REGISTRY: dict[str, type[AnomalyModel]] = {}
_SETTINGS: dict[str, type[ModelSettings]] = {}
_PLUGINS: list[str] = []
_IMPORTED: set[str] = set()  # packages whose modules have all been imported
M = TypeVar("M", bound="type[AnomalyModel]")


def setting(default: Any, doc: str) -> Any:
    """A settings field with its default and its one-line doc (config/train.yaml's comment, ``fit --help``).

    A list or dict default is copied for every instance (a dataclass field cannot share a mutable default).
    """
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass
class ModelSettings:
    """Base of a model's settings section; a subclass's docstring opens the section in config/train.yaml.

    Declare each key with ``setting(default, doc)``; ``validate`` raises ValueError naming the key (the loader
    turns it into ``file:line: ...``).
    """

    def validate(self) -> None:
        """Check the values together; raise ValueError with a message that names the key."""


def field_docs(settings: type[ModelSettings]) -> list[tuple[str, Any, str]]:
    """(key, default, doc) of each field of a settings class, in declaration order."""
    out = []
    for f in dataclasses.fields(settings):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        out.append((f.name, default, str(f.metadata.get("doc", ""))))
    return out


def settings_title(settings: type[ModelSettings]) -> str:
    """The settings class's own docstring, as one line ('' when it has none)."""
    doc = settings.__dict__.get("__doc__") or ""
    if doc.startswith(settings.__name__ + "("):  # the signature @dataclass writes when there is no docstring
        return ""
    return " ".join(doc.split())


@dataclass(frozen=True)
class ModelDefaults:
    """What a model uses for the keys a config leaves at null.

    How frames of other sizes and aspect ratios are fitted (``input.resize``) is no per-model default: both
    families keep ``stretch``, which measured best on mixed sizes for a pretrained-feature surface model and for
    an image-level one (ELPV solar cells cropped to aspect ratios 0.6 to 1.67 and 100 to 600 px: PatchCore image
    AUROC 0.908 stretch, 0.884 letterbox, 0.877 crop; Mahalanobis AD 0.868 stretch, 0.857 letterbox;
    docs/training.md, "Images as they come"). Stretch spends every input pixel on the part; letterbox spends
    some on black bars whose edges move with each image's shape, and crop never sees the edges. A grey image is
    no default either: it reaches every model as B = G = R (core/preprocess.py), the pretrained backbones see grey
    in all three channels, and ``input.channels: auto`` makes the models trained from scratch learn one channel.
    """

    input_size: int = 160
    batch_size: int = 16
    epochs: Optional[int] = None


@dataclass
class RunOptions:
    """Where and how a fit runs (the pipeline sets it from the CLI and config; models trained by epochs use it)."""

    device: str = "auto"
    amp: bool = True
    select: str = "auto"
    checkpoint_dir: Optional[Path] = None
    resume: bool = False
    fingerprint: str = ""
    log_every: int = 20
    progress: bool = True
    stop_after_epoch: Optional[int] = None  # tests: behave as if Ctrl-C came at the end of this epoch


class AnomalyModel(ABC):
    """What the trainer needs from a model. Subclasses take the whole TrainConfig in ``__init__``.

    A model reads its own section with ``config.settings_for(self.name)``. ``defaults`` fills the config keys
    left at null (input size, batch size, epochs). ``scales_scores``: the export graph min-max scales its score
    with constants from calibration data (``set_score_range``). ``catches``: the kind of anomaly the model is
    for (SURFACE_DEFECTS or FOREIGN_OBJECTS). ``map_in_score_units``: the anomaly map is in the score's units
    (the score is the peak of the unsmoothed map), so the report's overlays can mark the threshold itself on
    their colour scale. ``display_name``: how people write the model's name (the paper's spelling).
    ``family``: the method family (one of FAMILIES). ``station_form``: set by a model that has no station export
    (AnoGAN: a search per image), the model a station runs instead; its fit skips the export with one line saying
    so (``no_export_reason``), scores calibration and test data with ``score`` in torch and writes no bundle.
    """

    name: str = ""
    display_name: str = ""
    catches: str = ""
    family: str = ""
    trains_with_epochs: bool = False
    trains_distributed: bool = False  # can fit under torchrun with several processes (trainer/distributed.py)
    learns_from_defects: bool = False  # trains on labelled defects too (DIR/train/<kind>/, TrainingData.known_defects)
    defaults = ModelDefaults()
    scales_scores: bool = False
    map_in_score_units: bool = False
    fp32_scopes: tuple[str, ...] = ()
    station_form: str = ""  # a model with no station export: the model whose bundle a station runs instead
    no_export_reason: str = ""  # why it has none (the export stage's line)

    def __init__(self, config: Any) -> None:
        self.config = config

    @abstractmethod
    def fit(self, data: TrainingData, log: Callable[[str], None] = lambda _m: None,
            run: Optional[RunOptions] = None) -> dict[str, Any]:
        """Learn from the normal images of ``data``; returns facts for the report (sizes, timings, history)."""

    def require_training_images(self, data: TrainingData) -> None:
        """One line, before any work, when ``data`` has no image to fit on."""
        if not data.fit_paths:
            raise UserError(f"{self.name}: no training images to fit on; add images to train/good")

    @abstractmethod
    def export_module(self) -> nn.Module:
        """The eval-mode module that the ONNX file is exported from (frames -> score, anomaly_map)."""

    @abstractmethod
    def map_shape(self) -> tuple[int, int]:
        """(h, w) of the anomaly map the export module returns."""

    def score(self, images: np.ndarray, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
        """Scores and maps of uint8 BGR images through the export module (torch), in batches."""
        from trainer.export import torch_scores

        return torch_scores(self.export_module(), images, batch_size)

    def export_checks(self, max_batch: int, max_elements: int) -> dict[str, Any]:
        """Validate that the export stays within bounds at ``max_batch``; returns what was checked."""
        return {}

    def export_batch_limit(self, max_elements: int, n_images: Optional[int] = None) -> Optional[int]:
        """The largest batch whose intermediates stay within ``max_elements``; None when the batch is not bounded
        by it. The export stage lowers export.max_batch to it (with a note) rather than fail after the fit.
        ``n_images``: the frames the fit will hold, for a limit known before the fit (None: the fitted model's)."""
        return None

    def size_checks(self, n_images: int) -> None:
        """A UserError when fitting ``n_images`` frames would make something the export cannot hold (a feature
        bank past an ONNX file's 2 GB); called before the fit, so the user hears it at once."""
        return None

    def preflight(self, n_images: int, max_batch: int, max_elements: int) -> int:
        """Before anything is fitted: the export bounds this model meets with ``n_images`` fitted frames (the data's
        size is known then). Returns the export batch the export stage will use (``max_batch``, or lower where the
        bound asks: that stage says so); raises a UserError for a bound that cannot be met, at once rather than
        after minutes of fitting."""
        self.size_checks(n_images)
        limit = self.export_batch_limit(max_elements, n_images)
        if limit is None or limit >= max_batch:
            return max_batch
        if limit < 1:
            raise UserError(f"{self.name}: one frame's largest intermediate already exceeds "
                            f"export.max_distance_elements {max_elements} at input {self.config.input.height}x"
                            f"{self.config.input.width}; lower the input size or raise export.max_distance_elements")
        return limit

    def set_score_range(self, low: float, high: float) -> None:
        """Scale exported scores to (raw - low) / (high - low); only for models with ``scales_scores``."""
        raise NotImplementedError(f"{self.name} does not scale its scores")


def section_key(name: str) -> str:
    """The config section of model ``name``: its name with dashes as underscores (``skip-ganomaly:`` is not a
    YAML-friendly key; ``skip_ganomaly:`` is)."""
    return name.replace("-", "_")


def register_model(name: str, settings: Optional[type[ModelSettings]] = None) -> Callable[[M], M]:
    """Class decorator: make a model available as ``edge-train fit --model name``, its ``settings`` dataclass
    as the config section ``section_key(name)``."""
    if settings is not None and not (isinstance(settings, type) and issubclass(settings, ModelSettings)
                                     and dataclasses.is_dataclass(settings)):
        raise TypeError(f"model '{name}': settings must be a @dataclass subclass of ModelSettings")

    def deco(cls: M) -> M:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"model name '{name}' registered twice ({_REGISTRY[name].__module__}, {cls.__module__})")
        cls.name = name
        if not cls.display_name:
            cls.display_name = name
        _REGISTRY[name] = cls
        if settings is not None:
            _SETTINGS[name] = settings
        return cls

    return deco


def register_plugin_package(package: str) -> None:
    """Also find models in the modules of ``package`` (importable; one model file each, like this package)."""
    if package not in _PLUGINS:
        _PLUGINS.append(package)


def unregister_plugin_package(package: str) -> None:
    """Forget ``package`` and the models its modules registered (tests that add a model for a while)."""
    if package in _PLUGINS:
        _PLUGINS.remove(package)
    _IMPORTED.discard(package)
    for name in [n for n, cls in _REGISTRY.items() if cls.__module__.startswith(package + ".")]:
        del _REGISTRY[name]
        _SETTINGS.pop(name, None)


def model_packages() -> list[str]:
    """The packages whose modules are model files: this one, then the registered and the environment's."""
    from_env = [p.strip() for p in os.environ.get(PLUGIN_ENV, "").split(",") if p.strip()]
    packages = [BUILTIN_PACKAGE]
    for package in (*_PLUGINS, *from_env):
        if package not in packages:
            packages.append(package)
    return packages


def _package_paths(package: str) -> list[str]:
    """The folders of ``package`` without importing it (its parent packages are imported)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError) as exc:
        raise UserError(f"model package '{package}' ({PLUGIN_ENV} or register_plugin_package) cannot be "
                        f"found ({exc}); put it on PYTHONPATH or remove it") from None
    if spec is None or spec.submodule_search_locations is None:
        raise UserError(f"model package '{package}' ({PLUGIN_ENV} or register_plugin_package) is not an "
                        "importable package; put it on PYTHONPATH or remove it")
    return list(spec.submodule_search_locations)


def _model_modules(package: str) -> list[str]:
    return sorted(info.name for info in pkgutil.iter_modules(_package_paths(package))
                  if not info.name.startswith("_") and info.name not in NOT_MODEL_MODULES)


def _discover() -> None:
    for package in model_packages():
        if package not in _IMPORTED:
            for module in _model_modules(package):
                importlib.import_module(f"{package}.{module}")
            _IMPORTED.add(package)


def known_model_names() -> list[str]:
    """Model names from the file names of the model packages, without importing torch (fast argument checks)."""
    return sorted({module.replace("_", "-") for package in model_packages() for module in _model_modules(package)})


def check_model_name(name: str) -> None:
    """A UserError listing the known models when ``name`` is not one (no torch import)."""
    known = known_model_names()
    if name not in known:
        raise UserError(f"unknown model '{name}'; known models: {', '.join(known) or 'none'}")


def list_models() -> list[str]:
    """Registered model names, sorted."""
    _discover()
    return sorted(_REGISTRY)


def model_catalogue() -> list[tuple[str, str]]:
    """(name, what it catches) of every registered model, sorted by name (imports the models, so torch)."""
    return [(name, get_model_class(name).catches) for name in list_models()]


def model_sections() -> dict[str, type[ModelSettings]]:
    """Config section key -> settings class of every registered model that has settings, sorted by model name.

    Imports every model file (so torch): the config loader calls it to learn the sections it accepts.
    """
    _discover()
    return {section_key(name): _SETTINGS[name] for name in sorted(_SETTINGS)}


def section_models() -> dict[str, type[AnomalyModel]]:
    """Config section key -> the model class it belongs to, in ``model_sections`` order."""
    _discover()
    return {section_key(name): _REGISTRY[name] for name in sorted(_SETTINGS)}


def settings_class(name: str) -> Optional[type[ModelSettings]]:
    """The settings class model ``name`` registered (None when it has no settings)."""
    get_model_class(name)
    return _SETTINGS.get(name)


def get_model_class(name: str) -> type[AnomalyModel]:
    """The class registered as ``name``; an unknown name is a UserError listing the known ones."""
    _discover()
    if name not in _REGISTRY:
        raise UserError(f"unknown model '{name}'; known models: {', '.join(sorted(_REGISTRY)) or 'none'}")
    return _REGISTRY[name]


def create_model(name: str, config: Any) -> AnomalyModel:
    """Instantiate the model registered as ``name`` with ``config`` (its null keys resolved to the model's defaults)."""
    cls = get_model_class(name)
    config.resolve(cls.defaults)
    return cls(config)
