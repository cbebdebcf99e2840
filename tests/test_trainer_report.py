"""Reports that help decide: the hardest cases are the real ones, eval reports outside the immutable bundle.

A small PatchCore bundle is fitted once (128 px, 24 parts); the test images are scored again here straight
through onnxruntime on the bundle's model.onnx, independently of the trainer's scorer, and the report's picks
are checked against those scores.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from core.bundle import MANIFEST, load_bundle
from core.files import sha256_file
from core.preprocess import resize_frame
from trainer import report as rep
from trainer.config import TrainConfig
from trainer.data import list_images
from trainer.evaluate import evaluate_bundle, write_eval_report
from trainer.pipeline import fit_bundle
from trainer.synthetic import make_dataset

REPO = Path(__file__).resolve().parent.parent
SIZE = 128
CASES = 6
PLOTS = ("roc.png", "pr.png", "score_histogram.png", "hardest_cases.png")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> tuple[Path, Path]:
    """(data folder, promoted PatchCore bundle) fitted in-process; FP16 and score-only graphs off to save time."""
    root = make_dataset(tmp_path_factory.mktemp("rep") / "ds", n_train=24, n_test_good=10, n_test_defect=12,
                        size=SIZE, seed=3)
    cfg = TrainConfig()
    cfg.input.height = cfg.input.width = SIZE
    cfg.export.max_batch = 8
    cfg.export.fp16 = cfg.export.score_only = False
    cfg.report.overlays = CASES
    bundle = fit_bundle(cfg, root, tmp_path_factory.mktemp("engines"), log=lambda _m: None)
    return root, bundle


@pytest.fixture(scope="module")
def independent(fitted) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """The fitted bundle's scores and maps of DIR/test, by onnx_outputs."""
    root, bundle = fitted
    return onnx_outputs(bundle, root)


