"""report.json and the PNG plots: what the trainer measured on DIR/test, drawn so an engineer can act on it.

Every fit writes them into its bundle (before the manifest checksums the bundle's files); ``edge-train eval``
writes them into a folder of its own, since a bundle is immutable once written. The plots: ROC and PR curves
with the operating point at the threshold; score histograms of good parts and defects with the threshold and
the station's close level; a grid of the hardest cases (the highest-scoring good parts and the lowest-scoring
defects, whichever side of the threshold they fall) with heat-map overlays on one fixed colour scale whose bar
marks the threshold. The curve and histogram functions take several named score sets, so a comparison of two
models (a retrain) draws both on one figure. matplotlib runs headless (Agg).
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from core.bundle import Bundle
from core.errors import UserError
from core.events import EventRule
from core.files import atomic_write_text
from core.thresholds import f1_threshold, false_alarm_rate, rate_threshold, recall_threshold
from trainer.data import ImageSet

CMAP = "turbo"
COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown")
EVALS = "evals"  # engines/<model>/evals/<version>-<UTC time>/: where `edge-train eval` reports by default
HEAT_HEADROOM = 1.5  # the colour bar runs from the typical good pixel to 1.5x the way to the threshold level


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@dataclass(frozen=True)
class ScoreSet:
    """One model's scores on one image set: labels (0 good, 1 defect) where known, its threshold and close level."""

    name: str
    scores: np.ndarray
    labels: Optional[np.ndarray] = None
    threshold: Optional[float] = None
    close_level: Optional[float] = None

    @property
    def both_classes(self) -> bool:
        return self.labels is not None and 0 < int(np.sum(self.labels)) < len(self.labels)


def close_level(threshold: float, baseline: float) -> float:
    """The score below which a station closes an event, at the station's default hysteresis (core/events.py)."""
    return EventRule(threshold=threshold, baseline=baseline).close_level


def _legend_name(sets: Sequence[ScoreSet], s: ScoreSet, what: str) -> str:
    return what if len(sets) == 1 else f"{s.name}: {what}"


def plot_histogram(path: Path, sets: Sequence[ScoreSet], title: str = "Score distribution (test set, ONNX)") -> None:
    """Histograms of good (blue) and defect (red) scores with the threshold and close level: one panel a set,
    stacked on one score axis and shared bins, so two models' distributions and thresholds never hide each other
    (drawn on one axis, a retrain's two thresholds at 1 were one line and the defects' outlines a tangle)."""
    plt = _plt()
    values = [s.scores for s in sets] + [np.asarray([v], np.float64) for s in sets
                                         for v in (s.threshold, s.close_level) if v is not None]
    pooled = np.concatenate(values) if values else np.zeros(0)
    bins = np.linspace(float(pooled.min()), float(pooled.max()), 41) if pooled.size and np.ptp(pooled) > 0 else 10
    fig, axes = plt.subplots(len(sets), 1, sharex=True, squeeze=False, dpi=100,
                             figsize=(6.4, 1.2 + 2.4 * len(sets)))
    for ax, s in zip(axes[:, 0], sets, strict=True):
        labels = s.labels if s.labels is not None else np.zeros(len(s.scores), int)
        for lab, what in ((0, "good" if s.labels is not None else "images"), (1, "defect")):
            sel = s.scores[labels == lab]
            if sel.size:
                ax.hist(sel, bins=bins, alpha=0.6, label=f"{what} ({sel.size})",
                        color="tab:blue" if lab == 0 else "tab:red")
        if s.threshold is not None:
            ax.axvline(s.threshold, c="k", ls="--", lw=1.2, label=f"threshold {s.threshold:.4g}")
        if s.close_level is not None:
            ax.axvline(s.close_level, c="k", ls=":", lw=1.2, label=f"close level {s.close_level:.4g}")
        ax.set(ylabel="images", title=s.name if len(sets) > 1 else None)
        ax.legend(fontsize=7)
    axes[-1, 0].set(xlabel="score")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _operating_point(s: ScoreSet) -> Optional[tuple[float, float, float]]:
    """(false positive rate, recall, precision) of ``score >= threshold``; None without a threshold."""
    if s.threshold is None or s.labels is None:
        return None
    flagged = s.scores >= s.threshold
    pos = s.labels == 1
    tp = int(np.sum(flagged & pos))
    fpr = float(np.sum(flagged & ~pos) / max(int(np.sum(~pos)), 1))
    recall = tp / max(int(np.sum(pos)), 1)
    precision = tp / int(np.sum(flagged)) if np.any(flagged) else 1.0
    return fpr, recall, precision


