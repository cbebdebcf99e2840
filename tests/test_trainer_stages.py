"""fit_bundle's stages one at a time, their order, and the rerun of evaluate + report on an existing bundle.

The default model is fitted on generated parts at 64 px (tiny and fast); every score is checked against a plain
onnxruntime session on the graph the stage wrote, not against the trainer's own scorer.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from core.bundle import CURRENT, MANIFEST, ONNX_FP16, ONNX_FP32, ONNX_SCORE, load_bundle, promote, read_current
from core.errors import UserError
from core.files import sha256_file
from core.preprocess import resize_frame
from core.site_calibration import calibration_path
from core.thresholds import Policy, choose_threshold
from edge.calibration import save_site_calibration, site_calibration
from trainer.config import TrainConfig
from trainer.data import ImageSet, fingerprint, list_images, train_paths
from trainer.evaluate import metrics_from_scores
from trainer.pipeline import fit_bundle, rerun_stages
from trainer.stages import (
    CHECKPOINTS,
    STAGES,
    FitRun,
    calibrate_threshold,
    check_data,
    check_parity,
    evaluate_test,
    export_graphs,
    fit_model,
    promote_bundle,
    write_bundle_manifest,
    write_report,
)
from trainer.synthetic import make_dataset

SIZE = 64
ORDER = ["data check", "fit", "export", "calibrate", "parity", "evaluate", "report", "manifest", "promote"]


def small_config(codec: bool = True) -> TrainConfig:
    """The default model at 64 px, batches of 8; ``codec`` False: no degraded copies (plain hold-out scores)."""
    cfg = TrainConfig()
    cfg.input.height = cfg.input.width = SIZE
    cfg.export.max_batch = 8
    cfg.report.overlays = 3
    cfg.codec_augment.enabled = codec
    return cfg


def session_scores(onnx_path: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scores and maps of uint8 BGR frames by a plain onnxruntime session, one frame at a time."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    outs = [session.run(["score", "anomaly_map"], {"frames": f[None]}) for f in images]
    return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])


def read_frames(paths: list[Path]) -> np.ndarray:
    return np.stack([resize_frame(cv2.imread(str(p)), (SIZE, SIZE), "stretch") for p in paths])


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("stages") / "ds", n_train=16, n_test_good=6, n_test_defect=8,
                        size=SIZE, seed=5)


@pytest.fixture(scope="module")
def exported(parts, tmp_path_factory) -> FitRun:
    """A run taken through data check, fit and export by hand (the expensive part, once for the stage tests)."""
    heard = []
    run = FitRun(small_config(codec=False), parts, tmp_path_factory.mktemp("engines"), log=lambda _m: None,
                 on_export=heard.append)
    for stage in (check_data, fit_model, export_graphs):
        stage(run)
    assert heard == [run.module]
    return run


def copy_of(run: FitRun, **changes) -> FitRun:
    """A run of its own for one test (the notes list is copied: stages append to it)."""
    return dataclasses.replace(run, notes=list(run.notes), **changes)


@pytest.fixture(scope="module")
def calibrated(exported) -> FitRun:
    run = copy_of(exported)
    calibrate_threshold(run)
    return run


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """(data folder, promoted bundle, log lines) of one fit_bundle run, codec-robust copies on (the default)."""
    root = make_dataset(tmp_path_factory.mktemp("fitted") / "ds", n_train=16, n_test_good=6, n_test_defect=8,
                        size=SIZE, seed=6)
    lines: list[str] = []
    bundle = fit_bundle(small_config(), root, tmp_path_factory.mktemp("engines"), log=lines.append)
    return root, bundle, lines


def test_stage_names_and_order() -> None:
    assert [s.name for s in STAGES] == ORDER
    assert [s.name for s in STAGES if s.reruns] == ["data check", "calibrate", "evaluate", "report"]
    for stage in STAGES:
        assert stage.run.__doc__, stage.name
        assert stage.reruns or stage.why_not, stage.name


def test_a_stage_run_too_early_names_the_stage_it_needs(parts, tmp_path) -> None:
    fresh = FitRun(small_config(), parts, tmp_path, log=lambda _m: None)
    for stage, earlier in ((fit_model, "data check"), (export_graphs, "fit"), (calibrate_threshold, "data check"),
                           (write_bundle_manifest, "export"), (promote_bundle, "export")):
        with pytest.raises(RuntimeError, match=f"run stage '{earlier}' first"):
            stage(fresh)
    check_data(fresh)
    for stage, earlier in ((calibrate_threshold, "export"), (check_parity, "export"), (evaluate_test, "export")):
        with pytest.raises(RuntimeError, match=f"run stage '{earlier}' first"):
            stage(fresh)
    assert not any(tmp_path.iterdir())  # nothing written


def test_data_check_alone(parts, tmp_path) -> None:
    run = FitRun(small_config(), parts, tmp_path / "engines", log=lambda _m: None)
    check_data(run)
    assert run.data is not None and run.test is not None and run.model_cls is not None
    paths = train_paths(parts)
    assert sorted(run.data.fit_paths + run.data.holdout_paths) == paths
    assert not set(run.data.fit_paths) & set(run.data.holdout_paths)
    assert len(run.data.holdout_paths) == round(len(paths) * run.cfg.calibration.holdout_fraction)
    assert run.training_data == fingerprint(paths, parts)
    assert run.codec["on"] and run.data.degraded_copies == run.codec["copies"] >= 1  # stills: codec copies
    assert len(run.test) == 14 and int(run.test.labels.sum()) == 8 and run.test.masks is not None
    assert run.cfg.input.hw == (SIZE, SIZE)
    assert not (tmp_path / "engines").exists()  # checked, nothing fitted or written
    with pytest.raises(UserError, match="train/good"):
        check_data(FitRun(small_config(), tmp_path, tmp_path / "engines", log=lambda _m: None))


def test_fit_and_export(exported) -> None:
    run = exported
    assert run.model is not None and run.fit_seconds > 0 and run.bundle_dir is not None
    names = sorted(p.name for p in run.bundle_dir.iterdir())
    assert names == sorted([ONNX_FP32, ONNX_FP16, ONNX_SCORE])
    assert run.export_info["file_bytes"] == {n: (run.bundle_dir / n).stat().st_size for n in names}
    scores, maps = session_scores(run.bundle_dir / ONNX_FP32, run.test.images[:2])
    assert scores.shape == (2,) and maps.shape[0] == 2 and np.isfinite(scores).all()


def test_calibrate_alone_uses_the_graph_on_the_holdout(calibrated) -> None:
    run = calibrated
    held_out, _ = session_scores(run.fp32, read_frames(run.data.holdout_paths))
    expected = choose_threshold(Policy(), held_out)  # the default policy: a 1 % false-alarm rate
    assert run.calibration["method"] == run.calibration["policy"] == "false-alarm-rate"
    assert run.calibration["target_false_alarm_rate"] == 0.01
    assert run.calibration["threshold"] == pytest.approx(expected["threshold"], rel=1e-5)
    assert run.calibration["expected_false_alarm_rate"] == pytest.approx(0.01, rel=1e-3)
    assert run.calibration["n_normal"] == len(run.data.holdout_paths)
    np.testing.assert_allclose(run.calibration_scores["normal"], held_out, rtol=1e-5)


def test_calibrate_says_what_it_expects_and_warns_when_most_defects_fall_below(exported) -> None:
    """DIR/val whose "defects" are good parts: they score like the hold-out, so most fall below the threshold."""
    paths = list(exported.data.holdout_paths)
    frames = read_frames(paths)
    lines: list[str] = []
    val = ImageSet(paths=paths, images=frames, labels=np.ones(len(frames), int))
    run = copy_of(exported, data=dataclasses.replace(exported.data, val=val), log=lines.append)
    calibrate_threshold(run)
    c = run.calibration
    assert c["n_anomalous"] == len(frames) and c["expected_recall"] < 0.5 and c["most_defects_missed"] is True
    assert any(line.startswith("expected false-alarm rate at the threshold") for line in lines), lines
    assert any(line.startswith("expected recall at the threshold") for line in lines), lines
    warning = next(line for line in lines if line.startswith("WARNING: "))
    assert "labelled defects score below the threshold" in warning and warning in run.notes

    no_val = copy_of(exported, log=lines.append)
    no_val.cfg = dataclasses.replace(exported.cfg, calibration=dataclasses.replace(exported.cfg.calibration,
                                                                                   policy="recall"))
    with pytest.raises(UserError, match=r"policy is recall but there are no labelled defect images.*DIR/val"):
        calibrate_threshold(no_val)


def test_parity_alone(calibrated) -> None:
    run = copy_of(calibrated)
    check_parity(run)
    assert run.parity["frames"] == run.cfg.report.parity_frames
    assert set(run.parity) == {"frames", "onnx_fp32", "onnx_fp16", "onnx_score_only"}
    assert run.parity["onnx_fp32"]["score_max_rel_diff"] < 1e-4
    assert run.parity["onnx_fp16"]["score_max_rel_diff"] < 0.05


def test_evaluate_alone_measures_the_graph_at_the_threshold(calibrated) -> None:
    run = copy_of(calibrated)
    evaluate_test(run)
    scores, maps = session_scores(run.fp32, run.test.images)
    expected = metrics_from_scores(scores, run.test.labels, run.calibration["threshold"], maps, run.test.masks)
    for key, value in expected.items():
        assert run.metrics[key] == pytest.approx(value, abs=1e-5), key
    assert run.metrics["fit_seconds"] == round(run.fit_seconds, 3)
    assert run.metrics["image_auroc"] > 0.5


def test_evaluate_without_a_test_folder_notes_it(calibrated, tmp_path) -> None:
    run = copy_of(calibrated, test=None, data_dir=tmp_path)
    evaluate_test(run)
    assert run.evaluation is None and list(run.metrics) == ["fit_seconds"]
    assert run.notes[-1] == f"no {tmp_path / 'test'} folder: no test metrics"


def test_report_alone(calibrated, tmp_path) -> None:
    run = copy_of(calibrated, report_dir=tmp_path)
    evaluate_test(run)
    write_report(run)
    assert run.report_path == tmp_path / "report.json"
    report = json.loads(run.report_path.read_text())
    assert report["metrics"] == run.metrics and report["calibration"]["threshold"] == run.calibration["threshold"]
    assert report["config"]["input"]["height"] == SIZE and "rerun" not in report
    assert sorted(report["plots"]) == sorted([p.name for p in tmp_path.glob("*.png")] + ["operating_points.txt"])
    assert len(report["hardest_cases"]["good"]) == 3 and len(report["hardest_cases"]["defects"]) == 3
    # the operating points: the shipped threshold among what each policy would ship, on the hold-out and DIR/test
    ops = report["operating_points"]
    assert ops["policy"] == "false-alarm-rate" and ops["threshold"] == run.calibration["threshold"]
    assert ops["sets"] == {"calibration": {"good": len(run.data.holdout_paths), "defects": 0},
                           "test": {"good": 6, "defects": 8}}
    shipped = [r for r in ops["rows"] if r["shipped"]]
    assert len(shipped) == 1 and shipped[0]["threshold"] == run.calibration["threshold"]
    assert shipped[0]["test"]["recall"] == pytest.approx(run.metrics["recall"], abs=1e-6)
    assert shipped[0]["test"]["false_alarm_rate"] == pytest.approx(run.metrics["false_alarm_rate"], abs=1e-6)
    table = (tmp_path / "operating_points.txt").read_text()
    assert "> shipped: false-alarm-rate" in table and "false-alarm-rate 0.05" in table


@pytest.mark.parametrize("promote", [False, True])
def test_manifest_then_promote(calibrated, tmp_path, promote) -> None:
    """On a copy of the exported bundle: manifest checksums every file; promote makes it current (or only
    verifies it)."""
    bundle_dir = tmp_path / "engines" / calibrated.cfg.model / "v1"
    shutil.copytree(calibrated.bundle_dir, bundle_dir)
    run = copy_of(calibrated, bundle_dir=bundle_dir, fp32=bundle_dir / ONNX_FP32, promote_bundle=promote)
    run.fp16, run.score_only = bundle_dir / ONNX_FP16, bundle_dir / ONNX_SCORE
    check_parity(run)
    evaluate_test(run)
    write_report(run)
    write_bundle_manifest(run)
    manifest = json.loads((bundle_dir / MANIFEST).read_text())
    assert manifest["files"][ONNX_FP32] == sha256_file(bundle_dir / ONNX_FP32) and "report.json" in manifest["files"]
    assert manifest["calibration"] == run.calibration and manifest["metrics"] == run.metrics
    assert manifest["input"]["height"] == SIZE and manifest["fp16"]["file"] == ONNX_FP16
    promote_bundle(run)
    assert (bundle_dir.parent / CURRENT).is_file() == promote
    assert load_bundle(bundle_dir).threshold == run.calibration["threshold"]


def test_fit_bundle_runs_the_stages_in_order(fitted) -> None:
    root, bundle, lines = fitted
    starts = [f"{len(list_images(root / 'train' / 'good'))} training images in", f"fitting {small_config().model} ",
              "exported ", "threshold ", "parity vs torch", "test: ", f"bundle {bundle} promoted"]
    at = [next(i for i, line in enumerate(lines) if line.startswith(start)) for start in starts]
    assert at == sorted(at), lines
    assert load_bundle(bundle.parent).path == bundle  # promoted: 'current' names it


def test_failed_stage_leaves_no_version_folder(parts, tmp_path) -> None:
    def broken(_module) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        fit_bundle(small_config(), parts, tmp_path, log=lambda _m: None, on_export=broken)
    model_dir = tmp_path / small_config().model
    assert [p.name for p in model_dir.iterdir() if p.name != CHECKPOINTS] == []  # the half-written version is gone


def test_rerun_evaluate_and_report_gives_the_fits_metrics(fitted, tmp_path) -> None:
    root, bundle, _ = fitted
    before = {p.name: sha256_file(p) for p in bundle.iterdir()}
    fit_report = json.loads((bundle / "report.json").read_text())
    run = rerun_stages(bundle, root, ("evaluate", "report"), out_dir=tmp_path / "again", log=lambda _m: None)
    assert run.metrics == fit_report["metrics"]
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    assert again["metrics"] == fit_report["metrics"]
    assert again["hardest_cases"] == fit_report["hardest_cases"] and again["plots"] == fit_report["plots"]
    for key in ("calibration", "fit", "export", "parity", "codec_augment"):
        assert again[key] == fit_report[key], key
    assert {k: again["config"][k] for k in fit_report["config"]} == fit_report["config"]  # the fit's settings
    assert again["rerun"]["bundle"] == str(bundle) and again["rerun"]["stages"] == ["data check", "evaluate",
                                                                                    "report"]
    assert {p.name: sha256_file(p) for p in bundle.iterdir()} == before  # the bundle never changes
    load_bundle(bundle)


def test_rerun_defaults_to_a_folder_beside_the_bundle(fitted) -> None:
    root, bundle, _ = fitted
    run = rerun_stages(bundle.parent, root, log=lambda _m: None)  # the model folder: its current version
    assert run.report_path is not None and run.report_path.parent.parent == bundle.parent / "evals"
    assert run.report_path.parent.name.startswith(bundle.name + "-")


def test_rerun_calibrate_finds_the_fits_threshold(fitted) -> None:
    root, bundle, _ = fitted
    run = rerun_stages(bundle, root, ("calibrate",), log=lambda _m: None)
    manifest = load_bundle(bundle).manifest["calibration"]
    assert run.calibration["threshold"] == pytest.approx(manifest["threshold"], rel=1e-6)
    assert run.calibration["n_normal"] == manifest["n_normal"]  # the same hold-out, codec copies included
    assert run.report_path is None and not any("is not the set" in n for n in run.notes)


def test_rerun_refuses_what_it_cannot_do(fitted, tmp_path) -> None:
    root, bundle, _ = fitted
    for stages, message in ((("export",), "needs the fitted torch model"), (("parity",), "not kept after export"),
                            (("manifest",), "never change"), (("report",), "only with 'evaluate'"),
                            (("evaluate", "reprot"), "unknown stage 'reprot'")):
        with pytest.raises(UserError, match=message):
            rerun_stages(bundle, root, stages, out_dir=tmp_path / "x", log=lambda _m: None)
    with pytest.raises(UserError, match="inside the bundle"):
        rerun_stages(bundle, root, out_dir=bundle / "again", log=lambda _m: None)
    no_test = tmp_path / "no_test"
    shutil.copytree(root / "train", no_test / "train")
    with pytest.raises(UserError, match="no test folder"):
        rerun_stages(bundle, no_test, ("evaluate",), log=lambda _m: None)
    (no_test / "train" / "good" / "000.png").unlink()
    lines: list[str] = []
    run = rerun_stages(bundle, no_test, ("calibrate",), log=lines.append)
    assert "is not the set" in run.notes[-1] and f"warning: {run.notes[-1]}" in lines
    assert not (tmp_path / "x").exists()



# -- the promotion gate: a new fit replaces the current bundle only when it is at least as good (issue 21 H) --
@pytest.fixture(scope="module")
def gate(parts, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(engines root, its first bundle fitted on ``parts`` and promoted, a worse data folder: ``parts``' test/ and
    ground_truth/ with defective parts in train/good, so a model fitted on it takes defects for normal)."""
    engines = tmp_path_factory.mktemp("gate")
    lines: list[str] = []
    first = fit_bundle(small_config(codec=False), parts, engines, log=lines.append)
    assert read_current(first.parent) == first.name  # the first bundle of a model is promoted as before
    assert any(line.startswith(f"bundle {first} promoted (") for line in lines), lines
    worse = tmp_path_factory.mktemp("worse") / "ds"
    defects = make_dataset(worse.parent / "defects", n_train=0, n_test_good=0, n_test_defect=16, size=SIZE, seed=9)
    (worse / "train" / "good").mkdir(parents=True)
    for i, p in enumerate(sorted(defects.glob("test/*/*.png"))):
        shutil.copy(p, worse / "train" / "good" / f"{i:03d}.png")
    shutil.copytree(parts / "test", worse / "test")
    shutil.copytree(parts / "ground_truth", worse / "ground_truth")
    return engines, first, worse