def onnx_outputs(bundle: Path, root: Path) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Score and map of every DIR/test image by a plain onnxruntime session, keyed by 'test/<kind>/<file>'."""
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    scores, maps = {}, {}
    for folder in sorted(p for p in (root / "test").iterdir() if p.is_dir()):
        for path in list_images(folder):
            frame = resize_frame(cv2.imread(str(path)), (SIZE, SIZE), "stretch")[None]
            score, amap = session.run(["score", "anomaly_map"], {"frames": frame})
            key = path.relative_to(root).as_posix()
            scores[key], maps[key] = float(score[0]), amap[0]
    return scores, maps


def assert_hardest(cases: list[dict], scores: dict[str, float], label: int, count: int) -> None:
    """``cases`` are the ``count`` highest-scoring good images (label 0) or lowest-scoring defects (label 1)."""
    side = {k: v for k, v in scores.items() if (k.startswith("test/good/")) == (label == 0)}
    sign = -1.0 if label == 0 else 1.0
    assert len(cases) == min(count, len(side))
    picked = [c["file"] for c in cases]
    for case in cases:
        assert case["label"] == label
        np.testing.assert_allclose(case["score"], side[case["file"]], rtol=1e-4)
    ranked = [sign * c["score"] for c in cases]
    assert ranked == sorted(ranked), "hardest first"
    worst_kept = max(sign * side[f] for f in picked)
    assert all(sign * s >= worst_kept - 1e-4 for f, s in side.items() if f not in picked), "a harder one was left out"


def assert_png(path: Path, min_w: int = 300, min_h: int = 250) -> tuple[int, int]:
    image = cv2.imread(str(path))
    assert image is not None, f"{path} is not a readable image"
    h, w = image.shape[:2]
    assert min_w <= w <= 4000 and min_h <= h <= 3000, (path.name, w, h)
    assert image.std() > 5, f"{path.name} is blank"
    return w, h


def test_fit_report_lists_the_hardest_cases(fitted, independent) -> None:
    root, bundle_dir = fitted
    bundle = load_bundle(bundle_dir)
    report = json.loads((bundle_dir / "report.json").read_text())
    for name in PLOTS:
        assert name in report["plots"] and name in bundle.manifest["files"], name
        assert_png(bundle_dir / name)
    w, _h = assert_png(bundle_dir / "hardest_cases.png")
    assert w >= CASES * 180, "tiles too small to see a defect"
    assert not list(bundle_dir.glob("overlay_*.png"))
    scores, _maps = independent
    hardest = report["hardest_cases"]
    threshold = bundle.threshold
    assert hardest["threshold"] == pytest.approx(threshold) and hardest["per_side"] == CASES
    assert_hardest(hardest["good"], scores, 0, CASES)
    assert_hardest(hardest["defects"], scores, 1, CASES)
    for case in hardest["good"] + hardest["defects"]:
        flagged = case["score"] >= threshold
        expected = {(0, True): "false_positive", (0, False): "true_negative", (1, True): "true_positive",
                    (1, False): "false_negative"}[(case["label"], flagged)]
        assert case["verdict"] == expected
        assert case["kind"] == case["file"].split("/")[1]
    scale = hardest["map_scale"]
    assert scale["in_score_units"] and scale["level"] == pytest.approx(threshold)  # PatchCore: map in score units
    assert scale["low"] < scale["level"] < scale["high"]
    assert report["metrics"]["average_precision"] is not None and report["metrics"]["image_auroc"] >= 0.8
    baseline = bundle.manifest["calibration"]["normal_median"]
    assert report["close_level"] == pytest.approx(baseline + 0.9 * (threshold - baseline))


def _mislabelled_copy(root: Path, scores: dict[str, float], dest: Path) -> tuple[str, str]:
    """DIR copied with its highest-scoring defect filed under test/good and its lowest-scoring good part filed
    as a crack: the mistakes a labeller makes, which the grid must put first. Returns their new names."""
    shutil.copytree(root, dest)
    defect = max((k for k in scores if not k.startswith("test/good/")), key=scores.__getitem__)
    good = min((k for k in scores if k.startswith("test/good/")), key=scores.__getitem__)
    shutil.move(dest / defect, dest / "test" / "good" / "zz_mislabelled.png")
    shutil.move(dest / good, dest / "test" / "crack" / "zz_mislabelled.png")
    return "test/good/zz_mislabelled.png", "test/crack/zz_mislabelled.png"


def _bundle_state(bundle_dir: Path) -> dict[str, str]:
    return {p.relative_to(bundle_dir).as_posix(): sha256_file(p) for p in sorted(bundle_dir.rglob("*")) if p.is_file()}


def edge_train(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.cli", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_eval_writes_its_report_outside_the_bundle(fitted, independent, tmp_path) -> None:
    """edge-train eval on mislabelled data: the report puts the two mistakes first; the bundle stays as it was."""
    root, bundle_dir = fitted
    scores, _maps = independent
    data = tmp_path / "mislabelled"
    false_positive, false_negative = _mislabelled_copy(root, scores, data)
    before = _bundle_state(bundle_dir)
    out = tmp_path / "eval-out"
    proc = edge_train("eval", bundle_dir, "--data", data, "--out", out, "--json")
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    assert Path(printed["report"]) == out / "report.json"
    report = json.loads((out / "report.json").read_text())
    assert report["kind"] == "eval" and report["model_version"] == bundle_dir.name
    assert report["metrics"] == {k: v for k, v in printed.items() if k != "report"}
    assert sorted(report["plots"]) == sorted(PLOTS)
    for name in PLOTS:
        assert_png(out / name)
    good, defects = report["hardest_cases"]["good"], report["hardest_cases"]["defects"]
    assert (good[0]["file"], good[0]["verdict"]) == (false_positive, "false_positive")
    assert (defects[0]["file"], defects[0]["verdict"]) == (false_negative, "false_negative")
    assert report["close_level"] < report["threshold"]
    # The bundle: not one file added, changed or removed, and it still verifies.
    assert _bundle_state(bundle_dir) == before
    load_bundle(bundle_dir)



def test_eval_refuses_an_out_folder_inside_the_bundle(fitted) -> None:
    root, bundle_dir = fitted
    before = _bundle_state(bundle_dir)
    proc = edge_train("eval", bundle_dir, "--data", root, "--out", bundle_dir / "eval")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edge-train: error: --out ") and "inside the bundle" in lines[0]
    assert _bundle_state(bundle_dir) == before and (bundle_dir / MANIFEST).is_file()


def test_one_class_test_set_degrades_gracefully(fitted, tmp_path) -> None:
    """Only good parts in DIR/test: no ROC or PR (and the report says why); histogram and top-normals grid written,
    by default into a new folder beside the versions named by version and time."""
    root, bundle_dir = fitted
    data = tmp_path / "good-only"
    (data / "test").mkdir(parents=True)
    shutil.copytree(root / "test" / "good", data / "test" / "good")
    before = _bundle_state(bundle_dir)
    evaluation = evaluate_bundle(bundle_dir.parent, data)  # the model folder: its current version
    assert evaluation.bundle is not None and evaluation.bundle.path == bundle_dir
    out = rep.report_dir(evaluation.bundle, None)
    assert out.parent == bundle_dir.parent / "evals" and out.name.startswith(bundle_dir.name + "-")
    report = json.loads(write_eval_report(evaluation, data, out, CASES).read_text())
    assert report["plots"] == ["score_histogram.png", "hardest_cases.png"]
    assert not (out / "roc.png").exists() and not (out / "pr.png").exists()
    assert any("only good parts" in note and "ROC" in note for note in report["notes"])
    assert report["metrics"]["image_auroc"] is None and report["metrics"]["average_precision"] is None
    assert report["hardest_cases"]["defects"] == []
    assert_hardest(report["hardest_cases"]["good"], onnx_outputs(bundle_dir, data)[0], 0, CASES)
    assert_png(out / "score_histogram.png")
    assert_png(out / "hardest_cases.png", min_h=200)
    assert _bundle_state(bundle_dir) == before


def test_map_scale_for_maps_not_in_score_units(fitted, independent) -> None:
    """A map in other units than the score: the bar's level is the good parts' map-peak quantile matching the
    share of good parts below the threshold."""
    root, bundle_dir = fitted
    scores, maps = independent
    keys = sorted(scores)
    s = np.asarray([scores[k] for k in keys])
    m = np.stack([maps[k] for k in keys]) * 0.01 + 3.0  # another quantity: same shape, other units
    labels = np.asarray([0 if k.startswith("test/good/") else 1 for k in keys])
    threshold = float(np.median(s[labels == 0]))  # half the good parts above it
    scale = rep.map_scale(m, labels, s, threshold, in_score_units=False)
    peaks = m[labels == 0].reshape(int((labels == 0).sum()), -1).max(1)
    share_below = float(np.mean(s[labels == 0] < threshold))
    assert scale.level == pytest.approx(float(np.quantile(peaks, share_below)))
    assert scale.low == pytest.approx(float(np.median(m[labels == 0])))
    assert scale.low < scale.level < scale.high and not scale.in_score_units
    assert "not in score units" in scale.basis


def test_plots_draw_several_score_sets(fitted, independent, tmp_path) -> None:
    """What a retrain comparison draws: two models' (here two data sets') scores on one histogram, ROC and PR."""
    root, bundle_dir = fitted
    scores, _maps = independent
    keys = sorted(scores)
    labels = np.asarray([0 if k.startswith("test/good/") else 1 for k in keys])
    s = np.asarray([scores[k] for k in keys])
    threshold = load_bundle(bundle_dir).threshold
    current = rep.ScoreSet("current", s, labels, threshold, rep.close_level(threshold, float(np.median(s))))
    candidate = rep.ScoreSet("candidate", s[::-1].copy(), labels, threshold * 1.1)  # another, worse, ranking
    assert rep.plot_roc(tmp_path / "roc.png", [current, candidate])
    assert rep.plot_pr(tmp_path / "pr.png", [current, candidate])
    rep.plot_histogram(tmp_path / "hist.png", [current, candidate])
    for name in ("roc.png", "pr.png", "hist.png"):
        assert_png(tmp_path / name)
    unlabelled = rep.ScoreSet("stream", s)
    assert not rep.plot_roc(tmp_path / "none.png", [unlabelled]) and not (tmp_path / "none.png").exists()
    rep.plot_histogram(tmp_path / "stream.png", [unlabelled])
    assert_png(tmp_path / "stream.png")
    # one panel a set, stacked: two sets' histogram is taller than one set's, as wide
    two, one = (cv2.imread(str(tmp_path / n)) for n in ("hist.png", "stream.png"))
    assert two.shape[1] == one.shape[1] and two.shape[0] > 1.5 * one.shape[0]


def test_fit_report_shows_the_operating_points(fitted, independent) -> None:
    """operating_points.txt / operating_curve.png: what each threshold would do on the hold-out and on DIR/test,
    the shipped one marked; DIR/test's rates checked against the independent onnxruntime scores."""
    root, bundle = fitted
    scores, _ = independent
    report = json.loads((bundle / "report.json").read_text())
    ops = report["operating_points"]
    threshold = load_bundle(bundle).threshold
    assert ops["threshold"] == threshold and ops["policy"] == "false-alarm-rate"
    assert {"operating_curve.png", "operating_points.txt"} <= set(report["plots"])
    assert_png(bundle / "operating_curve.png")
    good = np.array([s for k, s in scores.items() if k.startswith("test/good/")])
    bad = np.array([s for k, s in scores.items() if not k.startswith("test/good/")])
    assert [r["threshold"] for r in ops["rows"]] == sorted((r["threshold"] for r in ops["rows"]), reverse=True)
    for row in ops["rows"]:
        t = row["threshold"]
        assert row["test"]["false_alarm_rate"] == pytest.approx(np.mean(good >= t), abs=1e-9)
        assert row["test"]["recall"] == pytest.approx(np.mean(bad >= t), abs=1e-9)
        assert row["calibration"]["recall"] is None  # no DIR/val: no labelled defects to calibrate on
    rules = [r["rule"] for r in ops["rows"]]
    assert "false-alarm-rate 0.01" in rules and "false-alarm-rate 0.1" in rules
    shipped = next(r for r in ops["rows"] if r["shipped"])
    assert shipped["threshold"] == threshold
    assert shipped["expected_false_alarm_rate"] == pytest.approx(0.01, rel=1e-3)
    lines = (bundle / "operating_points.txt").read_text().splitlines()
    marked = [ln for ln in lines if ln.startswith("> ")]
    assert len(marked) == 1 and marked[0].startswith("> shipped: false-alarm-rate")
    assert f"{shipped['test']['recall']:.1%}" in marked[0]
    assert report["metrics"]["recall"] == pytest.approx(np.mean(bad >= threshold), abs=1e-6)