def plot_roc(path: Path, sets: Sequence[ScoreSet], title: str = "ROC (test set, ONNX)") -> bool:
    """ROC curve of every set holding both classes, with its AUROC and the point its threshold operates at.

    Returns False (nothing written) when no set holds both good parts and defects.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    drawn = [s for s in sets if s.both_classes]
    if not drawn:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.4, 4.4), dpi=100)
    for i, s in enumerate(drawn):
        assert s.labels is not None
        colour = COLOURS[i % len(COLOURS)]
        fpr, tpr, _ = roc_curve(s.labels, s.scores)
        ax.plot(fpr, tpr, lw=2, c=colour,
                label=_legend_name(drawn, s, f"AUROC {roc_auc_score(s.labels, s.scores):.3f}"))
        point = _operating_point(s)
        if point is not None:
            ax.plot(point[0], point[1], "o", c=colour, mec="k",
                    label=_legend_name(drawn, s, f"at threshold: FPR {point[0]:.2f}, recall {point[1]:.2f}"))
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set(xlabel="false positive rate (good parts flagged)", ylabel="recall (defects flagged)", title=title)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_pr(path: Path, sets: Sequence[ScoreSet], title: str = "Precision-recall (test set, ONNX)") -> bool:
    """Precision-recall curve of every set holding both classes, with its average precision, the chance level
    (the share of defects) and the point its threshold operates at. False (nothing written) without both classes."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    drawn = [s for s in sets if s.both_classes]
    if not drawn:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.4, 4.4), dpi=100)
    for i, s in enumerate(drawn):
        assert s.labels is not None
        colour = COLOURS[i % len(COLOURS)]
        precision, recall, _ = precision_recall_curve(s.labels, s.scores)
        ap = average_precision_score(s.labels, s.scores)
        ax.step(recall, precision, where="post", lw=2, c=colour, label=_legend_name(drawn, s, f"AP {ap:.3f}"))
        ax.axhline(float(np.mean(s.labels)), c=colour, ls=":", lw=1,
                   label=_legend_name(drawn, s, f"chance {np.mean(s.labels):.2f}"))
        point = _operating_point(s)
        if point is not None:
            ax.plot(point[1], point[2], "o", c=colour, mec="k",
                    label=_legend_name(drawn, s, f"at threshold: recall {point[1]:.2f}, precision {point[2]:.2f}"))
    ax.set(xlabel="recall (defects flagged)", ylabel="precision (flagged that are defects)", title=title,
           xlim=(0, 1.02), ylim=(0, 1.05))
    ax.legend(loc="lower left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


@dataclass(frozen=True)
class Case:
    """One test image in the hardest-cases grid; ``verdict`` is the threshold's decision against the label."""

    index: int
    file: str
    label: int
    kind: str
    score: float
    verdict: str  # false_positive, true_negative (good parts); false_negative, true_positive (defects)

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        del out["index"]
        return out


def _verdict(label: int, flagged: bool) -> str:
    if label == 0:
        return "false_positive" if flagged else "true_negative"
    return "true_positive" if flagged else "false_negative"


def hardest_cases(scores: np.ndarray, labels: np.ndarray, files: Sequence[str], kinds: Sequence[str],
                  threshold: float, count: int) -> tuple[list[Case], list[Case]]:
    """The ``count`` highest-scoring good images (highest first) and the ``count`` lowest-scoring defects (lowest
    first): where the threshold errs, or would err first if it moved. Ties break by file name."""
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels).astype(int)

    def pick(label: int, sign: float) -> list[Case]:
        idx = [int(i) for i in np.flatnonzero(labels == label)]
        order = np.asarray(idx, int)[np.lexsort((np.asarray([files[i] for i in idx]), sign * scores[idx]))][:count]
        return [Case(index=i, file=files[i], label=label, kind=kinds[i], score=float(scores[i]),
                     verdict=_verdict(label, bool(scores[i] >= threshold))) for i in map(int, order)]

    return pick(0, -1.0), pick(1, 1.0)


