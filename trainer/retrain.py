"""``edge-train retrain``: champion / challenger on what a station collected; promote only what is as good.

The challenger is the champion's own recipe (its report's config) fitted on the champion's training images
plus the normal frames the station collected (``edge-run``'s collection folder: train/good with JSON
sidecars), near-duplicates dropped. Both models are scored on the same hold-out, which neither trained on:
``--holdout DIR`` (an MVTec-style test/ folder) when given, else the newest ``retrain.fresh_fraction`` of the
collected normals plus the events an operator labelled (test/good = false alarms, test/<kind> = defects), and
when there are no labelled defects, synthetic defects planted in those fresh normals. The rule of
train.yaml's ``retrain`` section promotes the challenger only when its AUROC is at least the champion's
(less ``auroc_tolerance``), and its false-alarm rate and its rate of missed defects, each at its own
threshold, at most the champion's (plus ``false_alarm_tolerance`` / ``miss_tolerance``): trainer/champion.py,
the rule ``edge-train fit`` follows too. With a station's state_dir, the champion is judged at that station's
on-site threshold. A refused challenger stays on disk, not current.

Nightly jobs need more than the decision: a lock per model so two runs never overlap, idempotence (the same
inputs give "nothing new" without training again), and a failure that leaves ``current`` as it was.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import cv2
import numpy as np
import yaml

from core.bundle import Bundle, load_bundle, promote
from core.errors import UserError
from core.files import atomic_write_text
from trainer.champion import ModelScores, champion_threshold, decide, score_on
from trainer.config import RetrainConfig, TrainConfig, parse_train_config
from trainer.data import IMAGE_EXTENSIONS, known_defect_paths, list_images, read_original
from trainer.models import get_model_class
from trainer.synthetic import plant_on_frame

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

RETRAIN_DIR = "retrain"
LAST = "last.json"
Log = Callable[[str], None]


@contextmanager
def retrain_lock(model_dir: Path) -> Iterator[None]:
    """Hold ``model_dir/.retrain.lock`` (non-blocking): a second run is refused with one line."""
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / ".retrain.lock"
    with open(path, "a+", encoding="utf-8") as fh:
        if fcntl is not None:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise UserError(f"{path}: another retrain of this model is running; wait for it to finish") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        yield


def thumbnail(image: np.ndarray) -> np.ndarray:
    """A frame as 32x32 grey floats (area-averaged): what two frames of the same still part share."""
    grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.ndim == 3 else image
    return cv2.resize(grey, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32).ravel()


def drop_near_duplicates(paths: list[Path], max_difference: float) -> list[Path]:
    """``paths`` in order, without frames whose thumbnail differs from one already kept by at most
    ``max_difference`` grey levels on average (a part standing still for a second is one frame, not thirty)."""
    kept: list[Path] = []
    thumbs = np.zeros((0, 32 * 32), np.float32)
    for p in paths:
        t = thumbnail(read_original(p))
        if len(thumbs) and float(np.abs(thumbs - t).mean(axis=1).min()) <= max_difference:
            continue
        kept.append(p)
        thumbs = np.vstack([thumbs, t])
    return kept


def champion_config(champion: Bundle) -> TrainConfig:
    """The recipe the champion was fitted with (its report.json ``config``), as a TrainConfig."""
    report_path = champion.path / "report.json"
    try:
        config = json.loads(report_path.read_text(encoding="utf-8"))["config"]
        return parse_train_config(yaml.safe_dump(config), source=str(report_path))
    except (OSError, ValueError, KeyError, TypeError, UserError) as exc:
        raise UserError(f"{report_path}: cannot read the champion's training config ({exc}); "
                        "retrain needs a bundle written by edge-train fit") from None


def _link(src: Path, dst: Path) -> None:
    """``src`` (and its JSON sidecar) at ``dst`` as a hard link, a copy across file systems: the challenger's
    training set outlives the station's rotation of its collection folder, without doubling the disk it uses."""
    for a, b in ((src, dst), (src.with_suffix(".json"), dst.with_suffix(".json"))):
        if not a.is_file():
            continue
        b.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(a.resolve(), b)
        except OSError:
            shutil.copy2(a, b)