def _refusal(lines: list[str]) -> str:
    refusals = [line for line in lines if line.startswith("not promoted: ")]
    assert len(refusals) == 1, lines
    return refusals[0]


def test_a_worse_fit_does_not_replace_the_current_bundle(gate) -> None:
    engines, first, worse = gate
    lines: list[str] = []
    second = fit_bundle(small_config(codec=False), worse, engines, log=lines.append)
    assert read_current(first.parent) == first.name  # the better bundle stays current
    load_bundle(second)  # written and verified, kept for inspection
    line = _refusal(lines)
    new_auroc = load_bundle(second).manifest["metrics"]["image_auroc"]
    old_auroc = load_bundle(first).manifest["metrics"]["image_auroc"]
    assert new_auroc < old_auroc
    assert f"worse than the current {first.name} on {worse / 'test'}" in line, line
    assert f"AUROC {new_auroc:.4f} vs {old_auroc:.4f} (worse)" in line and "(new vs current)" in line, line
    assert f"edge-train promote {second}" in line and "--promote always" in line, line


def test_promote_over_current_replaces_it_anyway(gate, tmp_path) -> None:
    engines, first, worse = gate
    model_dir = tmp_path / "engines" / first.parent.name
    shutil.copytree(first, model_dir / first.name)
    promote(model_dir / first.name)
    second = fit_bundle(small_config(codec=False), worse, tmp_path / "engines", log=lambda _m: None,
                        promote_over_current=True)
    assert read_current(model_dir) == second.name


