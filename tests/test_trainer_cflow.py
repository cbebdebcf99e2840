"""CFLOW-AD end to end and its flow: fitted by ``fit_bundle`` on generated washers with planted surface defects
(the shared loop on cached Lite0 features), scored through the exported ONNX graph (the issue's bar: image
AUROC >= 0.95), torch/ONNX FP32/FP16 parity, TensorRT readiness of both graphs, any batch size; and the flow
itself: it inverts, its log p / C is the change-of-variables formula computed independently (an autograd
Jacobian's slogdet), and the map is the official normalisation (levels - the summed, upsampled exp(log p/C - max)).

Recipe for time: 128 px, 50 parts (40 fitted), 8 epochs of 8 fiber batches per level and batch, codec-robust
training off (so that the feature cache's count is exact): 30 s of CPU, about 2 minutes on the 2-core VM at load
average 10.
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
from trainer.models.cflow import Cflow, positional_encoding_2d
from trainer.pipeline import fit_bundle
from trainer.synthetic import DEFECT_KINDS, make_dataset

SIZE = 128
CONFIG = f"""model: cflow
input: {{height: {SIZE}, width: {SIZE}}}
epochs: 8
training: {{workers: 0}}
codec_augment: {{enabled: false}}
export: {{max_batch: 8}}
report: {{overlays: 1}}
"""


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("cflow") / "ds", n_train=50, n_test_good=20, n_test_defect=20,
                        size=SIZE, seed=7, kinds=DEFECT_KINDS)


@pytest.fixture(scope="module")
def bundle(parts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    lines: list[str] = []
    path = fit_bundle(parse_train_config(CONFIG), parts, tmp_path_factory.mktemp("engines"), log=lines.append)
    print("\n".join(line for line in lines if line.startswith(("kept epoch", "cflow", "test:", "parity"))))
    return path


def test_accuracy_through_the_onnx_graph(bundle: Path, parts: Path) -> None:
    m = evaluate_bundle(bundle, parts).metrics
    print(f"cflow: image AUROC {m['image_auroc']:.3f}, pixel AUROC {m['pixel_auroc']:.3f}")
    assert m["image_auroc"] >= 0.95  # the bar
    report = json.loads((bundle / "report.json").read_text())
    fit = report["fit"]
    assert fit["fibers_per_level"] == [8, 8, 8] and len(fit["history"]) == 8  # trained by the loop
    # the backbone ran once per distinct frame (40 fitted, 10 held out), the flows trained on cached features
    # (codec-robust training is off here: its fresh degraded draws are frames seen once, see trainer/flows.py)
    cache = fit["feature_cache"]
    assert cache["misses"] == cache["entries"] == 50 and cache["hits"] > 5 * cache["misses"]


def test_parity_fp16_order_readiness_and_any_batch(bundle: Path, parts: Path) -> None:
    check_exported_bundle(bundle, parts, SIZE, Cflow.fp32_scopes)
    f16 = load_bundle(bundle).manifest["parity"]["onnx_fp16"]
    assert f16["score_max_rel_diff"] < 1e-2 and f16["map_max_rel_diff"] < 2e-2


def _small_model() -> Cflow:
    model = create_model("cflow", parse_train_config("model: cflow\ninput: {height: 64, width: 64}\n"
                                                     "cflow: {coupling_blocks: 3}\n"))
    assert isinstance(model, Cflow) and model.catches == SURFACE_DEFECTS
    gen = torch.Generator().manual_seed(0)
    for level in model.flows:  # away from the near-identity start, standardisation on: the test has teeth
        for p in level.flow.parameters():
            if p.requires_grad:
                p.data.add_(0.5 * torch.randn(p.shape, generator=gen))
        c = level.channels
        level.standardise_with(torch.randn(c, generator=gen), torch.rand(c, generator=gen) + 0.5)
    return model


def test_the_flow_inverts_and_its_likelihood_is_the_change_of_variables() -> None:
    model = _small_model()
    level = model.flows[0].double()
    for block in level.flow:  # FrEIA's soft permutations are orthogonal to float32 rounding: make them exact
        q, r = torch.linalg.qr(block.w_perm.data)
        q = q * torch.sign(torch.diagonal(r))
        block.w_perm.data, block.w_perm_inv.data = q, q.t().contiguous()
    c = level.channels
    gen = torch.Generator().manual_seed(1)
    e = torch.randn(4, c, generator=gen, dtype=torch.float64) * 3
    cond = level.condition[[0, 5, 17, 40]]
    log_p = level.vectors(e, cond)
    z, _ = level.flow((e - level.shift) * level.scale, c=[cond])
    back, _ = level.flow(z, c=[cond], rev=True)
    assert torch.allclose(back / level.scale + level.shift, e, atol=1e-9)
    normal = torch.distributions.Normal(0.0, 1.0)
    for i in range(4):
        def to_z(v: torch.Tensor, i: int = i) -> torch.Tensor:
            return level.flow(((v - level.shift) * level.scale)[None], c=[cond[i:i + 1]])[0][0]
        _sign, logabs = torch.linalg.slogdet(torch.autograd.functional.jacobian(to_z, e[i]))
        expected = (normal.log_prob(z[i]).sum() + logabs) / c
        assert log_p[i].item() == pytest.approx(expected.item(), abs=1e-9)


def test_the_map_is_the_official_normalisation() -> None:
    model = _small_model()
    for i, level in enumerate(model.flows):
        level.log_p_max.fill_(-1.0 - i)
    maps = [torch.randn(2, *s) for s in model.shapes]
    with torch.no_grad():
        score, amap = model.head(maps)
        expected = torch.zeros(2, 1, 64, 64)
        for level, m in zip(model.flows, maps, strict=True):
            e = m.permute(0, 2, 3, 1).reshape(-1, level.channels)
            cond = level.condition.repeat(2, 1)
            lp = level.vectors(e, cond).reshape(2, 1, *level.grid)
            expected += F.interpolate(torch.exp(lp - level.log_p_max), size=(64, 64), mode="bilinear",
                                      align_corners=True)
        expected = len(model.flows) - expected
        assert torch.allclose(amap, expected[:, 0], atol=1e-5)
        assert torch.allclose(score, expected.flatten(1).amax(1))
        assert torch.allclose(model.raw_score(pack_maps(maps)), score)


def test_the_positional_encoding_is_the_official_one() -> None:
    p = positional_encoding_2d(8, 3, 5)
    # channels 0..3 follow the column (sin, cos at frequencies 1 and 1e-2), 4..7 the row
    assert torch.allclose(p[0, 1], torch.sin(torch.arange(5.0)))
    assert torch.allclose(p[1, 2], torch.cos(torch.arange(5.0)))
    assert torch.allclose(p[2, 0], torch.sin(torch.arange(5.0) * 1e-2))
    assert torch.allclose(p[4, :, 0], torch.sin(torch.arange(3.0)))
    assert torch.allclose(p[7, :, 4], torch.cos(torch.arange(3.0) * 1e-2))
    with pytest.raises(ValueError, match="multiple of 4"):
        positional_encoding_2d(6, 2, 2)
