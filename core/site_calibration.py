"""The station's on-site calibration file, read without the station: ``state_dir/<station>.calibration.json``.

``edge-run --calibrate N`` measures a bundle version's threshold on the station's own stream and keeps it as
station state (edge/calibration.py writes it); the bundle itself never changes. The trainer reads the same file
to judge a current bundle at the threshold the station really runs it at when a new bundle challenges it. This
module is the file's one reader, torch-free and free of the station's modules, so both sides can stand on it.
"""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Optional

from core.bundle import Bundle
from core.errors import UserError

CALIBRATION_FORMAT = 1
SUFFIX = ".calibration.json"


@dataclass(frozen=True)
class SiteCalibration:
    """The station's threshold and good-part statistics, measured on its own stream, for one bundle version."""

    model: str
    model_version: str
    threshold: float
    baseline: float  # median score of the good frames: where the close level's band starts
    sigma: float  # their standard deviation: the unit of the drift alarm
    frames: int
    quantile: float
    margin: float
    sigmas: float
    created: str  # ISO-8601 UTC
    # the policy it was chosen by (core/thresholds.py); files written before policies used the quantile rule
    policy: str = "quantile"
    target: Optional[float] = None  # the policy's target false-alarm rate or recall; None for quantile / best-f1
    defects: int = 0  # labelled defect frames of this version it saw (the station's collected labels)
    expected_false_alarm_rate: Optional[float] = None
    expected_recall: Optional[float] = None  # on those defects; None without any

    def applies_to(self, bundle: Bundle) -> bool:
        return (self.model, self.model_version) == (bundle.model_name, bundle.version)

    def describe(self) -> str:
        defects = f" and {self.defects} labelled defects" if self.defects else ""
        return f"on-site calibration of {self.frames} frames{defects}, policy {self.policy}, {self.created}"


def calibration_path(state_dir: str | Path, station: str) -> Path:
    """Where station ``station`` keeps its on-site calibration in ``state_dir``."""
    return Path(state_dir) / f"{station}{SUFFIX}"


def stations_calibrated(state_dir: str | Path) -> list[str]:
    """The station ids with an on-site calibration file in ``state_dir``, sorted."""
    return sorted(p.name[:-len(SUFFIX)] for p in Path(state_dir).glob(f"*{SUFFIX}") if p.is_file())


def load_site_calibration(path: Path) -> Optional[SiteCalibration]:
    """The stored calibration, None when there is none; a file that cannot be read as one is a UserError."""
    fix = "delete it to run on the bundle's threshold, or re-run edge-run --calibrate N on good parts"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the on-site calibration ({exc}); {fix}") from None
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != CALIBRATION_FORMAT:
            raise ValueError(f"not a calibration file of format {CALIBRATION_FORMAT}")
        names = {f.name for f in fields(SiteCalibration) if f.default is MISSING}
        missing = sorted(names - data.keys())
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        cal = SiteCalibration(model=str(data["model"]), model_version=str(data["model_version"]),
                              threshold=float(data["threshold"]), baseline=float(data["baseline"]),
                              sigma=float(data["sigma"]), frames=int(data["frames"]), quantile=float(data["quantile"]),
                              margin=float(data["margin"]), sigmas=float(data["sigmas"]), created=str(data["created"]),
                              policy=str(data.get("policy", "quantile")), target=_optional(data.get("target")),
                              defects=int(data.get("defects", 0)),
                              expected_false_alarm_rate=_optional(data.get("expected_false_alarm_rate")),
                              expected_recall=_optional(data.get("expected_recall")))
        if not all(math.isfinite(v) for v in (cal.threshold, cal.baseline, cal.sigma)) or cal.sigma < 0:
            raise ValueError("threshold, baseline or sigma is not a finite number")
    except (ValueError, TypeError) as exc:
        raise UserError(f"{path}: not a valid on-site calibration ({exc}); {fix}") from None
    return cal


def _optional(value: object) -> Optional[float]:
    """A float field a file may leave out or null."""
    return None if value is None else float(value)  # type: ignore[arg-type]