@dataclass(frozen=True)
class MapScale:
    """The one colour scale of every overlay: ``low`` (darkest) .. ``high`` (brightest, clipped above), with
    ``level`` the map value the colour bar marks as the threshold; ``basis`` says how they were chosen."""

    low: float
    level: float
    high: float
    in_score_units: bool
    basis: str


def map_scale(maps: np.ndarray, labels: np.ndarray, scores: np.ndarray, threshold: float,
              in_score_units: bool) -> MapScale:
    """A fixed scale from the good parts' maps, with the threshold placed on it honestly for the model's map.

    In score units (the score is the peak of the unsmoothed map: ``map_in_score_units``) the threshold itself is the
    level. Otherwise map values and scores are different quantities, and the level is the quantile of the good
    parts' map peaks that matches the share of good parts scoring below the threshold: a map peak at the level
    is as rare among good parts as a score at the threshold.
    """
    labels = np.asarray(labels).astype(int)
    good = labels == 0
    ref, whose = (maps[good], "good parts'") if good.any() else (maps, "test images' (no good parts in the test)")
    low = float(np.median(ref))
    if in_score_units:
        level = float(threshold)
        how = f"map in score units (score = peak of the unsmoothed map): bar tick = threshold {threshold:.4g}"
    else:
        passed = float(np.mean(scores[good] < threshold)) if good.any() else 0.5
        level = float(np.quantile(ref.reshape(len(ref), -1).max(1), passed))
        how = (f"map not in score units: bar tick = {passed:.0%} quantile of {whose} map peaks (the share of good "
               f"parts below the threshold), {level:.4g}")
    level = max(level, low + max(abs(low) * 1e-3, 1e-6))
    high = low + HEAT_HEADROOM * (level - low)
    basis = (f"one colour scale for every tile: {how}; darkest = median of {whose} map pixels {low:.4g}; "
             f"brightest = {high:.4g} and above")
    return MapScale(low=low, level=level, high=high, in_score_units=in_score_units, basis=basis)


def overlay(frame_bgr: np.ndarray, amap: np.ndarray, scale: MapScale) -> np.ndarray:
    """RGB float image: the map in CMAP over the frame on ``scale``; opacity grows with the map value."""
    import cv2
    import matplotlib

    h, w = frame_bgr.shape[:2]
    if amap.shape != (h, w):
        amap = cv2.resize(amap, (w, h), interpolation=cv2.INTER_LINEAR)
    norm = np.clip((amap - scale.low) / (scale.high - scale.low), 0, 1)
    heat = matplotlib.colormaps[CMAP](norm)[..., :3]
    alpha = (0.15 + 0.55 * norm)[..., None]
    rgb = frame_bgr[..., ::-1].astype(np.float64) / 255.0
    return rgb * (1 - alpha) + heat * alpha


_VERDICT_TEXT = {"false_positive": ("FALSE POSITIVE", "tab:red"), "true_negative": ("good, passes", "tab:green"),
                 "false_negative": ("MISSED DEFECT", "tab:red"), "true_positive": ("defect, caught", "tab:green")}


