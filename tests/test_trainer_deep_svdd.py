"""Deep SVDD end to end and its parts: trained by the shared loop on generated parts (both phases), exported,
scored through the ONNX graph on a planted foreign object, torch/ONNX FP32/FP16 parity, a station streaming a
clip with the bundle; the network has no bias and no affine BatchNorm, the centre follows the ±0.1 rule, the
soft-boundary objective and radius, and --resume across the two phases.

The planted anomaly is a foreign object (a stray nut): Deep SVDD scores the whole image by one representation,
which is what it is for (surface defects are the patch models' job; see docs/training.md). Grey 64 px input (the paper's
MNIST network, 8 and 4 channels) and a short recipe: 10 pre-training and 10 one-class epochs at batch 32 on 160
parts (40 held out): the file takes 29 s on the quiet 2-core VM, about 2 minutes at load average 9; with 96
parts and 5 + 10 epochs at batch 16 the image AUROC was 0.50-0.64, with this recipe 0.80-0.84. Labelled
foreign objects in DIR/val make the loop keep the one-class epoch with the best validation AUROC (never
DIR/test).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from edge_helpers import assert_seq_monotonic, stream_clip
from torch import nn

from core.bundle import load_bundle
from core.errors import ConfigError
from trainer.config import load_train_config, parse_train_config
from trainer.data import train_paths
from trainer.evaluate import evaluate_bundle
from trainer.frames import TrainingData
from trainer.loop import TrainingInterrupted
from trainer.models import FOREIGN_OBJECTS, RunOptions, create_model
from trainer.models.deep_svdd import (
    CIFAR_NET,
    MNIST_NET,
    ONE_CLASS_DIR,
    PRETRAIN_DIR,
    AutoencoderPretraining,
    DeepSvdd,
    centre_from_mean,
)
from trainer.pipeline import fit_bundle
from trainer.synthetic import OBJECT_KINDS, make_dataset, write_clip

SIZE = 64
CONFIG = """model: deep-svdd
input: {height: 64, width: 64, channels: gray}
epochs: 10
batch_size: 32
training: {workers: 0}
deep_svdd: {pretrain_epochs: 10}
export: {max_batch: 8}
report: {overlays: 1}
"""
SMALL = """model: deep-svdd
input: {height: 32, width: 32, channels: gray}
epochs: 3
batch_size: 8
training: {workers: 0}
"""


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("svdd") / "ds", n_train=200, n_test_good=30, n_test_defect=30,
                        size=SIZE, seed=1, kinds=OBJECT_KINDS, n_val_defect=16)


@pytest.fixture(scope="module")
def bundle(parts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    lines: list[str] = []
    path = fit_bundle(parse_train_config(CONFIG), parts, tmp_path_factory.mktemp("engines"), log=lines.append)
    print("\n".join(line for line in lines if line.startswith(("kept epoch", "test:", "parity"))))
    return path


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> TrainingData:
    root = make_dataset(tmp_path_factory.mktemp("small") / "ds", n_train=32, n_test_good=2, n_test_defect=2,
                        size=32, seed=3, kinds=OBJECT_KINDS)
    paths = train_paths(root)
    return TrainingData(fit_paths=paths[:24], holdout_paths=paths[24:], hw=(32, 32), workers=0, seed=0)


def _small(extra: str = "") -> DeepSvdd:
    model = create_model("deep-svdd", parse_train_config(SMALL + extra))
    assert isinstance(model, DeepSvdd)
    return model


def _run(tmp: Path, **kw: object) -> RunOptions:
    return RunOptions(device="cpu", amp=False, progress=False, checkpoint_dir=tmp, fingerprint="f", **kw)  # type: ignore[arg-type]


# -- through the ONNX graph, as a station runs it -----------------------------------------------------------
def test_accuracy_through_the_onnx_graph(bundle: Path, parts: Path) -> None:
    m = evaluate_bundle(bundle, parts).metrics
    print(f"deep-svdd: image AUROC {m['image_auroc']:.3f}, pixel AUROC {m['pixel_auroc']:.3f}")
    assert m["image_auroc"] >= 0.75  # the issue's bar; the measured value is printed
    report = json.loads((bundle / "report.json").read_text())
    assert report["metrics"]["image_auroc"] == pytest.approx(m["image_auroc"], abs=1e-6)
    fit = report["fit"]
    assert fit["pretraining"]["epochs"] == 10 and len(fit["history"]) == 10  # both phases ran, by the loop
    assert fit["selection_rule"] == "val_auroc" and fit["objective"] == "one-class"
    assert fit["widths"] == MNIST_NET[0] and fit["rep_dim"] == MNIST_NET[1]
    assert report["score_scaling"] is None  # raw squared distances, thresholded by calibration


def test_fp16_parity_and_the_bundle_contract(bundle: Path) -> None:
    manifest = load_bundle(bundle).manifest
    parity = manifest["parity"]
    print(f"parity: FP32 {parity['onnx_fp32']['score_max_rel_diff']:.2e}, "
          f"FP16 {parity['onnx_fp16']['score_max_rel_diff']:.2e} (map {parity['onnx_fp16']['map_max_rel_diff']:.2e})")
    assert parity["onnx_fp32"]["score_max_rel_diff"] < 1e-4 and parity["onnx_fp32"]["map_max_rel_diff"] < 1e-4
    assert parity["onnx_fp16"]["score_max_rel_diff"] < 1e-2
    assert parity["onnx_fp16"]["map_max_rel_diff"] < 2e-2
    assert parity["onnx_score_only"]["score_max_rel_diff"] < 1e-4
    for name in ("model.onnx", "model.fp16.onnx"):
        graph = onnx.load(str(bundle / name)).graph
        assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
        assert [o.name for o in graph.output] == ["score", "anomaly_map"]
    assert manifest["outputs"][1]["shape"] == ["N", SIZE, SIZE]
    assert manifest["fp16"]["fp32_nodes"] and all(n.startswith("/distance/") for n in manifest["fp16"]["fp32_nodes"])
    checkpoints = bundle.parent / "checkpoints"
    assert (checkpoints / PRETRAIN_DIR / "best.pt").is_file() and (checkpoints / ONE_CLASS_DIR / "best.pt").is_file()
    assert not list(bundle.rglob("*.pt"))


def test_the_map_splits_the_score_over_positions() -> None:
    """At the feature grid the map is each position's share of the score: e . phi_p - (c . e + R^2) / P, phi_p
    the representation of that position's features alone (phi is linear in them); the shares sum to the score."""
    model = _small("deep_svdd: {objective: soft-boundary}\n")
    gen = torch.Generator().manual_seed(0)
    model.sphere.centre.copy_(torch.randn(model.rep_dim, generator=gen) * 0.3)
    model.sphere.radius.fill_(0.7)
    module = model.export_module()
    frames = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8, generator=gen)
    with torch.no_grad():
        f = module.encoder.features(module.frame_input(frames))
        z = module.encoder.fc(f.flatten(1))
        grid = module.shares.grid_shares(f, z)[:, 0]
        score, amap = module(frames)
        c, r2, positions = model.sphere.centre, 0.7**2, f.shape[2] * f.shape[3]
        e = z - c
        for i, j in [(0, 0), (3, 5), (7, 7)]:
            alone = torch.zeros_like(f)
            alone[:, :, i, j] = f[:, :, i, j]
            expected = (e * module.encoder.fc(alone.flatten(1))).sum(1) - ((c * e).sum(1) + r2) / positions
            assert torch.allclose(grid[:, i, j], expected, rtol=1e-4, atol=1e-5)
    assert torch.allclose(grid.flatten(1).sum(1), score, rtol=1e-4, atol=1e-5)
    assert torch.allclose(score, ((z - c) ** 2).sum(1) - r2, rtol=1e-5, atol=1e-5)
    assert amap.shape == (3, 32, 32) and grid.shape == (3, 8, 8)