def _labelled(folder: Path) -> dict[str, list[Path]]:
    """test/<label>/ images of a station-data or hold-out folder, by label (good first)."""
    test = folder / "test"
    if not test.is_dir():
        return {}
    return {d.name: list_images(d) for d in sorted(test.iterdir(), key=lambda d: (d.name != "good", d.name))
            if d.is_dir() and list_images(d)}


def build_holdout(work: Path, fresh: list[Path], station_data: Path, holdout: Optional[Path], seed: int,
                  log: Log, taught: frozenset[Path] = frozenset()) -> tuple[Path, str]:
    """The comparison's MVTec-style folder ``work/holdout`` (test/good, test/<kind>) and how it was made; the
    labelled defects in ``taught`` (a challenger learns from them) stay out of it."""
    root = work / "holdout"
    if holdout is not None:
        groups = _labelled(holdout)
        if "good" not in groups:
            raise UserError(f"{holdout}/test/good: no good images; the hold-out needs good parts to measure "
                            "false alarms (and test/<defect>/ for defects)")
        how = f"--holdout {holdout}"
    else:
        groups = {k: [p for p in v if p not in taught] for k, v in _labelled(station_data).items()}
        groups = {k: v for k, v in groups.items() if v or k == "good"}
        groups["good"] = fresh + groups.get("good", [])
        how = f"the newest {len(fresh)} collected normals" + "".join(
            f", {len(v)} labelled {k}" for k, v in groups.items() if k != "good")
    for label, paths in groups.items():
        for p in paths:
            _link(p, root / "test" / label / p.name)
    if len(groups) == 1:  # no defects anywhere: plant some in the fresh normals
        rng = np.random.default_rng(seed)
        out = root / "test" / "planted"
        out.mkdir(parents=True, exist_ok=True)
        for p in groups["good"]:
            image, _mask = plant_on_frame(rng, read_original(p))
            cv2.imwrite(str(out / f"{p.stem}.png"), image)
        how += f", {len(groups['good'])} synthetic defects planted in them (no labelled defects)"
    (root / "train" / "good").mkdir(parents=True, exist_ok=True)
    log(f"hold-out: {how}")
    return root, how


def labelled_defects_to_learn(station_data: Path, champion_data: Path, holdout: Optional[Path],
                              rule: RetrainConfig) -> dict[str, list[Path]]:
    """For a model that learns from labelled defects: the champion's own (its DIR/train/<kind>/) and the oldest
    ``labelled_train_fraction`` of those a station's operators labelled (its test/<kind>/; all of them when the
    comparison has its own ``--holdout``), by kind; the newer ones stay in the hold-out to judge on."""
    found: dict[str, list[Path]] = {kind: list(paths) for kind, paths in known_defect_paths(champion_data).items()}
    station = sorted((p for kind, paths in _labelled(station_data).items() if kind != "good" for p in paths),
                     key=lambda p: p.name)  # names begin with the capture time: oldest first
    n = len(station) if holdout is not None else int(len(station) * rule.labelled_train_fraction)
    for p in station[:n]:
        found.setdefault(p.parent.name, []).append(p)
    return found


def _what_labels_bought(cfg: TrainConfig, work: Path, holdout_dir: Path, with_labels: ModelScores, taught: int,
                        log: Log) -> dict[str, Any]:
    """The same challenger fitted without the labelled defects (same recipe, normals and seed), scored on the same
    hold-out: what the labels changed. Its bundle stays in the run's folder, never a candidate."""
    from trainer.pipeline import fit_bundle

    for p in list_images(work / "data" / "train" / "good"):
        _link(p.resolve(), work / "data-without-labels" / "train" / "good" / p.name)
    bundle_dir = fit_bundle(cfg, work / "data-without-labels", work / "without-labels",
                            log=lambda m: log(f"without labels: {m}"), promote_bundle=False)
    without, _ = score_on(load_bundle(bundle_dir), holdout_dir)

    def text(v: Optional[float]) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    log(f"labelled defects: the challenger learnt from {taught}; on the hold-out AUROC {text(with_labels.auroc)} "
        f"with them, {text(without.auroc)} without; false alarms {with_labels.false_alarm_rate:.1%} with, "
        f"{without.false_alarm_rate:.1%} without")
    return {"trained_on": taught, "with": asdict(with_labels), "without": asdict(without),
            "bundle_without": str(bundle_dir)}


