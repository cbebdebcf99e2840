"""The shared training loop: resume gives the same weights, Ctrl-C keeps a checkpoint, the epoch choice never
sees DIR/test, data checks are told, and edge-train answers argument mistakes before torch loads."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from test_trainer_cli import assert_one_line_error, edge_train

from core.bundle import load_bundle
from core.errors import UserError
from trainer.config import parse_train_config
from trainer.loop import BEST, LAST, RUN, TrainingInterrupted
from trainer.models import create_model, get_model_class, list_models
from trainer.pipeline import CHECKPOINTS, fit_bundle
from trainer.synthetic import make_dataset

# A GANomaly small enough to train in a second or two on one CPU core; the recipe's structure unchanged.
TINY = """model: ganomaly
input: {height: 32, width: 32}
batch_size: 8
training: {workers: 0}
ganomaly: {nz: 16, ngf: 8, ndf: 8}
export: {max_batch: 8, fp16: false}
report: {overlays: 0}
"""


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("loop") / "ds", n_train=40, n_test_good=6, n_test_defect=6,
                        size=32, seed=4)


def _cfg(extra: str = ""):
    return parse_train_config(TINY + extra)


def _weights(engines: Path, name: str) -> dict[str, torch.Tensor]:
    state = torch.load(engines / "ganomaly" / CHECKPOINTS / name, weights_only=True)
    return {f"{net}.{k}": v for net, sd in state["networks"].items() for k, v in sd.items()}


def test_resume_after_an_interruption_gives_the_same_weights(parts: Path, tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    cfg = _cfg("epochs: 3\n")
    fit_bundle(cfg, parts, straight, log=lambda _m: None)

    resumed = tmp_path / "resumed"
    with pytest.raises(TrainingInterrupted, match=r"epoch 2/3.*last checkpoint \(epoch 1\)"):
        fit_bundle(_cfg("epochs: 3\n"), parts, resumed, log=lambda _m: None, stop_after_epoch=1)
    run = json.loads((resumed / "ganomaly" / CHECKPOINTS / RUN).read_text())
    assert run["status"] == "interrupted" and run["epochs_done"] == 1
    assert not (resumed / "ganomaly" / "current").exists()  # nothing promoted from a stopped run
    lines: list[str] = []
    bundle = fit_bundle(_cfg("epochs: 3\n"), parts, resumed, log=lines.append, resume=True)
    assert any("resuming from" in line and "after epoch 1/3" in line for line in lines)

    for name in (LAST, BEST):
        a, b = _weights(straight, name), _weights(resumed, name)
        assert a.keys() == b.keys()
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, f"{name}: {different[:3]}"
    report = json.loads((bundle / "report.json").read_text())
    assert report["fit"]["resumed_from_epoch"] == 1 and len(report["fit"]["history"]) == 3


def test_resume_refuses_other_data_or_nothing_to_resume(parts: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainingInterrupted):
        fit_bundle(_cfg("epochs: 2\n"), parts, tmp_path, log=lambda _m: None, stop_after_epoch=1)
    other = parse_train_config(TINY.replace("nz: 16", "nz: 8") + "epochs: 2\n")
    with pytest.raises(UserError, match="made with other data or settings"):
        fit_bundle(other, parts, tmp_path, log=lambda _m: None, resume=True)
    with pytest.raises(UserError, match="no checkpoint to resume from"):
        fit_bundle(_cfg("epochs: 2\n"), parts, tmp_path / "elsewhere", log=lambda _m: None, resume=True)


def test_epoch_choice_uses_validation_never_test(parts: Path, tmp_path: Path) -> None:
    """Without DIR/val defects: lowest validation loss on held-out normals. With them: highest val AUROC."""
    bundle = fit_bundle(_cfg("epochs: 3\n"), parts, tmp_path / "a", log=lambda _m: None)
    fit = json.loads((bundle / "report.json").read_text())["fit"]
    assert fit["selection_rule"] == "val_loss"
    losses = [row["val_loss"] for row in fit["history"]]
    assert fit["selected_epoch"] == len(losses) - losses[::-1].index(min(losses))  # ties: the later epoch
    assert all(row["val_auroc"] is None for row in fit["history"])

    with_val = make_dataset(tmp_path / "ds_val", n_train=40, n_test_good=4, n_test_defect=4, size=32, seed=5)
    val = make_dataset(tmp_path / "val_src", n_train=1, n_test_good=6, n_test_defect=6, size=32, seed=6)
    (val / "test").rename(with_val / "val")
    bundle = fit_bundle(_cfg("epochs: 3\n"), with_val, tmp_path / "b", log=lambda _m: None)
    report = json.loads((bundle / "report.json").read_text())
    fit = report["fit"]
    assert fit["selection_rule"] == "val_auroc"
    aurocs = [row["val_auroc"] for row in fit["history"]]
    assert all(0.0 <= a <= 1.0 for a in aurocs)
    assert fit["selected_epoch"] == len(aurocs) - aurocs[::-1].index(max(aurocs))
    assert report["score_scaling"]["from"] == "held-out training normals and DIR/val"


def test_data_checks_are_warned_and_noted(tmp_path: Path) -> None:
    """Mixed sizes, grayscale images, a small hold-out and a missing mask: each one line, each in the report."""
    root = make_dataset(tmp_path / "ds", n_train=12, n_test_good=3, n_test_defect=4, size=48, seed=2)
    good = sorted((root / "train" / "good").iterdir())
    for p in good[:3]:  # three wider images
        cv2.imwrite(str(p), cv2.resize(cv2.imread(str(p)), (96, 48)))
    for p in good[3:5]:  # two grayscale ones
        cv2.imwrite(str(p), cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2GRAY))
    masks = sorted((root / "ground_truth").rglob("*_mask.png"))
    masks[0].unlink()
    lines: list[str] = []
    cfg = parse_train_config(TINY.replace("width: 32}", "width: 32, resize: letterbox}") + "epochs: 1\n")
    bundle = fit_bundle(cfg, root, tmp_path / "e", log=lines.append)
    notes = json.loads((bundle / "report.json").read_text())["notes"]
    warnings = [line for line in lines if line.startswith("warning: ")]
    assert len(warnings) == 4, warnings  # and a fifth note: the evaluate stage's loud WARNING on missed defects
    assert [w.removeprefix("warning: ") for w in warnings] == [n for n in notes if not n.startswith("WARNING:")]
    assert any(n.startswith("WARNING:") and "score below the threshold" in n for n in notes)
    assert any("2 sizes" in n and "input.resize: letterbox" in n for n in notes)
    assert any("2 of 12 images are grayscale" in n for n in notes)
    assert any("calibration hold-out has 2 images" in n and "at least 30" in n for n in notes)
    missing = f"{masks[0].parent.name}/{masks[0].name.replace('_mask', '')}"
    assert any("1 of 4 defect images has no mask" in n and missing in n for n in notes)
    assert load_bundle(bundle).manifest["input"]["resize"] == "letterbox"


def test_all_gray_data_trains_a_one_channel_model(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "ds", n_train=16, n_test_good=2, n_test_defect=2, size=32, seed=3)
    for p in root.rglob("*.png"):
        if "ground_truth" not in p.parts:
            cv2.imwrite(str(p), cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2GRAY))
    bundle = fit_bundle(_cfg("epochs: 1\n"), root, tmp_path / "e", log=lambda _m: None)
    report = json.loads((bundle / "report.json").read_text())
    assert report["fit"]["channels"] == 1 and report["config"]["input"]["channels"] == "gray"


def test_ctrl_c_stops_after_the_step_keeps_the_checkpoint_and_resume_finishes(parts: Path, tmp_path: Path) -> None:
    config = tmp_path / "train.yaml"
    config.write_text(TINY + "epochs: 400\n")
    engines = tmp_path / "engines"
    last = engines / "ganomaly" / CHECKPOINTS / LAST
    proc = subprocess.Popen([sys.executable, "-m", "trainer.cli", "fit", "--data", str(parts), "--out", str(engines),
                             "--config", str(config), "--device", "cpu"], cwd=Path(__file__).resolve().parents[1],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert last.exists(), proc.communicate()[1]
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and out == ""
    final = err.strip().splitlines()[-1]
    assert final.startswith("edge-train: interrupted: interrupted during epoch ")
    assert f"is kept in {engines / 'ganomaly' / CHECKPOINTS}" in final and "--resume" in final
    done = json.loads((engines / "ganomaly" / CHECKPOINTS / RUN).read_text())["epochs_done"]
    assert done >= 1

    resumed = edge_train("fit", "--data", parts, "--out", engines, "--config", config, "--resume",
                         "--epochs", str(done + 1))
    assert resumed.returncode == 0, resumed.stderr
    assert f"after epoch {done}/{done + 1}" in resumed.stderr
    bundle = load_bundle(Path(resumed.stdout.strip().splitlines()[-1]))
    assert bundle.model_name == "ganomaly"


def test_argument_mistakes_answer_before_torch_is_imported(tmp_path: Path, parts: Path) -> None:
    probe = ("import sys; from trainer.cli import main; rc = main(sys.argv[1:]); "
             "print('torch' in sys.modules); sys.exit(rc)")
    cases = [
        (["fit", "--data", str(tmp_path / "nope")], "data folder not found"),
        (["fit", "--data", str(parts), "--model", "ganomalyy"], "unknown model 'ganomalyy'; known models: "),
        (["fit", "--data", str(parts), "--device", "tpu"], "--device tpu"),
        (["fit", "--data", str(parts), "--batch-size", "0"], "--batch-size 0: must be >= 1"),
        (["fit", "--data", str(parts), "--state-dir", str(tmp_path / "no-state")], "no-state: no such folder"),
        (["fit", "--data", str(parts), "--station", "line1"], "--station line1: needs --state-dir"),
    ]
    for argv, fragment in cases:
        proc = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=60,
                              cwd=Path(__file__).resolve().parents[1])
        assert_one_line_error(proc, fragment)
        assert proc.stdout.strip() == "False", f"{argv}: torch was imported"


def test_wrong_input_size_for_a_gan_is_one_line(parts: Path, tmp_path: Path) -> None:
    config = tmp_path / "train.yaml"
    config.write_text(TINY.replace("{height: 32, width: 32}", "{height: 48, width: 48}"))
    proc = edge_train("fit", "--data", parts, "--out", tmp_path / "e", "--config", config)
    assert_one_line_error(proc, "input 48x48: ganomaly needs a square input whose side is a power of two")


def test_frame_stream_reads_every_image_once_per_epoch_in_a_seeded_order(parts: Path) -> None:
    from trainer.data import train_paths
    from trainer.frames import TrainingData, set_epoch

    paths = train_paths(parts)
    data = TrainingData(fit_paths=paths, holdout_paths=[], hw=(32, 32), seed=3)
    loader = data.loader(paths, batch_size=7, shuffle=True)
    orders = []
    for epoch in (1, 2, 1):
        set_epoch(loader, epoch)
        batches = list(loader)
        assert all(b.dtype == torch.uint8 and b.shape[1:] == (32, 32, 3) for b in batches)
        frames = torch.cat(batches).numpy()
        assert len(frames) == len(paths)
        orders.append(frames.reshape(len(frames), -1).sum(1))
    assert not np.array_equal(orders[0], orders[1])
    np.testing.assert_array_equal(orders[0], orders[2])


def test_learning_rate_schedule_and_gradient_clipping_are_the_loops(parts: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """An update's ``lr_factor`` sets its learning rates at every epoch's start and ``max_grad_norm`` clips its
    gradients before every step: the model only declares them (a late drop, a flow's clipping)."""
    from trainer.adversarial import AdversarialModel

    seen: list[tuple[int, float, float]] = []  # (epoch seen by the factor, lr at the step, gradient norm)
    epoch_now = [0]
    plain = AdversarialModel.updates

    def declared(self: AdversarialModel) -> list:
        ups = plain(self)
        gen = ups[0]
        gen.max_grad_norm = 0.05
        gen.lr_factor = lambda epoch, epochs: (epoch_now.__setitem__(0, epoch), 1.0 if epoch < epochs else 0.1)[1]

        def record(opt: torch.optim.Optimizer, *_args: object) -> None:
            grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
            seen.append((epoch_now[0], opt.param_groups[0]["lr"], float(torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g) for g in grads])))))
        if not getattr(gen.optimizer, "_recorded", False):
            gen.optimizer.register_step_pre_hook(record)
            gen.optimizer._recorded = True  # type: ignore[attr-defined]
        return ups

    monkeypatch.setattr(AdversarialModel, "updates", declared)
    fit_bundle(_cfg("epochs: 2\n"), parts, tmp_path, log=lambda _m: None)
    lr = _cfg().settings_for("ganomaly").lr
    assert {e for e, _, _ in seen} == {1, 2}
    assert all(step_lr == pytest.approx(lr if e == 1 else 0.1 * lr) for e, step_lr, _ in seen)
    assert max(norm for _, _, norm in seen) <= 0.05 + 1e-6  # clipped: an unclipped GANomaly step is far larger


@pytest.mark.parametrize("name", [n for n in list_models() if get_model_class(n).trains_with_epochs])
def test_every_model_trained_by_epochs_refuses_no_training_images_in_one_line(name: str) -> None:
    """The loop's own check (``AnomalyModel.require_training_images``), before any stage of a model's fit."""
    from trainer.frames import TrainingData

    model = create_model(name, parse_train_config(f"model: {name}\ninput: {{height: 64, width: 64}}\n"))
    empty = TrainingData(fit_paths=[], holdout_paths=[], hw=(64, 64), workers=0, seed=0)
    with pytest.raises(UserError, match=f"^{name}: no training images to fit on; add images to train/good$"):
        model.fit(empty)
