"""Deep SAD end to end: fitted by ``fit_bundle`` on generated parts where DIR/train/foreign/ holds 5 labelled
defects (parts with a foreign object, the kind the test set plants); through its exported ONNX graph the defects
it learnt from score above the normal parts, and Deep SVDD on the same folder leaves them out and says so (the two
models' test AUROCs are printed, not asserted: see trainer/models/deep_sad.py). The bundle passes the shared
checks (FP32 parity, FP16 order, TensorRT readiness, any batch); the objective against the paper's formula;
without labelled defects the objective is Deep SVDD's; ``edge-train retrain`` teaches a challenger the defects a
station's operators labelled and reports what they bought.

Recipe: Deep SVDD's test recipe (grey 64 px, the paper's MNIST net, 10 pre-training + 10 epochs at batch 32, 160
normal parts), the same seed for both models.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from edge_helpers import run_cli
from model_checks import check_exported_bundle

from core.bundle import read_current
from trainer.config import RetrainConfig, parse_train_config
from trainer.data import train_paths
from trainer.evaluate import evaluate_bundle
from trainer.frames import TrainingData
from trainer.models import create_model
from trainer.models.deep_sad import EPS, DeepSad, deep_sad_loss
from trainer.pipeline import fit_bundle
from trainer.retrain import retrain
from trainer.synthetic import OBJECT_KINDS, make_dataset, write_clip

SIZE = 64
LABELLED = 5


def config(model: str) -> str:
    return f"""model: {model}
