"""The model bundle: engines/<model>/<version>/ with model.onnx, manifest.json and what the trainer measured.

This module is the one definition of the bundle format. The trainer writes bundles through it and the
edge reads them through it, so the two can never disagree. A bundle holds no pickled Python: a station
never executes code from a file it loads.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import BundleError
from core.files import atomic_write_text, sha256_file
from core.preprocess import DEFAULT_RESIZE, RESIZE_MODES

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CURRENT = "current"
HISTORY = "history.jsonl"  # engines/<model>/history.jsonl: one line per promotion, oldest first (rollback reads it)
PLANS_DIR = "plans"  # TensorRT engines built on the device; not part of the checksummed bundle
ONNX_FP32 = "model.onnx"
ONNX_FP16 = "model.fp16.onnx"
ONNX_SCORE = "model.score.onnx"  # optional: the FP32 graph with the score output only (no anomaly map computed)
_VERSION_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]*$")


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk and its manifest."""

    path: Path
    manifest: dict[str, Any]

    @property
    def model_name(self) -> str:
        return str(self.manifest["model"]["name"])

    @property
    def version(self) -> str:
        return str(self.manifest["model"]["version"])

    @property
    def input_name(self) -> str:
        return str(self.manifest["input"]["name"])

    @property
    def input_hw(self) -> tuple[int, int]:
        spec = self.manifest["input"]
        return int(spec["height"]), int(spec["width"])

    @property
    def input_resize(self) -> str:
        """How frames are fitted to ``input_hw`` (one of RESIZE_MODES); "stretch" for bundles that predate the key."""
        return str(self.manifest["input"].get("resize", DEFAULT_RESIZE))

    @property
    def max_batch(self) -> int | None:
        """The largest batch the graph was exported and bounded for; None when the trainer set no limit."""
        value = self.manifest["input"].get("max_batch")
        return int(value) if isinstance(value, int) and value > 0 else None

    @property
    def threshold(self) -> float:
        return float(self.manifest["calibration"]["threshold"])

    @property
    def score_baseline(self) -> float:
        """Typical score of a good part (calibration's normal median); 0 when the trainer recorded none."""
        value = self.manifest["calibration"].get("normal_median", 0.0)
        return float(value) if isinstance(value, (int, float)) else 0.0

    @property
    def output_names(self) -> list[str]:
        return [str(o["name"]) for o in self.manifest["outputs"]]

    @property
    def onnx_path(self) -> Path:
        return self.path / ONNX_FP32

    @property
    def onnx_fp16_path(self) -> Path | None:
        p = self.path / ONNX_FP16
        return p if p.exists() else None

    @property
    def onnx_score_path(self) -> Path | None:
        """The score-only graph, for stations that never read the map; None in bundles made without one."""
        return self.path / ONNX_SCORE if ONNX_SCORE in self.manifest["files"] else None

    @property
    def plans_dir(self) -> Path:
        return self.path / PLANS_DIR


