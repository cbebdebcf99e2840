"""Model registry: one file a model in this package, registered by name (like timm's ``register_model``).

Adding a model = adding ``trainer/models/<name>.py`` with a class decorated ``@register_model("<name>")``
(and its test); the file is named after the model, dashes as underscores (``skip-ganomaly`` ->
``skip_ganomaly.py``), so ``known_model_names`` answers without importing torch. Every module in this package
is imported on first lookup, so no list to edit here.

A model is trained on normal images (uint8 BGR [N,H,W,3] at the input size) and hands out an export
module: ``frames uint8 [N,H,W,3] BGR -> (score float32 [N], anomaly_map float32 [N,h,w])`` with the cast,
colour order, normalisation and all scoring inside the graph, so the ONNX file is the whole model.
"""

from __future__ import annotations

import importlib
import pkgutil
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, TypeVar

import numpy as np

from core.errors import UserError
from trainer.config import ModelDefaults

if TYPE_CHECKING:  # this package's __init__ stays torch-free, so a wrong --model answers before torch loads
    from torch import nn

    from trainer.frames import TrainingData

# What a model catches (``AnomalyModel.catches``), listed by ``edge-train fit --help`` and the README.
SURFACE_DEFECTS = "patch features: local surface defects (scratches, spots, cracks)"
FOREIGN_OBJECTS = "image-level: wrong or foreign objects, whole-image departures"

_REGISTRY: dict[str, type[AnomalyModel]] = {}
_DISCOVERED = False
M = TypeVar("M", bound="type[AnomalyModel]")


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

    ``defaults`` fills the config keys left at null (input size, batch size, epochs). ``scales_scores``: the
    export graph min-max scales its score with constants from calibration data (``set_score_range``).
    ``catches``: the kind of anomaly the model is for (SURFACE_DEFECTS or FOREIGN_OBJECTS).
    ``map_in_score_units``: the anomaly map is in the score's units (the score is the peak of the unsmoothed map),
    so the report's overlays can mark the threshold itself on their colour scale.
    """

    name: str = ""
    catches: str = ""
    trains_with_epochs: bool = False
    trains_distributed: bool = False  # can fit under torchrun with several processes (trainer/distributed.py)
    defaults = ModelDefaults()
    scales_scores: bool = False
    map_in_score_units: bool = False
    fp32_scopes: tuple[str, ...] = ()

    def __init__(self, config: Any) -> None:
        self.config = config

    @abstractmethod
    def fit(self, data: TrainingData, log: Callable[[str], None] = lambda _m: None,
            run: Optional[RunOptions] = None) -> dict[str, Any]:
        """Learn from the normal images of ``data``; returns facts for the report (sizes, timings, history)."""

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

    def set_score_range(self, low: float, high: float) -> None:
        """Scale exported scores to (raw - low) / (high - low); only for models with ``scales_scores``."""
        raise NotImplementedError(f"{self.name} does not scale its scores")


def register_model(name: str) -> Callable[[M], M]:
    """Class decorator: make a model available as ``edge-train fit --model name``."""

    def deco(cls: M) -> M:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"model name '{name}' registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _discover() -> None:
    global _DISCOVERED
    if not _DISCOVERED:
        for info in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{info.name}")
        _DISCOVERED = True


def known_model_names() -> list[str]:
    """Model names from the file names of this package, without importing torch (fast argument checks)."""
    return sorted(info.name.replace("_", "-") for info in pkgutil.iter_modules(__path__)
                  if not info.name.startswith("_"))


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