input: {{height: {SIZE}, width: {SIZE}, channels: gray}}
epochs: 10
batch_size: 32
training: {{workers: 0}}
{model.replace('-', '_')}: {{pretrain_epochs: 10}}
export: {{max_batch: 8}}
report: {{overlays: 0}}
"""


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """160 normal parts, 30 + 30 test parts, and 5 labelled foreign objects moved from val/ into train/foreign/."""
    root = make_dataset(tmp_path_factory.mktemp("sad") / "ds", n_train=160, n_test_good=30, n_test_defect=30,
                        size=SIZE, seed=1, kinds=OBJECT_KINDS, n_val_defect=LABELLED)
    shutil.move(str(root / "val" / "foreign"), str(root / "train" / "foreign"))
    shutil.rmtree(root / "val")
    return root


def _fit(model: str, parts: Path, engines: Path) -> tuple[Path, list[str]]:
    torch.set_num_threads(1)
    lines: list[str] = []
    bundle = fit_bundle(parse_train_config(config(model)), parts, engines, log=lines.append)
    return bundle, lines


@pytest.fixture(scope="module")
def sad(parts: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    return _fit("deep-sad", parts, tmp_path_factory.mktemp("engines"))


def test_deep_sad_trains_on_the_labelled_defects_and_deep_svdd_leaves_them_out(parts: Path, sad: tuple[Path, list[str]],
                                                                            tmp_path: Path) -> None:
    sad_bundle, sad_lines = sad
    fit = json.loads((sad_bundle / "report.json").read_text())["fit"]
    assert (fit["labelled_defects"], fit["defects_per_step"], fit["objective"]) == (LABELLED, 1, "semi-supervised")
    assert any("5 labelled defects pushed away from c" in line for line in sad_lines)
    # Deep SVDD learns from normal images only: it leaves train/foreign out and names the model that uses it
    svdd_bundle, svdd_lines = _fit("deep-svdd", parts, tmp_path / "engines")
    note = next(line for line in svdd_lines if "train/foreign 5" in line)
    assert "not used by deep-svdd" in note and "deep-sad" in note.split("models that learn from them: ")[1]
    assert json.loads((svdd_bundle / "report.json").read_text())["fit"]["objective"] == "one-class"
    # the comparison, printed: not asserted, as it does not hold over seeds (trainer/models/deep_sad.py)
    aurocs = [evaluate_bundle(b, parts).metrics["image_auroc"] for b in (svdd_bundle, sad_bundle)]
    print(f"image AUROC through ONNX, same data and seed: deep-svdd {aurocs[0]:.3f}, deep-sad with {LABELLED} "
          f"labelled defects {aurocs[1]:.3f}")


def test_the_bundle_passes_the_shared_checks(sad: tuple[Path, list[str]], parts: Path) -> None:
    check_exported_bundle(sad[0], parts, SIZE, DeepSad.fp32_scopes)


def test_the_objective_is_the_papers() -> None:
    normal, defects = torch.tensor([0.5, 1.0, 2.0]), torch.tensor([0.25, 4.0])
    expected = (0.5 + 1.0 + 2.0 + 2.0 * (1 / (0.25 + EPS) + 1 / (4.0 + EPS))) / 5
    assert deep_sad_loss(normal, defects, 2.0).item() == pytest.approx(expected, rel=1e-6)


def test_without_labelled_defects_it_is_deep_svdds_objective(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "ds", n_train=12, n_test_good=0, n_test_defect=0, size=32, seed=3,
                        kinds=OBJECT_KINDS)
    paths = train_paths(root)
    data = TrainingData(fit_paths=paths[:9], holdout_paths=paths[9:], hw=(32, 32))
    model = create_model("deep-sad", parse_train_config(
        "model: deep-sad\ninput: {height: 32, width: 32, channels: gray}\nepochs: 1\nbatch_size: 4\n"
        "training: {workers: 0}\ndeep_sad: {pretrain_epochs: 0}\n"))
    assert isinstance(model, DeepSad)
    lines: list[str] = []
    model.fit(data, lines.append)
    assert any("no labelled defects" in line for line in lines)
    x = model.prepare(torch.from_numpy(data.read(data.fit_paths[:4])))
    loss, _ = model._loss(x, {})
    with torch.no_grad():
        d = ((model.encoder(x) - model.sphere.centre) ** 2).sum(1)
    assert float(loss.detach()) == pytest.approx(float(d.mean()), rel=1e-5)


def test_retrain_teaches_the_challenger_the_stations_labelled_defects_and_reports_what_they_bought(
        tmp_path: Path) -> None:
    """A station collected normal frames and its operators labelled 4 events as defects (test/foreign/, 5 frames
    each as edge-run label moves them) and one as a false alarm: the retrain's challenger learns from the oldest
    half of the defects, the hold-out keeps the newer half, and the report compares it with the same challenger
    fitted without them."""
    stills = make_dataset(tmp_path / "stills", n_train=40, n_test_good=0, n_test_defect=0, size=SIZE, seed=5,
                          kinds=OBJECT_KINDS)
    engines = tmp_path / "engines"
    text = config("deep-sad").replace("epochs: 10", "epochs: 3").replace("pretrain_epochs: 10", "pretrain_epochs: 2")
    champion = fit_bundle(parse_train_config(text), stills, engines, log=lambda _m: None)
    parts = make_dataset(tmp_path / "parts", n_train=24, n_test_good=5, n_test_defect=20, size=SIZE, seed=6,
                         kinds=OBJECT_KINDS)
    station = tmp_path / "station"
    for i, p in enumerate(train_paths(parts)):  # normal frames, named by capture time as a station writes them
        (station / "train" / "good").mkdir(parents=True, exist_ok=True)
        shutil.copy(p, station / "train" / "good" / f"20261201T1200{i:02d}_cam0_{i}.png")
    for label, folder, per_event in (("foreign", parts / "test" / "foreign", 5), ("good", parts / "test" / "good", 5)):
        for i, p in enumerate(sorted(folder.glob("*.png"))):  # event e's frames: 20261201T13<e>...
            event = i // per_event
            (station / "test" / label).mkdir(parents=True, exist_ok=True)
            shutil.copy(p, station / "test" / label / f"20261201T13{event:02d}{i % per_event:02d}_cam0_{i}.png")
    lines: list[str] = []
    report = retrain(station, champion.parent, None, None, RetrainConfig(), lines.append)
    work = Path(report["folder"])
    taught = sorted(p.name for p in (work / "data" / "train" / "foreign").glob("*.png"))
    held = sorted(p.name for p in (work / "holdout" / "test" / "foreign").glob("*.png"))
    assert len(taught) == len(held) == 10  # half of the 20 labelled frames each, the older half to learn from
    assert max(n.removeprefix("station_") for n in taught) < min(held)
    assert not (work / "data-without-labels" / "train" / "foreign").exists()
    bought = report["labelled_defects"]
    assert bought["trained_on"] == 10 and bought["with"]["auroc"] is not None and bought["without"]["auroc"] is not None
    assert bought["with"]["auroc"] == report["scores"]["challenger"]["auroc"]  # the challenger judged is the one with
    assert any(line.startswith("labelled defects: the challenger learnt from 10;") for line in lines)
    challenger_fit = json.loads((engines / "deep-sad" / report["challenger"] / "report.json").read_text())["fit"]
    assert challenger_fit["labelled_defects"] == 10
    without_fit = json.loads((Path(bought["bundle_without"]) / "report.json").read_text())["fit"]
    assert without_fit["labelled_defects"] == 0


def test_a_station_labels_its_events_and_the_nightly_retrain_learns_from_them(tmp_path: Path, mosquitto: str) -> None:
    """From edge-run to the retrain's decision, nothing stood in: a station runs a Deep SAD bundle on an MJPEG clip
    where some parts carry a foreign object, collects normal frames and its events' frames; an operator labels
    events with ``edge-run label`` (defect where the clip planted one, else a false alarm); ``edge-train retrain``
    teaches the challenger the older half of the labelled defects, judges both models on the newer half and the
    fresh normals, reports the same challenger without the labels beside it, and promotes it or keeps the champion
    current as its rule decides."""
    stills = make_dataset(tmp_path / "stills", n_train=60, n_test_good=0, n_test_defect=0, size=SIZE, seed=11,
                          kinds=OBJECT_KINDS)
    engines = tmp_path / "engines"
    text = config("deep-sad").replace("pretrain_epochs: 10", "pretrain_epochs: 5, lr: 0.001").replace(
        "batch_size: 32", "batch_size: 16")
    # a high false-alarm target, so that this weak champion raises events on some of the planted objects
    text += "calibration: {policy: false-alarm-rate, target_false_alarm_rate: 0.1}\n"
    fit_bundle(parse_train_config(text), stills, engines, log=lambda _m: None)
    defects = [(15, 22), (40, 47), (65, 72), (90, 97), (115, 122)]
    clip = write_clip(tmp_path / "clip.avi", SIZE, 140, defects, fps=10.0, seed=12, kinds=OBJECT_KINDS, codec="MJPG")
    collect = tmp_path / "collect"
    station = tmp_path / "station.yaml"
    station.write_text(f"""station: st-sad