def test_a_station_streams_a_clip_with_the_bundle(bundle: Path, tmp_path: Path, mosquitto: str) -> None:
    frames = 60
    clip = write_clip(tmp_path / "line.avi", (120, 160), frames, [(20, 40)], kinds=OBJECT_KINDS, seed=2)
    loaded = load_bundle(bundle)
    got = stream_clip(tmp_path, mosquitto, bundle, clip, "svdd")
    assert got["stats"][-1]["cameras"]["cam0"]["frames_processed"] == frames
    assert got["stats"][-1]["model_version"] == loaded.version
    events = got["event"]
    assert_seq_monotonic(events)
    assert {(e["model"], e["threshold"]) for e in events} <= {("deep-svdd", loaded.threshold)}
    starts = [e["frame"] for e in events if e["type"] == "start"]
    print(f"deep-svdd: events opened at frames {starts} (foreign object in frames 20-39)")
    assert len([e for e in events if e["type"] == "end"]) == len(starts)


# -- the parts ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels", ["gray", "colour"])
def test_the_networks_have_no_bias_and_no_affine_batchnorm(channels: str) -> None:
    model = create_model("deep-svdd", parse_train_config(SMALL.replace("channels: gray", f"channels: {channels}")))
    assert isinstance(model, DeepSvdd)
    pre = AutoencoderPretraining(model)
    nets: dict[str, nn.Module] = {"encoder": model.encoder, "decoder": pre.decoder}
    for name, net in nets.items():
        names = [n for n, _ in net.named_parameters()]
        assert names and all(n.endswith("weight") for n in names), (name, names)  # no bias parameter anywhere
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                assert m.bias is None, (name, m)
            if isinstance(m, nn.BatchNorm2d):
                assert not m.affine and m.weight is None and m.bias is None, (name, m)
    expected = MNIST_NET if channels == "gray" else CIFAR_NET
    assert model.widths == expected[0] and model.encoder.fc.out_features == expected[1]
    # the paper's two networks: 5x5 convolutions, one per level, and a 2x2 max-pool after each
    convs = [m for m in model.encoder.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == expected[0] and all(c.kernel_size == (5, 5) for c in convs)
    assert model.catches == FOREIGN_OBJECTS


def test_the_centre_follows_the_plus_minus_eps_rule(small_data: TrainingData) -> None:
    mean = torch.tensor([0.05, -0.05, 0.3, -0.2, 0.0, 0.1, -0.1, 0.0999, -1e-6])
    assert centre_from_mean(mean, 0.1).tolist() == pytest.approx([0.1, -0.1, 0.3, -0.2, 0.0, 0.1, -0.1, 0.1, -0.1])
    model = _small()
    c = model._centre(small_data, torch.device("cpu"))
    with torch.no_grad():
        z = model.encoder(model.prepare(torch.from_numpy(small_data.read(small_data.fit_paths))))
    assert torch.allclose(c, centre_from_mean(z.mean(0), 0.1), atol=1e-6)  # the mean over the fitted images
    assert bool((c.abs() >= 0.1 - 1e-7).all())


def test_the_soft_boundary_objective_and_its_radius(small_data: TrainingData, tmp_path: Path) -> None:
    model = _small("deep_svdd: {objective: soft-boundary, nu: 0.2, warm_up_epochs: 1, pretrain_epochs: 1}\n")
    facts = model.fit(small_data, run=_run(tmp_path))
    radius = float(model.sphere.radius)
    last = model._last_distances  # the last training batch's squared distances (train-mode BatchNorm)
    assert radius > 0 and facts["radius"] == pytest.approx(radius, abs=1e-6) and facts["objective"] == "soft-boundary"
    frames = torch.from_numpy(small_data.read(small_data.fit_paths))
    with torch.no_grad():
        x = model.prepare(frames)
        dist = ((model.encoder(x) - model.sphere.centre) ** 2).sum(1)
        loss, _ = model._loss(x, {})
        score, _ = model.export_module()(frames)
    assert float(loss) == pytest.approx(radius**2 + float((dist - radius**2).clamp(min=0).mean()) / 0.2, rel=1e-5)
    assert torch.allclose(score, dist - radius**2, rtol=1e-4, atol=1e-5)  # the graph's score: d - R^2
    # R: the (1 - nu) quantile of the radii of the last training batch (train-mode BatchNorm), the kept epoch
    # being the last (no DIR/val defects, and the soft-boundary loss does not compare epochs)
    assert facts["selection_rule"] == "last"
    assert last is not None and len(last) == 8
    assert radius == pytest.approx(float(np.quantile(last.sqrt().numpy(), 0.8)), rel=1e-6)


def test_the_one_class_objective_is_the_mean_squared_distance(small_data: TrainingData) -> None:
    model = _small()
    model.sphere.centre.copy_(model._centre(small_data, torch.device("cpu")))
    x = model.prepare(torch.from_numpy(small_data.read(small_data.fit_paths[:8])))
    loss, _ = model._loss(x, {})
    d = ((model.encoder(x) - model.sphere.centre) ** 2).sum(1)
    assert float(loss.detach()) == pytest.approx(float(d.detach().mean()), rel=1e-6)
    assert float(model.sphere.radius) == 0.0


def test_each_phase_drops_its_learning_rate_after_the_milestone(small_data: TrainingData, tmp_path: Path) -> None:
    """The official MultiStepLR (one milestone) per phase, through the loop's ``Update.lr_factor``."""
    model = _small("deep_svdd: {pretrain_epochs: 2, lr_milestone: 1, lr: 0.001}\n")
    seen: dict[str, list[float]] = {"pre-training": [], "one-class": []}
    original = AutoencoderPretraining._loss

    def pretraining_loss(phase: AutoencoderPretraining, x: torch.Tensor, shared: dict) -> object:  # type: ignore[type-arg]
        seen["pre-training"].append(phase.optimizer.param_groups[0]["lr"])
        return original(phase, x, shared)

    one_class = model._loss

    def one_class_loss(x: torch.Tensor, shared: dict) -> object:  # type: ignore[type-arg]
        seen["one-class"].append(model.optimizer.param_groups[0]["lr"])
        return one_class(x, shared)

    model._loss = one_class_loss  # type: ignore[method-assign,assignment]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(AutoencoderPretraining, "_loss", pretraining_loss)
        model.fit(small_data, run=_run(tmp_path))
    per_epoch = len(seen["one-class"]) // 3  # 3 one-class epochs
    assert set(seen["pre-training"][:per_epoch]) == {0.001}
    assert seen["pre-training"][per_epoch:] == pytest.approx([0.0001] * per_epoch)
    assert set(seen["one-class"][:per_epoch]) == {0.001}
    assert seen["one-class"][per_epoch:] == pytest.approx([0.0001] * 2 * per_epoch)


def test_resume_continues_the_interrupted_phase(small_data: TrainingData, tmp_path: Path) -> None:
    extra = "deep_svdd: {pretrain_epochs: 2}\n"
    straight = _small(extra)
    straight.fit(small_data, run=_run(tmp_path / "a"))
    interrupted = _small(extra)
    with pytest.raises(TrainingInterrupted, match="--resume"):
        interrupted.fit(small_data, run=_run(tmp_path / "b", stop_after_epoch=1))
    resumed = _small(extra)
    lines: list[str] = []
    resumed.fit(small_data, lines.append, _run(tmp_path / "b", resume=True))
    assert any("pre-training finished earlier" in line for line in lines)  # loaded, not repeated
    frames = small_data.read(small_data.holdout_paths)
    assert np.allclose(resumed.score(frames)[0], straight.score(frames)[0], rtol=1e-5, atol=1e-7)
    assert torch.equal(resumed.sphere.centre, straight.sphere.centre)


def test_bad_settings_are_one_line_config_errors(tmp_path: Path) -> None:
    path = tmp_path / "train.yaml"
    path.write_text("model: deep-svdd\ndeep_svdd:\n  objective: hard\n")
    with pytest.raises(ConfigError, match=r"train.yaml:3.*deep_svdd.objective must be one-class or soft-boundary"):
        load_train_config(path)
    with pytest.raises(ConfigError, match="deep_svdd.nu"):
        parse_train_config("deep_svdd: {nu: 0}\n")
    with pytest.raises(ConfigError, match="deep_svdd.widths"):
        parse_train_config("deep_svdd: {widths: [8, 8, 8, 8, 8]}\n")