def plot_hardest_cases(path: Path, frames: np.ndarray, maps: Optional[np.ndarray], good: Sequence[Case],
                       defects: Sequence[Case], threshold: float, scale: Optional[MapScale]) -> None:
    """The grid: a row of the highest-scoring good parts, a row of the lowest-scoring defects; each tile says its
    verdict, label, score against the threshold and file; wrong decisions framed red; one colour bar for all."""
    import matplotlib

    plt = _plt()
    rows = [(title, cases) for title, cases in (("good parts,\nhighest scores", good),
                                                  ("defects,\nlowest scores", defects)) if cases]
    cols = max(len(cases) for _t, cases in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.2 * cols + 1.6, 2.7 * len(rows) + 0.8), dpi=100,
                             squeeze=False, layout="constrained")
    for r, (title, cases) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(cases):
                ax.set_axis_off()
                continue
            case = cases[c]
            frame = frames[case.index]
            image = overlay(frame, maps[case.index], scale) if maps is not None and scale is not None \
                else frame[..., ::-1]
            ax.imshow(image)
            text, colour = _VERDICT_TEXT[case.verdict]
            name = case.file if len(case.file) <= 30 else "..." + case.file[-27:]
            ax.set_title(f"{text}\n{case.kind}: score {case.score:.4g}\nthreshold {threshold:.4g}\n{name}",
                         fontsize=7, color=colour if colour == "tab:red" else "k")
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(3 if colour == "tab:red" else 1)
            if c == 0:
                ax.set_ylabel(title, fontsize=8)
    if maps is not None and scale is not None:
        mappable = matplotlib.cm.ScalarMappable(norm=matplotlib.colors.Normalize(scale.low, scale.high), cmap=CMAP)
        bar = fig.colorbar(mappable, ax=axes.ravel().tolist(), extend="max", shrink=0.9)
        bar.set_ticks([scale.low, scale.level, scale.high])
        mark = f"threshold {scale.level:.3g}" if scale.in_score_units \
            else f"threshold level\n{scale.level:.3g} (map units)"
        bar.set_ticklabels([f"{scale.low:.3g} typical good", mark, f"{scale.high:.3g}"])
        bar.ax.axhline(scale.level, c="k", lw=2)
        bar.ax.tick_params(labelsize=7)
        caption = scale.basis
    else:
        caption = "this model gives no anomaly map: tiles show the frames only"
    fig.suptitle("Hardest cases (test set, ONNX)", fontsize=10)
    fig.supxlabel("\n".join(_wrap(caption, 40 * cols)), fontsize=7)
    fig.savefig(path)
    plt.close(fig)


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, max(width, 60))


def map_in_score_units(model_name: str) -> bool:
    """Whether the registered model's anomaly map is in its score's units (False for an unknown model)."""
    from trainer.models import get_model_class

    try:
        return bool(get_model_class(model_name).map_in_score_units)
    except UserError:
        return False


def write_test_report(out_dir: Path, test: ImageSet, scores: np.ndarray, maps: Optional[np.ndarray],
                      threshold: float, baseline: Optional[float], *, root: Path, cases: int,
                      in_score_units: bool, name: str = "test") -> dict[str, Any]:
    """Draw roc.png, pr.png, score_histogram.png and hardest_cases.png of ``test`` into ``out_dir``.

    Returns report.json's part: ``plots`` (the files written), ``notes`` (what was not drawn and why),
    ``close_level`` and ``hardest_cases`` (file relative to ``root``, label, kind, score, verdict; good parts
    highest score first, defects lowest first) with the colour scale of their overlays.
    """
    labels = np.asarray(test.labels).astype(int)
    close = close_level(threshold, baseline) if baseline is not None else None
    sets = [ScoreSet(name, scores, labels, threshold, close)]
    plots: list[str] = []
    notes: list[str] = []
    if plot_roc(out_dir / "roc.png", sets):
        plots.append("roc.png")
    if plot_pr(out_dir / "pr.png", sets):
        plots.append("pr.png")
    if not sets[0].both_classes:
        has = "good parts" if labels.size and labels.max() == 0 else "defects"
        notes.append(f"the test set holds only {has}: no ROC or PR curve, no AUROC (they need good parts and defects)")
    plot_histogram(out_dir / "score_histogram.png", sets)
    plots.append("score_histogram.png")
    section: dict[str, Any] = {"plots": plots, "notes": notes, "close_level": close, "hardest_cases": None}
    if cases <= 0:
        return section
    files = [_relative(p, root) for p in test.paths]
    kinds = test.kinds or ["good" if lab == 0 else "defect" for lab in labels]
    good, defects = hardest_cases(scores, labels, files, kinds, threshold, cases)
    scale = map_scale(maps, labels, scores, threshold, in_score_units) if maps is not None else None
    plot_hardest_cases(out_dir / "hardest_cases.png", test.images, maps, good, defects, threshold, scale)
    plots.append("hardest_cases.png")
    section["hardest_cases"] = {
        "threshold": float(threshold), "per_side": cases,
        "good": [c.as_json() for c in good], "defects": [c.as_json() for c in defects],
        "map_scale": None if scale is None else asdict(scale),
    }
    return section