def plot_comparison(folder: Path, champion: ModelScores, challenger: ModelScores, labels: np.ndarray) -> list[str]:
    """Both models' hold-out scores on one histogram (each as score / its own threshold, so 1 is each one's
    threshold) and both ROC curves where the hold-out has defects; returns the PNG names written."""
    from trainer.report import ScoreSet, plot_histogram, plot_roc

    sets = [ScoreSet(f"{role} {ms.version}", np.asarray(ms.scores) / max(ms.threshold, 1e-12), labels, 1.0)
            for role, ms in (("champion", champion), ("challenger", challenger))]
    plot_histogram(folder / "comparison_scores.png", sets,
                   title="Hold-out scores / each model's own threshold (1 = its threshold)")
    written = ["comparison_scores.png"]
    if plot_roc(folder / "comparison_roc.png", sets, title="ROC on the hold-out (ONNX)"):
        written.append("comparison_roc.png")
    return written


def _inputs_fingerprint(station_data: Path, holdout: Optional[Path], rule: RetrainConfig,
                        calibration_file: Optional[Path] = None) -> str:
    """What a nightly run depends on besides the champion: the collected files (names and sizes), the rule, the
    station's on-site calibration (the champion's threshold)."""
    digest = hashlib.sha256(json.dumps({"rule": asdict(rule)}, sort_keys=True).encode())
    if calibration_file is not None and calibration_file.is_file():
        digest.update(b"calibration\0" + calibration_file.read_bytes())
    for folder in (station_data, holdout):
        if folder is None:
            continue
        for p in sorted(folder.rglob("*")):
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
                digest.update(f"{p.relative_to(folder)}\0{p.stat().st_size}\0".encode())
    return digest.hexdigest()


