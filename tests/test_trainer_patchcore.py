"""PatchCore end to end in-process: accuracy through the ONNX graph, torch/ONNX parity, bounded export."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from core.errors import UserError
from trainer import export as ex
from trainer.config import TrainConfig
from trainer.data import load_test, train_paths
from trainer.evaluate import evaluate_onnx
from trainer.frames import TrainingData
from trainer.models import create_model, list_models
from trainer.models.patchcore import BankDistance, PatchCore, PatchCoreExport
from trainer.synthetic import make_dataset

SIZE = 128


def _config() -> TrainConfig:
    cfg = TrainConfig()
    cfg.input.height = cfg.input.width = SIZE
    cfg.export.max_batch = 8
    return cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """PatchCore fitted on 40 generated good parts at 128 px, exported to FP32 and FP16 ONNX."""
    root = make_dataset(tmp_path_factory.mktemp("pc") / "ds", n_train=40, n_test_good=16, n_test_defect=24,
                        size=SIZE, seed=7)
    cfg = _config()
    model = create_model("patchcore", cfg)
    t0 = time.monotonic()
    data = TrainingData(fit_paths=train_paths(root), holdout_paths=[], hw=(SIZE, SIZE))
    info = model.fit(data)
    print(f"fit {time.monotonic() - t0:.2f}s: {info}")
    out = tmp_path_factory.mktemp("onnx")
    fp32, fp16 = out / "model.onnx", out / "model.fp16.onnx"
    ex.export_onnx(model.export_module(), fp32, (SIZE, SIZE))
    ex.convert_fp16(fp32, fp16)
    return model, root, fp32, fp16


def test_registered() -> None:
    assert "patchcore" in list_models()
    with pytest.raises(UserError, match="unknown model 'nope'; known models: .*patchcore"):
        create_model("nope", _config())


def test_image_auroc_through_onnx(trained) -> None:
    model, root, fp32, _ = trained
    test = load_test(root, (SIZE, SIZE))
    ev = evaluate_onnx(fp32, test, threshold=1e9)
    print("ONNX metrics:", ev.metrics)
    assert ev.metrics["image_auroc"] >= 0.95
    assert ev.metrics["pixel_auroc"] >= 0.90
    assert ev.maps is not None and ev.maps.shape == (len(test), SIZE, SIZE)


def test_parity_torch_onnx_fp32_fp16(trained) -> None:
    model, root, fp32, fp16 = trained
    frames = load_test(root, (SIZE, SIZE)).images[::4]
    result = ex.parity(model.export_module(), fp32, fp16, frames, batch=4)
    f32, f16 = result["onnx_fp32"], result["onnx_fp16"]
    print(f"parity max rel diff: FP32 score {f32['score_max_rel_diff']:.2e} map {f32['map_max_rel_diff']:.2e}; "
          f"FP16 score {f16['score_max_rel_diff']:.2e} map {f16['map_max_rel_diff']:.2e}")
    assert result["onnx_fp32"]["score_max_rel_diff"] < 1e-4
    assert result["onnx_fp32"]["map_max_rel_diff"] < 1e-4
    assert result["onnx_fp16"]["score_max_rel_diff"] < 1e-2
    assert result["onnx_fp16"]["map_max_rel_diff"] < 2e-2


def test_onnx_contract_and_dynamic_batch(trained) -> None:
    model, root, fp32, fp16 = trained
    for path in (fp32, fp16):
        m = onnx.load(str(path))
        assert m.opset_import[0].version >= 17
        inp = m.graph.input[0]
        assert inp.name == "frames" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
        dims = inp.type.tensor_type.shape.dim
        assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [SIZE, SIZE, 3]
        assert [o.name for o in m.graph.output] == ["score", "anomaly_map"]
    frames = load_test(root, (SIZE, SIZE)).images[:5]
    together, _ = ex.run_onnx(ex.onnx_scorer(fp32, batch=5), frames)
    alone = np.concatenate([ex.run_onnx(ex.onnx_scorer(fp32, batch=1), frames[i:i + 1])[0] for i in range(5)])
    np.testing.assert_allclose(together, alone, rtol=1e-5)
    fp16_model = onnx.load(str(fp16))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in fp16_model.graph.initializer)


def test_distance_chunking_is_exact_and_bounded(trained) -> None:
    model, root, _, _ = trained
    frames = torch.from_numpy(load_test(root, (SIZE, SIZE)).images[:3])
    assert isinstance(model, PatchCore) and model.bank is not None
    patches = model.grid[0] * model.grid[1]
    checks = model.export_checks(max_batch=4, max_elements=4 * patches * 500)
    assert checks["bank_chunk"] == 500 and checks["bank_chunks"] == -(-len(model.bank) // 500)
    assert checks["largest_distance_tensor_elements"] <= 4 * patches * 500
    chunked = PatchCoreExport(model.features, model.bank, model.grid, model.hw, 4.0, chunk=500).eval()
    whole = PatchCoreExport(model.features, model.bank, model.grid, model.hw, 4.0, chunk=len(model.bank)).eval()
    with torch.no_grad():
        a, b = chunked(frames), whole(frames)
    torch.testing.assert_close(a[0], b[0])
    # Brute force nearest neighbour on a few patches agrees with the matmul formulation.
    q = torch.randn(2, 7, model.bank.shape[1])
    expected = torch.cdist(q, model.bank).amin(-1)
    torch.testing.assert_close(BankDistance(model.bank, 333)(q), expected, rtol=1e-4, atol=1e-3)
    with pytest.raises(UserError, match="max_batch"):
        model.export_checks(max_batch=100_000, max_elements=2**25)


def test_greedy_coreset_is_farthest_point() -> None:
    from trainer.models.patchcore import greedy_coreset

    x = torch.randn(2000, 16, generator=torch.Generator().manual_seed(0))
    got = greedy_coreset(x, 50, 0, torch.Generator().manual_seed(1)).tolist()
    start = int(torch.randint(2000, (1,), generator=torch.Generator().manual_seed(1)))
    expected, min_d = [start], ((x - x[start]) ** 2).sum(1)
    for _ in range(49):
        j = int(min_d.argmax())
        expected.append(j)
        min_d = torch.minimum(min_d, ((x - x[j]) ** 2).sum(1))
    assert got == expected
    assert len(set(got)) == 50


def test_coreset_candidates_bound_the_selection(tmp_path: Path) -> None:
    """Greedy selection costs picks x candidates: with a cap, only a seeded random subset of the patches is
    searched, and the bank comes from it (fit time stays bounded as the data grows)."""
    root = make_dataset(tmp_path / "ds", n_train=6, n_test_good=0, n_test_defect=0, size=64, seed=3)
    cfg = _config()
    cfg.input.height = cfg.input.width = 64
    cfg.settings_for("patchcore").coreset_ratio = 0.5
    cfg.settings_for("patchcore").coreset_candidates = 300
    model = create_model("patchcore", cfg)
    info = model.fit(TrainingData(fit_paths=train_paths(root), holdout_paths=[], hw=(64, 64)))
    assert info["n_patches"] > 300 and info["coreset_candidates"] == 300
    assert info["bank_size"] == 300  # ratio x all patches, but never more than the candidates
