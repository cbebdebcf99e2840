"""Model registry: one file a model in this package, registered by name (like timm's ``register_model``).

Adding a model = adding ``trainer/models/<name>.py`` with a class decorated ``@register_model("<name>")``
(and its test). Every module in this package is imported on first lookup, so no list to edit here.

A model is trained on normal images (uint8 BGR [N,H,W,3] at the input size) and hands out an export
module: ``frames uint8 [N,H,W,3] BGR -> (score float32 [N], anomaly_map float32 [N,h,w])`` with the cast,
colour order, normalisation and all scoring inside the graph, so the ONNX file is the whole model.
"""

from __future__ import annotations

import importlib
import pkgutil
from abc import ABC, abstractmethod
from typing import Any, Callable, TypeVar

import numpy as np
from torch import nn

from edge.errors import UserError

_REGISTRY: dict[str, type[AnomalyModel]] = {}
_DISCOVERED = False
M = TypeVar("M", bound="type[AnomalyModel]")


class AnomalyModel(ABC):
    """What the trainer needs from a model. Subclasses take the whole TrainConfig in ``__init__``."""

    name: str = ""
    trains_with_epochs: bool = False

    def __init__(self, config: Any) -> None:
        self.config = config

    @abstractmethod
    def fit(self, images: np.ndarray, log: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
        """Learn from normal uint8 BGR images [N,H,W,3]; returns facts for the report (sizes, timings)."""

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


def list_models() -> list[str]:
    """Registered model names, sorted."""
    _discover()
    return sorted(_REGISTRY)


def get_model_class(name: str) -> type[AnomalyModel]:
    """The class registered as ``name``; an unknown name is a UserError listing the known ones."""
    _discover()
    if name not in _REGISTRY:
        raise UserError(f"unknown model '{name}'; known models: {', '.join(sorted(_REGISTRY)) or 'none'}")
    return _REGISTRY[name]


def create_model(name: str, config: Any) -> AnomalyModel:
    """Instantiate the model registered as ``name`` with the TrainConfig ``config``."""
    return get_model_class(name)(config)