def retrain(station_data: Path, current: str | Path, out: Optional[Path], holdout: Optional[Path],
            rule: RetrainConfig, log: Log, calibration_file: Optional[Path] = None) -> dict[str, Any]:
    """Fit a challenger, compare it with the champion, promote it when the rule says so; returns the report.

    ``calibration_file``: the station's on-site calibration (core.site_calibration); the champion is judged at its
    threshold when it calibrates the champion's version.
    """
    from trainer.pipeline import fit_bundle

    station_data = Path(station_data)
    collected = station_data / "train" / "good"
    inside = sorted(d.parent.parent for d in station_data.glob("collect/*/train/good") if d.is_dir())
    if not collected.is_dir() and inside:
        raise UserError(f"{station_data}: a station's state_dir, not its collection folder; its stations collect "
                        f"into {', '.join(str(d) for d in inside)}: pass one of them as --station-data")
    stations = sorted(d.parent.parent for d in station_data.glob("*/train/good") if d.is_dir())
    if not collected.is_dir() and stations:
        raise UserError(f"{station_data}: the folder of every station's collection, not one station's; the stations "
                        f"here collect into {', '.join(str(d) for d in stations)}: pass one of them as "
                        "--station-data (<state_dir>/collect/<station id>)")
    if not collected.is_dir():
        raise UserError(f"{collected}: no collected normal frames; point --station-data at a station's collection "
                        "folder (collect.dir in station.yaml)")
    champion = load_bundle(current)
    engines_root = Path(out) if out is not None else champion.path.parent.parent
    model_dir = engines_root / champion.model_name
    with retrain_lock(model_dir):
        runs = model_dir / RETRAIN_DIR
        fingerprint = _inputs_fingerprint(station_data, holdout, rule, calibration_file)
        last_path = runs / LAST
        if last_path.is_file():  # the same frames and rule, and the champion is what that run left current
            last = json.loads(last_path.read_text(encoding="utf-8"))
            if last.get("inputs") == fingerprint and champion.version == (
                    last.get("challenger") if last.get("promoted") else last.get("champion")):
                outcome = (f"it promoted {last.get('challenger')}" if last.get("promoted")
                           else f"it refused challenger {last.get('challenger')}")
                said = (f"nothing new since the retrain of {last.get('at')} ({outcome}): {champion.version} stays "
                        "current")
                log(f"{said}; no training (same collected frames, rule and champion)")
                return {**last, "skipped": True, "said": said}
        cfg = champion_config(champion)
        base_dir = Path(json.loads((champion.path / "report.json").read_text(encoding="utf-8"))["data"])
        base = list_images(base_dir / "train" / "good") if (base_dir / "train" / "good").is_dir() else []
        if not base:
            log(f"warning: the champion's training images ({base_dir / 'train' / 'good'}) are gone; "
                "the challenger learns from the collected frames alone")
        # names begin with the UTC capture time: chronological. Frames the champion already learnt (a retrain's
        # champion is often the previous challenger) are not added twice.
        known = {p.name.removeprefix("station_") for p in base}
        frames = [p for p in list_images(collected) if p.name not in known]
        unique = drop_near_duplicates(frames, rule.duplicate_difference)
        n_fresh = max(1, int(round(len(unique) * rule.fresh_fraction))) if holdout is None else 0
        if len(unique) - n_fresh < 1:
            raise UserError(f"{collected}: {len(unique)} distinct collected frames ({len(frames)} before "
                            "near-duplicates were dropped) are too few to train on and hold out; collect more")
        learn, fresh = unique[:len(unique) - n_fresh], unique[len(unique) - n_fresh:]
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        work = runs / stamp
        if work.exists():
            shutil.rmtree(work)
        for p in base:  # names keep saying where an image came from, generation after generation
            name = p.name if p.name.startswith(("base_", "station_")) else f"base_{p.name}"
            _link(p, work / "data" / "train" / "good" / name)
        for p in learn:
            _link(p, work / "data" / "train" / "good" / f"station_{p.name}")
        log(f"challenger data: {len(base)} of the champion's images + {len(learn)} collected frames "
            f"({len(frames) - len(unique)} near-duplicates dropped, {len(fresh)} newest held out)")
        teach = (labelled_defects_to_learn(station_data, base_dir, holdout, rule)
                 if get_model_class(champion.model_name).learns_from_defects else {})
        for kind, paths in teach.items():
            for p in paths:
                prefix = "base_" if base_dir in p.parents else "station_"
                name = p.name if p.name.startswith(("base_", "station_")) else f"{prefix}{p.name}"
                _link(p, work / "data" / "train" / kind / name)
        taught = frozenset(p for paths in teach.values() for p in paths)
        if taught:
            log(f"challenger learns from {len(taught)} labelled defects too ("
                + ", ".join(f"{len(v)} {k}" for k, v in teach.items()) + ")")
        holdout_dir, how = build_holdout(work, fresh, station_data, holdout, cfg.seed, log, taught)
        challenger_dir = fit_bundle(cfg, work / "data", engines_root, log=log, promote_bundle=False)
        challenger = load_bundle(challenger_dir)
        champ_scores, labels = score_on(champion, holdout_dir, champion_threshold(champion, calibration_file, log))
        chall_scores, _ = score_on(challenger, holdout_dir)
        promoted, decision = decide(champ_scores, chall_scores, rule)
        bought = _what_labels_bought(cfg, work, holdout_dir, chall_scores, len(taught), log) if taught else None
        plots = plot_comparison(work, champ_scores, chall_scores, labels)
        report = {
            "at": _dt.datetime.now(_dt.timezone.utc).isoformat(), "model": champion.model_name,
            "champion": champion.version, "challenger": challenger.version, "promoted": promoted,
            "decision": decision, "rule": asdict(rule), "holdout": how, "inputs": fingerprint,
            "data": {"champion_images": len(base), "collected": len(frames),
                     "near_duplicates": len(frames) - len(unique), "trained_on": len(learn), "held_out": len(fresh)},
            "labelled_defects": bought,
            "labels": labels.tolist(),
            "scores": {"champion": asdict(champ_scores), "challenger": asdict(chall_scores)},
            "plots": plots, "folder": str(work),
        }
        atomic_write_text(work / "comparison.json", json.dumps(report, indent=2) + "\n")
        if promoted:
            promote(challenger_dir, reason=f"retrain: {decision}")
        atomic_write_text(last_path, json.dumps({k: v for k, v in report.items() if k not in ("scores", "labels")},
                                                indent=2) + "\n")
        log(f"{decision}; report {work / 'comparison.json'}")
        return report