state_dir: {tmp_path / 'state'}
engine: {{engines_dir: {engines}, max_batch: 4, max_wait_ms: 5}}
cameras: [{{id: cam0, source: {clip}, max_fps: 25}}]
events: {{k: 1, n: 2, close_after: 2, cooldown_s: 0.2, update_interval_s: 100}}
collect: {{enabled: true, dir: {collect}, normal_every_s: 0.05, guard_s: 0.2, event_frames: 5}}
""")
    run = run_cli("edge-run", ["--config", station, "--engine", "deep-sad", "--mqtt", mosquitto], timeout=300)
    assert run.returncode == 0, run.stderr
    labelled = {"defect": 0, "good": 0}
    for event in sorted((collect / "events").iterdir()):
        frames = [json.loads(p.read_text())["frame"] for p in event.glob("*.json")]
        verdict = "defect" if any(a <= f < b for f in frames for a, b in defects) else "good"
        if labelled[verdict] >= 4:
            continue
        args = [str(event.name), "defect", "--kind", "foreign"] if verdict == "defect" else [str(event.name), "good"]
        done = run_cli("edge-run", ["label", "--config", station, *args])
        assert done.returncode == 0, done.stderr
        labelled[verdict] += 1
    assert labelled["defect"] >= 2, labelled  # the champion flagged some planted objects
    retrained = run_cli("edge-train", ["retrain", "--station-data", collect, "--current", engines / "deep-sad",
                                       "--json"], timeout=600)
    assert retrained.returncode == 0, retrained.stderr
    result = json.loads(retrained.stdout.strip().splitlines()[-1])
    bought = result["labelled_defects"]
    frames_labelled = len(list((collect / "test" / "foreign").glob("*.png")))
    assert bought["trained_on"] == int(frames_labelled * RetrainConfig().labelled_train_fraction)
    assert f"{frames_labelled - bought['trained_on']} labelled foreign" in result["holdout"]
    assert bought["with"]["auroc"] is not None and bought["without"]["auroc"] is not None
    assert "labelled defects: the challenger learnt from" in retrained.stderr
    print(f"labelled {labelled}; {result['decision']}; AUROC with labels {bought['with']['auroc']:.3f}, without "
          f"{bought['without']['auroc']:.3f}")
    # Either way the station's model folder says what the rule decided. Eleven runs (2-core VM, idle to load 6): the
    # challenger with the labels 0.50-0.72 against the champion's 0.38-0.56, promoted in 7 (refused twice on AUROC,
    # twice on missed defects at its threshold); with the labels above without them in 7 of 10. Deep SAD on these
    # parts is too weak for a promotion to be asserted: both outcomes are checked for what they must leave behind.
    challenger = json.loads((engines / "deep-sad" / result["challenger"] / "report.json").read_text())["fit"]
    assert challenger["labelled_defects"] == bought["trained_on"] > 0  # the bundle judged learnt from the labels
    if result["promoted"]:
        assert result["decision"].startswith("promoted")
        assert read_current(engines / "deep-sad") == result["challenger"]
    else:
        assert result["decision"].startswith("refused")
        assert read_current(engines / "deep-sad") == result["champion"]
