"""The TensorRT plan cache of a bundle (``plans/``): which plan belongs to this device, and whether to trust it.

A serialized TensorRT engine is only valid for the TensorRT version and the GPU it was built with, and for
the ONNX file it was built from. So a plan is named by a key of exactly those facts plus the build settings
(precision, maximum batch, DLA core), and a key record beside it (``<key>.json``) repeats them in full. A plan
is loaded only when its record equals the key of this device and this ONNX file; otherwise it is rebuilt,
never trusted. Pure functions: no TensorRT needed, so all of it is tested on any machine.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from core.files import atomic_write_bytes

PRECISIONS = ("fp16", "fp32")
PLAN_SUFFIX = ".plan"
RECORD_SUFFIX = ".json"
_SLUG_RE = re.compile(r"[^0-9a-z.]+")


def slug(text: str) -> str:
    """A file-name-safe, lower-case form of a GPU name or version ('Jetson AGX Orin' → 'jetson-agx-orin')."""
    return _SLUG_RE.sub("-", text.lower()).strip("-") or "unknown"


@dataclass(frozen=True)
class PlanKey:
    """Everything a serialized engine depends on (DESIGN: TensorRT version + GPU + precision + max batch + ONNX)."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "8.7" (Orin), "9.0" (H100)
    precision: str  # "fp16" | "fp32"
    max_batch: int
    onnx_sha256: str
    dla_core: Optional[int] = None  # an engine for a DLA core is another engine

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if not re.fullmatch(r"[0-9a-f]{64}", self.onnx_sha256):
            raise ValueError(f"onnx_sha256 must be 64 hex digits, got {self.onnx_sha256!r}")

    @property
    def device_part(self) -> str:
        """TensorRT version and GPU: what a timing cache also depends on."""
        return f"trt{slug(self.tensorrt_version)}-{slug(self.gpu_name)}-sm{slug(self.compute_capability)}"

    @property
    def name(self) -> str:
        """The plan's file stem; readable, and it changes whenever any field changes."""
        dla = f"-dla{self.dla_core}" if self.dla_core is not None else ""
        return f"{self.device_part}-{self.precision}-b{self.max_batch}{dla}-{self.onnx_sha256[:16]}"

    def record(self) -> dict[str, Any]:
        return asdict(self)


def plan_path(plans_dir: Path, key: PlanKey) -> Path:
    return plans_dir / f"{key.name}{PLAN_SUFFIX}"


def record_path(plans_dir: Path, key: PlanKey) -> Path:
    return plans_dir / f"{key.name}{RECORD_SUFFIX}"


def timing_cache_path(plans_dir: Path, key: PlanKey) -> Path:
    """One timing cache per TensorRT version and GPU, shared by the plans built there (faster rebuilds)."""
    return plans_dir / f"timing-{key.device_part}.cache"


@dataclass(frozen=True)
class PlanDecision:
    """What to do on start: ``load`` the cached plan, or ``build`` (and why, for the log)."""

    action: str  # "load" | "build"
    path: Path
    reason: str


def decide(plans_dir: Path, key: PlanKey) -> PlanDecision:
    """Load the plan only when it and its key record exist and the record equals ``key``; else build."""
    path, record = plan_path(plans_dir, key), record_path(plans_dir, key)
    others = sorted(p.name for p in plans_dir.glob(f"*{PLAN_SUFFIX}") if p != path) if plans_dir.is_dir() else []
    elsewhere = (f"; {len(others)} plan(s) for other devices, TensorRT versions, settings or ONNX files "
                 "left as they are") if others else ""
    if not path.is_file():
        return PlanDecision("build", path, f"no plan for this device and ONNX file yet ({path.name}){elsewhere}")
    try:
        stored = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return PlanDecision("build", path, f"{path.name} has no readable key record ({record.name}); "
                                           "a plan is never loaded unverified")
    expected = key.record()
    if not isinstance(stored, dict) or stored != expected:
        got = stored if isinstance(stored, dict) else {}
        diff = [f"{k} {got.get(k)!r} != {v!r}" for k, v in expected.items() if got.get(k) != v]
        return PlanDecision("build", path, f"{path.name} was built for another key ({'; '.join(diff) or 'malformed'})")
    return PlanDecision("load", path, f"cached plan {path.name} matches this device and ONNX file")


def write_plan(plans_dir: Path, key: PlanKey, plan: bytes) -> Path:
    """Write the plan, then its key record, each atomically: a reader sees a verified pair or rebuilds."""
    plans_dir.mkdir(parents=True, exist_ok=True)
    path, record = plan_path(plans_dir, key), record_path(plans_dir, key)
    record.unlink(missing_ok=True)  # while the plan is being replaced it must not look verified
    atomic_write_bytes(path, plan)
    atomic_write_bytes(record, (json.dumps(key.record(), indent=2, sort_keys=True) + "\n").encode("utf-8"))
    return path


def write_timing_cache(plans_dir: Path, key: PlanKey, data: bytes) -> None:
    plans_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(timing_cache_path(plans_dir, key), data)


@dataclass(frozen=True)
class BuildSource:
    """Which ONNX file a TensorRT version builds a precision from, and how (DESIGN: the bundle)."""

    onnx: str  # core.bundle.ONNX_FP32 or ONNX_FP16
    strongly_typed: bool  # precision from the graph's own types
    fp16_flag: bool  # BuilderFlag.FP16 (TensorRT < 11 only)
    note: str = ""


def build_source(tensorrt_major: int, precision: str, has_fp16_onnx: bool, dla: bool = False) -> BuildSource:
    """FP16 from the strongly typed ``model.fp16.onnx`` on TensorRT 10/11, FP32 graph + FP16 flag on 8.x.

    TensorRT 11 has no FP16 builder flag: without an FP16 graph it can only build FP32 (said in ``note``).
    A DLA build below 11 takes the FP32 graph + FP16 flag (the documented DLA path: the builder places
    each layer on the DLA or, with GPU fallback, the GPU).
    """
    from core.bundle import ONNX_FP16, ONNX_FP32

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return BuildSource(ONNX_FP32, strongly_typed=tensorrt_major >= 11, fp16_flag=False)
    if dla and tensorrt_major < 11:
        return BuildSource(ONNX_FP32, strongly_typed=False, fp16_flag=True,
                           note="DLA: FP32 graph with the FP16 flag; the builder places layers on the DLA or the GPU")
    if tensorrt_major >= 10 and has_fp16_onnx:
        return BuildSource(ONNX_FP16, strongly_typed=True, fp16_flag=False)
    if tensorrt_major >= 11:
        return BuildSource(ONNX_FP32, strongly_typed=True, fp16_flag=False,
                           note=f"the bundle has no {ONNX_FP16} and TensorRT 11 has no FP16 flag: building FP32; "
                                "re-export the bundle with export.fp16: true")
    note = "" if tensorrt_major < 10 else f"the bundle has no {ONNX_FP16}: FP32 graph with the FP16 flag"
    return BuildSource(ONNX_FP32, strongly_typed=False, fp16_flag=True, note=note)