def new_version_dir(engines_root: Path, model_name: str, now: _dt.datetime | None = None) -> Path:
    """Create and return a fresh, empty version folder named by UTC time (sortable, unique)."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    base = now.strftime("%Y%m%dT%H%M%SZ")
    model_dir = engines_root / model_name
    model_dir.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        name = base if n == 1 else f"{base}-{n}"
        candidate = model_dir / name
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise BundleError(f"{model_dir}: cannot allocate a new version folder; remove old versions")


def _bundle_files(bundle_dir: Path) -> list[Path]:
    files = []
    for p in sorted(bundle_dir.rglob("*")):
        rel = p.relative_to(bundle_dir)
        if not p.is_file() or rel.parts[0] == PLANS_DIR or p.name == MANIFEST or p.name.startswith("."):
            continue
        files.append(p)
    return files


def write_manifest(bundle_dir: Path, *, model_name: str, input_spec: dict[str, Any],
                   outputs: list[dict[str, Any]], calibration: dict[str, Any],
                   training_data: dict[str, Any], metrics: dict[str, Any],
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write manifest.json with the sha256 of every other file in the bundle; returns the manifest.

    Call it last, after every other file of the bundle is written.
    """
    if "threshold" not in calibration:
        raise ValueError("calibration must contain 'threshold'")
    if "resize" in input_spec and input_spec["resize"] not in RESIZE_MODES:
        raise ValueError(f"input_spec resize must be one of {', '.join(RESIZE_MODES)}, not {input_spec['resize']!r}")
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "model": {"name": model_name, "version": bundle_dir.name},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "input": {"name": "frames", "dtype": "uint8", "layout": "NHWC", "colour_order": "BGR", **input_spec},
        "outputs": outputs,
        "calibration": calibration,
        "training_data": training_data,
        "metrics": metrics,
        **(extra or {}),
        "files": {str(p.relative_to(bundle_dir)): sha256_file(p) for p in _bundle_files(bundle_dir)},
    }
    atomic_write_text(bundle_dir / MANIFEST, json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest


def promote(bundle_dir: Path, reason: str = "promoted") -> None:
    """Mark ``bundle_dir`` as its model's current version (atomic; earlier versions stay for rollback) and
    append the promotion to the model's history (what ``rollback`` walks back through)."""
    bundle = load_bundle(bundle_dir)  # never promote a bundle the edge would refuse
    model_dir = bundle_dir.parent
    _check_same_model(bundle, model_dir)
    line = json.dumps({"version": bundle_dir.name, "at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
                       "reason": reason})
    with open(model_dir / HISTORY, "a", encoding="utf-8") as fh:  # appends of one short line are atomic
        fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    atomic_write_text(model_dir / CURRENT, bundle_dir.name + "\n")


def _manifest_model(bundle_dir: Path) -> str | None:
    """The model name a version folder's manifest gives (read, not verified); None when it gives none."""
    try:
        name = json.loads((bundle_dir / MANIFEST).read_text(encoding="utf-8"))["model"]["name"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return None
    return name if isinstance(name, str) else None


def _check_same_model(bundle: Bundle, model_dir: Path) -> None:
    """Refuse a bundle of another model than the one ``model_dir`` holds (its current version's, else its other
    versions'): a station following ``model_dir/current`` would run a model nobody chose for it."""
    held: tuple[str, str] | None = None
    current = model_dir / CURRENT
    if current.is_file():
        try:
            version = read_current(model_dir)
        except BundleError:
            version = ""
        name = _manifest_model(model_dir / version) if _VERSION_RE.match(version) else None
        if name is not None:
            held = (name, f"its current version {version} is a '{name}' bundle")
    if held is None:
        for sibling in sorted(model_dir.iterdir()):
            name = _manifest_model(sibling) if sibling != bundle.path and sibling.is_dir() else None
            if name is not None:
                held = (name, f"version {sibling.name} there is a '{name}' bundle")
                break
    if held is not None and held[0] != bundle.model_name:
        raise BundleError(f"{bundle.path}: a '{bundle.model_name}' bundle cannot become the current version of "
                          f"{model_dir}, which holds model '{held[0]}' ({held[1]}); move it to a folder of "
                          f"'{bundle.model_name}' bundles (engines/{bundle.model_name}/) and promote it there")


def promotion_history(model_dir: Path) -> list[str]:
    """The promotion stack, oldest first: each promotion pushes its version, each rollback pops the version it
    rolled back from. Versions promoted before the history existed are not in it."""
    path = model_dir / HISTORY
    if not path.is_file():
        return []
    stack: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
            version, reason = entry["version"], str(entry.get("reason", ""))
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # a torn last line (power cut mid-append) is skipped, not fatal
        if not isinstance(version, str) or not _VERSION_RE.match(version):
            continue
        if reason.startswith("rollback") and len(stack) >= 2 and stack[-2] == version:
            stack.pop()
        else:
            stack.append(version)
    return stack


def previous_version(model_dir: Path) -> str:
    """The version that was current before the current one was promoted (the history first, else the newest
    older version folder). Rolling back twice goes two promotions back."""
    current = read_current(model_dir)
    stack = promotion_history(model_dir)
    if stack and stack[-1] == current:
        earlier = [v for v in stack[:-1] if v != current and (model_dir / v / MANIFEST).is_file()]
        if earlier:
            return earlier[-1]
    older = sorted(d.name for d in model_dir.iterdir() if (d / MANIFEST).is_file() and d.name < current)
    if not older or (stack and stack[-1] == current):
        raise BundleError(f"{model_dir}: no version promoted before {current} to roll back to")
    return older[-1]


def rollback(model_dir: Path) -> Path:
    """Make the previously promoted version current again (verified first); returns its folder."""
    target = model_dir / previous_version(model_dir)
    promote(target, reason=f"rollback from {read_current(model_dir)}")
    return target


def read_current(model_dir: Path) -> str:
    """The version name in ``model_dir/current``; one BundleError line when it cannot be read."""
    current = model_dir / CURRENT
    try:
        return current.read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"{current}: unreadable ({type(exc).__name__}); it must hold one version folder "
                          "name; re-promote a version") from None


def resolve_bundle_dir(ref: str | Path, engines_root: Path | None = None) -> Path:
    """A bundle folder, a model folder (its ``current``), or a model name under ``engines_root``."""
    path = Path(ref)
    if not path.exists() and engines_root is not None and _VERSION_RE.match(str(ref)):
        path = engines_root / str(ref)
    if not path.exists():
        where = f" or under {engines_root}" if engines_root is not None else ""
        raise BundleError(f"{ref}: no bundle here{where}; name a bundle folder engines/<model>/<version>, a model "
                          "folder engines/<model> or a model's name, or train one with 'edge-train fit'")
    if (path / MANIFEST).exists():
        return path
    current = path / CURRENT
    if current.is_file():
        version = read_current(path)
        if not _VERSION_RE.match(version) or not (path / version).is_dir():
            raise BundleError(f"{current}: names version '{version}', which is not a folder here; "
                              "re-promote a version or retrain")
        return path / version
    raise BundleError(f"{path}: neither a bundle (no {MANIFEST}) nor a model folder with a '{CURRENT}' file")


def load_bundle(ref: str | Path, engines_root: Path | None = None, verify: bool = True) -> Bundle:
    """Resolve, read and verify a bundle; any problem is one BundleError line."""
    bundle_dir = resolve_bundle_dir(ref, engines_root)
    manifest_path = bundle_dir / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{manifest_path}: missing; this folder is not a complete bundle") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{manifest_path}: unreadable or corrupt ({exc}); retrain or restore it") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{manifest_path}: not a JSON object; retrain or restore it")
    fmt = manifest.get("format_version")
    if fmt != FORMAT_VERSION:
        raise BundleError(f"{manifest_path}: bundle format version {fmt!r}, this runtime reads "
                          f"{FORMAT_VERSION}; re-export the bundle with a matching trainer")
    for key, kind in (("model", dict), ("input", dict), ("outputs", list), ("calibration", dict), ("files", dict)):
        if not isinstance(manifest.get(key), kind):
            json_kind = "object" if kind is dict else "list"
            raise BundleError(f"{manifest_path}: '{key}' missing or not a JSON {json_kind}; the bundle is "
                              "incomplete or corrupt, retrain it")
    files = manifest["files"]
    if not all(isinstance(k, str) and isinstance(v, str) and ".." not in Path(k).parts and not Path(k).is_absolute()
               for k, v in files.items()):
        raise BundleError(f"{manifest_path}: 'files' must map paths inside the bundle to sha256 strings; "
                          "the manifest is corrupt, retrain the bundle")
    if not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in manifest["outputs"]) or \
            not all(isinstance(manifest["model"].get(k), str) for k in ("name", "version")):
        raise BundleError(f"{manifest_path}: 'model' or 'outputs' malformed; the manifest is corrupt, retrain it")
    try:
        float(manifest["calibration"]["threshold"])
        int(manifest["input"]["height"]), int(manifest["input"]["width"])
    except (KeyError, TypeError, ValueError):
        raise BundleError(f"{manifest_path}: calibration threshold or input size missing or invalid; "
                          "retrain the bundle") from None
    resize = manifest["input"].get("resize", DEFAULT_RESIZE)
    if resize not in RESIZE_MODES:
        raise BundleError(f"{manifest_path}: input.resize {resize!r} is not one this runtime knows "
                          f"({', '.join(RESIZE_MODES)}); re-export the bundle with one of them or update this runtime")
    if ONNX_FP32 not in manifest["files"]:
        raise BundleError(f"{manifest_path}: lists no {ONNX_FP32}; the bundle is incomplete, retrain it")
    if verify:
        for rel, expected in manifest["files"].items():
            f = bundle_dir / rel
            if not f.is_file():
                raise BundleError(f"{f}: listed in the manifest but missing; restore the bundle or retrain")
            if sha256_file(f) != expected:
                raise BundleError(f"{f}: checksum does not match the manifest (corrupt or modified); "
                                  "restore the bundle or retrain")
    return Bundle(path=bundle_dir, manifest=manifest)