# -- the operating point: what each threshold would do -----------------------------------------------------------
FAR_TARGETS = (0.005, 0.01, 0.02, 0.05, 0.1)  # the table's rows of the false-alarm-rate policy
RECALL_TARGETS = (0.5, 0.8, 0.9, 0.95)  # and of the recall policy, where there are labelled defects
OPERATING_TABLE = "operating_points.txt"
OPERATING_PLOT = "operating_curve.png"


@dataclass(frozen=True)
class Labelled:
    """Scores of good parts and of defects (either may be empty) of one image set, named for the table."""

    name: str
    normal: np.ndarray
    defects: np.ndarray

    def at(self, threshold: float) -> dict[str, Optional[float]]:
        """False-alarm rate, recall, precision and F1 of ``score >= threshold`` (None where a side is empty)."""
        fp = int(np.sum(self.normal >= threshold))
        tp = int(np.sum(self.defects >= threshold))
        far = fp / self.normal.size if self.normal.size else None
        recall = tp / self.defects.size if self.defects.size else None
        precision = (tp / (tp + fp) if tp + fp else 1.0) if self.defects.size else None
        f1 = (2 * precision * recall / (precision + recall) if precision + recall else 0.0) \
            if precision is not None and recall is not None else None
        return {"false_alarm_rate": far, "recall": recall, "precision": precision, "f1": f1}


def operating_rows(threshold: float, calibration: Labelled, test: Optional[Labelled],
                   policy: str) -> list[dict[str, Any]]:
    """The table's rows: the shipped threshold, then what each false-alarm-rate target (estimated on the
    calibration's normals, as the policy does) and, with labelled defects, each recall target and best F1 would
    ship; each with its rates on the calibration data and on the test set. Highest threshold first."""
    candidates: list[tuple[str, float]] = [(f"shipped: {policy}", threshold)]
    for rate in FAR_TARGETS:
        candidates.append((f"false-alarm-rate {rate:g}", rate_threshold(calibration.normal, rate)[0]))
    if calibration.defects.size:
        for r in RECALL_TARGETS:
            candidates.append((f"recall {r:g}", recall_threshold(calibration.normal, calibration.defects, r)))
        candidates.append(("best-f1", f1_threshold(calibration.normal, calibration.defects)[0]))
    rows = []
    for rule, t in candidates:
        row: dict[str, Any] = {"rule": rule, "threshold": float(t), "shipped": rule.startswith("shipped"),
                               "expected_false_alarm_rate": false_alarm_rate(calibration.normal, t)}
        for labelled in (calibration, test):
            if labelled is not None:
                row[labelled.name] = labelled.at(t)
        rows.append(row)
    return sorted(rows, key=lambda r: (-r["threshold"], not r["shipped"]))


def operating_table_text(rows: list[dict[str, Any]], sets: Sequence[Labelled]) -> str:
    """The rows as a plain-text table (operating_points.txt): one line a threshold, the shipped one marked."""
    def pct(v: Optional[float]) -> str:
        return "-" if v is None else f"{v:.1%}"

    width = max([len(r["rule"]) for r in rows] + [4])
    head = f"{'':2}{'rule':{width}} {'threshold':>10} {'exp. FAR':>8}"
    for s in sets:
        head += f" | {s.name + ' FAR':>16} {'recall':>7} {'precision':>9} {'F1':>5}"
    lines = [head, "-" * len(head)]
    for r in rows:
        line = f"{'> ' if r['shipped'] else '  '}{r['rule']:{width}} {r['threshold']:10.5g} " \
               f"{pct(r['expected_false_alarm_rate']):>8}"
        for s in sets:
            m = r[s.name]
            f1 = "-" if m["f1"] is None else f"{m['f1']:.3f}"
            line += f" | {pct(m['false_alarm_rate']):>16} {pct(m['recall']):>7} {pct(m['precision']):>9} {f1:>5}"
        lines.append(line)
    sizes = "; ".join(f"{s.name}: {s.normal.size} good, {s.defects.size} defects" for s in sets)
    return ("\n".join(lines) + "\n\nThe line marked '>' is the threshold shipped in the bundle. exp. FAR = the "
            f"false-alarm rate the policy's estimator expects from the calibration normals. {sizes}.\n")


