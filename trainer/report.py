"""report.json and the PNG plots in a bundle: what the trainer measured, readable without any code.

Plots: ROC curve, score histograms (normal vs anomalous, with the threshold), and heatmap overlays of
the highest-scoring test images. matplotlib runs headless (Agg).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import cv2
import numpy as np

from edge.bundle import atomic_write_text


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_roc(path: Path, scores: np.ndarray, labels: np.ndarray, auroc: Optional[float]) -> bool:
    """ROC curve PNG; False (nothing written) when the labels hold only one class."""
    from sklearn.metrics import roc_curve

    if labels.min() == labels.max():
        return False
    fpr, tpr, _ = roc_curve(labels, scores)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    ax.plot(fpr, tpr, lw=2, label=f"AUROC {auroc:.3f}" if auroc is not None else None)
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (test set, ONNX)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_histogram(path: Path, scores: np.ndarray, labels: np.ndarray, threshold: float) -> None:
    """Score histograms of normal and anomalous images with the threshold line."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    bins = np.linspace(float(scores.min()), float(scores.max()), 30) if scores.size else 10
    for lab, name, colour in ((0, "normal", "tab:blue"), (1, "anomalous", "tab:red")):
        sel = scores[labels == lab]
        if sel.size:
            ax.hist(sel, bins=bins, alpha=0.6, label=f"{name} ({sel.size})", color=colour)
    ax.axvline(threshold, c="k", ls="--", lw=1, label=f"threshold {threshold:.3g}")
    ax.set(xlabel="score", ylabel="images", title="Score distribution (test set, ONNX)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def overlay(frame_bgr: np.ndarray, amap: np.ndarray, low: float, high: float) -> np.ndarray:
    """Heatmap (JET) over a BGR frame; ``low``..``high`` is the map range shown (e.g. normal median..threshold)."""
    h, w = frame_bgr.shape[:2]
    if amap.shape != (h, w):
        amap = cv2.resize(amap, (w, h), interpolation=cv2.INTER_LINEAR)
    norm = np.clip((amap - low) / max(high - low, 1e-6), 0, 1)
    heat = cv2.applyColorMap((norm * 255).astype(np.uint8), cv2.COLORMAP_JET)
    alpha = (0.15 + 0.5 * norm)[..., None]
    return (frame_bgr * (1 - alpha) + heat * alpha).astype(np.uint8)


def write_overlays(bundle_dir: Path, frames: np.ndarray, maps: np.ndarray, scores: np.ndarray,
                   names: list[str], low: float, high: float, count: int) -> list[str]:
    """Overlays of the ``count`` highest-scoring frames as overlay_<i>.png; returns the file names."""
    written = []
    for rank, i in enumerate(np.argsort(-scores)[:count]):
        img = overlay(frames[i], maps[i], low, high)
        img = cv2.resize(img, (img.shape[1] * 2, img.shape[0] * 2), interpolation=cv2.INTER_NEAREST)
        cv2.putText(img, f"{names[i]} {scores[i]:.3g}", (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1,
                    cv2.LINE_AA)
        name = f"overlay_{rank}.png"
        cv2.imwrite(str(bundle_dir / name), img)
        written.append(name)
    return written


def write_report(bundle_dir: Path, report: dict[str, Any]) -> Path:
    """report.json (plain JSON; NaN-free)."""
    path = bundle_dir / "report.json"
    atomic_write_text(path, json.dumps(report, indent=2, allow_nan=False) + "\n")
    return path