def test_the_current_bundle_is_judged_at_its_stations_on_site_threshold(gate, tmp_path) -> None:
    """A station calibrated the current version on its own stream (edge-run --calibrate writes this file): the gate
    judges it at that threshold, not at the bundle's."""
    engines, first, worse = gate
    champion = load_bundle(first)
    state = tmp_path / "state"
    state.mkdir()
    on_site = champion.threshold * 1.5
    good_scores = np.full(40, on_site)  # normal_calibration of constant scores: the threshold is that score
    cal = site_calibration(good_scores, champion, quantile=0.99, margin=0.0, sigmas=0.0)
    save_site_calibration(calibration_path(state, "line1"), cal)
    lines: list[str] = []
    fit_bundle(small_config(codec=False), worse, engines, log=lines.append,
               site_calibration=calibration_path(state, "line1"))
    line = _refusal(lines)
    assert "current at station line1's on-site threshold (on-site calibration of 40 frames" in line, line
    assert f", {cal.threshold:.4g})" in line, line
    scores, _ = session_scores(champion.onnx_path, read_frames(list_images(worse / "test" / "good")))
    assert f"vs {float((scores >= cal.threshold).mean()):.1%}" in line.split("false alarms ")[1].split(",")[0], line
    assert read_current(first.parent) == first.name