def plot_operating_curve(path: Path, threshold: float, sets: Sequence[Labelled]) -> None:
    """False-alarm rate, recall and precision of every set against the threshold, the shipped one marked: the
    trade-off ``calibration.policy`` picks one point of."""
    plt = _plt()
    pooled = np.concatenate([np.r_[s.normal, s.defects] for s in sets] + [np.asarray([threshold])])
    grid = np.linspace(float(pooled.min()), float(pooled.max()), 200)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for i, s in enumerate(sets):
        colour = COLOURS[i % len(COLOURS)]
        points = [s.at(float(t)) for t in grid]
        for key, style in (("false_alarm_rate", "-"), ("recall", "--"), ("precision", ":")):
            ys = [p[key] for p in points]
            if ys and ys[0] is not None:
                ax.plot(grid, ys, ls=style, c=colour, lw=1.6, label=f"{s.name}: {key.replace('_', '-')}")
    ax.axvline(threshold, c="k", ls="--", lw=1.2, label=f"shipped threshold {threshold:.4g}")
    ax.set(xlabel="threshold (score >= threshold is flagged)", ylabel="rate", ylim=(-0.02, 1.02),
           title="Operating points (ONNX scores)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_operating_report(out_dir: Path, threshold: float, policy: str, calibration: Labelled,
                           test: Optional[Labelled]) -> dict[str, Any]:
    """Write operating_points.txt and operating_curve.png; returns report.json's ``operating_points``."""
    sets = [calibration] + ([test] if test is not None else [])
    rows = operating_rows(threshold, calibration, test, policy)
    atomic_write_text(out_dir / OPERATING_TABLE, operating_table_text(rows, sets))
    plot_operating_curve(out_dir / OPERATING_PLOT, threshold, sets)
    return {"threshold": float(threshold), "policy": policy, "table": OPERATING_TABLE, "plot": OPERATING_PLOT,
            "sets": {s.name: {"good": int(s.normal.size), "defects": int(s.defects.size)} for s in sets},
            "rows": rows}


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def report_dir(bundle: Bundle, out: Optional[Path]) -> Path:
    """Where an evaluation report goes (checked, not yet created): ``out``, or a new
    ``<model folder>/evals/<version>-<UTC time>``.

    Never inside the bundle: its files are checksummed in the manifest, and a station refuses a bundle whose
    files changed.
    """
    if out is not None:
        target = Path(out)
        resolved, inside = target.resolve(), bundle.path.resolve()
        if resolved == inside or inside in resolved.parents:
            raise UserError(f"--out {target}: inside the bundle {bundle.path}, whose files are checksummed and never "
                            "change; pass a folder outside it")
        if target.exists() and not target.is_dir():
            raise UserError(f"--out {target}: exists and is not a folder; pass a folder")
        return target
    base = bundle.path.parent / EVALS
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    for n in range(1, 1000):
        target = base / (f"{bundle.version}-{stamp}" + ("" if n == 1 else f"-{n}"))
        if not target.exists():
            return target
    raise UserError(f"{base}: no free report folder name; pass --out DIR")


def write_report(out_dir: Path, report: dict[str, Any]) -> Path:
    """report.json (plain JSON; NaN-free)."""
    path = out_dir / "report.json"
    atomic_write_text(path, json.dumps(report, indent=2, allow_nan=False) + "\n")
    return path
