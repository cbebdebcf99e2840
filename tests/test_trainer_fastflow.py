"""FastFlow end to end and its flow: fitted by ``fit_bundle`` on generated washers with planted surface defects
(the shared loop on cached Lite0 features, codec-robust training on as shipped), scored through the exported ONNX
graph (the issue's bar: image AUROC >= 0.95), torch/ONNX FP32/FP16 parity, TensorRT readiness of both graphs,
any batch size; and the flow itself: a level's 2D flow inverts, its log-det and log-likelihood are the
change-of-variables formula computed independently (an autograd Jacobian's slogdet over the whole map), and the
map is anomalib's (the mean over levels of -exp(mean_c -0.5 z^2), upsampled), its maximum the score.

Recipe for time: 128 px, 50 parts (40 fitted), 20 epochs at batch 8 and lr 3e-3 (the shipped 40 epochs at 1e-3
reach the same on the washers, in twice the time): about 20 s of CPU, 1.5 minutes on the 2-core VM at load
average 10. Measured with this recipe: image AUROC 0.97.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from model_checks import check_exported_bundle

from core.bundle import load_bundle
from trainer.config import parse_train_config
from trainer.evaluate import evaluate_bundle
from trainer.flows import pack_maps
from trainer.models import SURFACE_DEFECTS, create_model
from trainer.models.fastflow import Fastflow, LevelFlow2d
from trainer.pipeline import fit_bundle
from trainer.synthetic import DEFECT_KINDS, make_dataset

SIZE = 128
CONFIG = f"""model: fastflow
input: {{height: {SIZE}, width: {SIZE}}}
epochs: 20
batch_size: 8
training: {{workers: 0}}
fastflow: {{lr: 0.003}}
export: {{max_batch: 8}}
report: {{overlays: 1}}
"""


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("fastflow") / "ds", n_train=50, n_test_good=20, n_test_defect=20,
                        size=SIZE, seed=7, kinds=DEFECT_KINDS)


@pytest.fixture(scope="module")
def bundle(parts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    lines: list[str] = []
    path = fit_bundle(parse_train_config(CONFIG), parts, tmp_path_factory.mktemp("engines"), log=lines.append)
    print("\n".join(line for line in lines if line.startswith(("kept epoch", "test:", "parity"))))
    return path


def test_accuracy_through_the_onnx_graph(bundle: Path, parts: Path) -> None:
    m = evaluate_bundle(bundle, parts).metrics
    print(f"fastflow: image AUROC {m['image_auroc']:.3f}, pixel AUROC {m['pixel_auroc']:.3f}")
    assert m["image_auroc"] >= 0.95  # the bar
    fit = json.loads((bundle / "report.json").read_text())["fit"]
    assert len(fit["history"]) == 20 and fit["flow_steps"] == 8  # trained by the loop, the paper's 8 steps
    assert fit["feature_cache"]["hits"] > 0


def test_parity_fp16_order_readiness_and_any_batch(bundle: Path, parts: Path) -> None:
    check_exported_bundle(bundle, parts, SIZE, Fastflow.fp32_scopes)
    f16 = load_bundle(bundle).manifest["parity"]["onnx_fp16"]
    assert f16["score_max_rel_diff"] < 1e-2 and f16["map_max_rel_diff"] < 2e-2


def test_the_2d_flow_inverts_and_its_likelihood_is_the_change_of_variables() -> None:
    torch.manual_seed(0)
    level = LevelFlow2d((4, 3, 3), steps=4, hidden_ratio=1.0, conv3x3_only=False, clamp=2.0, seed=1).double()
    for p in level.flow.parameters():  # away from the near-identity start (not the fixed permutations)
        if p.requires_grad:
            p.data.add_(0.5 * torch.randn_like(p))
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    z, log_det = level.flow(x)
    back, _ = level.flow(z, rev=True)
    assert torch.allclose(back, x, atol=1e-9)  # hard permutations: exact
    assert log_det.abs().max() > 1.0
    normal = torch.distributions.Normal(0.0, 1.0)
    for i in range(2):
        jac = torch.autograd.functional.jacobian(lambda v: level.flow(v.view(1, 4, 3, 3))[0].flatten(), x[i].flatten())
        _sign, logabs = torch.linalg.slogdet(jac)
        assert log_det[i].item() == pytest.approx(logabs.item(), abs=1e-9)
        # the training loss term: 0.5 ||z||^2 - log|det| = -(log p - the Gaussian's constant), of the normed map
        nll = level.nll(x[i:i + 1])[0]
        z_i, det_i = level(x[i:i + 1])
        expected = normal.log_prob(z_i).sum() + det_i[0]
        assert (-nll + 36 * normal.log_prob(torch.tensor(0.0, dtype=torch.float64))).item() == \
            pytest.approx(expected.item(), abs=1e-9)


def test_the_map_is_anomalibs_and_the_score_its_max() -> None:
    model = create_model("fastflow", parse_train_config("model: fastflow\ninput: {height: 64, width: 64}\n"
                                                        "fastflow: {flow_steps: 2}\n"))
    assert isinstance(model, Fastflow) and model.catches == SURFACE_DEFECTS
    maps = [torch.randn(2, *s) for s in model.shapes]
    with torch.no_grad():
        score, amap = model.head(maps)
        levels = []
        for level, m in zip(model.flows, maps, strict=True):
            z, _ = level(m)
            prob = torch.exp(-0.5 * (z**2).mean(1, keepdim=True))
            levels.append(F.interpolate(-prob, size=(64, 64), mode="bilinear", align_corners=False))
        expected = torch.stack(levels, -1).mean(-1)[:, 0]
        assert torch.allclose(amap, expected, atol=1e-6)
        assert torch.allclose(score, expected.flatten(1).amax(1))
        assert torch.allclose(model.raw_score(pack_maps(maps)), score)
        lik = model.log_likelihood(pack_maps(maps))
        assert len(lik) == 3 and all(t.shape == (2,) for t in lik)