def test_a_station_calibration_of_another_version_is_not_used(gate, tmp_path) -> None:
    engines, first, worse = gate
    cal = dataclasses.replace(site_calibration(np.full(40, 0.5), load_bundle(first), 0.99, 0.0, 0.0),
                              model_version="19990101T000000Z")
    save_site_calibration(calibration_path(tmp_path, "line1"), cal)
    lines: list[str] = []
    fit_bundle(small_config(codec=False), worse, engines, log=lines.append,
               site_calibration=calibration_path(tmp_path, "line1"))
    assert any("calibrates" in line and "not " in line and first.name in line for line in lines), lines
    assert "on-site" not in _refusal(lines)


def test_without_a_test_folder_a_second_fit_is_not_promoted(gate, tmp_path) -> None:
    engines, first, worse = gate
    no_test = tmp_path / "no_test"
    shutil.copytree(worse / "train", no_test / "train")
    lines: list[str] = []
    fit_bundle(small_config(codec=False), no_test, engines, log=lines.append)
    assert f"no {no_test / 'test'} folder to compare it with the current {first.name}" in _refusal(lines)
    assert read_current(first.parent) == first.name


def test_metrics_give_the_operating_point_and_the_best_f1() -> None:
    """What `edge-train eval --json` reports beside AUROC: the shipped threshold's recall and false-alarm rate, and
    the best F1 any threshold reaches on the same scores (a ceiling to compare the shipped F1 with)."""
    scores = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    labels = np.array([0, 0, 1, 0, 1, 1])
    m = metrics_from_scores(scores, labels, threshold=4.5)
    assert m["recall"] == pytest.approx(2 / 3) and m["false_alarm_rate"] == 0.0
    assert m["f1"] == pytest.approx(0.8)
    assert m["best_f1"] == pytest.approx(6 / 7) and 2.0 < m["best_f1_threshold"] <= 3.0  # flags 3, 4, 5, 6
