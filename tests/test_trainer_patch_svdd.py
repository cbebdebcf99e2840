"""Patch SVDD end to end and its parts: fitted by ``fit_bundle`` on generated washers and scored through the exported
ONNX graph, the shared export checks (FP32 parity, FP16 order, TensorRT readiness, any batch); the position pairs
(the 8 neighbours and their labels), the SVDD' jitter pairs and loss, the fully convolutional encoder against the
official patch-by-patch one, the patch-to-pixel distribution against the official loop, the graph's
nearest-neighbour distance against brute force, and the score as the map's maximum.

Recipe for time (``make test``): 96 px, 50 washers (40 fitted), K = 24 (the official 64 scaled to the input; the
K/2 = 12 px level's encoder has 2 valid convs after its first), strides 4, 30 epochs at batch 16 x 16 pairs and
lr 3e-3, banks cut to 4096 rows a level (coreset). That is far from trained: the issue's bar (image AUROC >= 0.95)
takes 300 epochs and the K/2 level's map alone (``test_the_bar_with_the_longer_recipe``, marked slow: 2.6 minutes
at load average 2, 8 at load 9; this file's fast tests: 19 s at load 0.6, 2 minutes at load 9).
The fast test asserts the mechanics: the position task is being learned, the map finds the defects (pixel AUROC)
and the image score is above chance (0.69 on this draw, 'mult'; the official 'mult' after 300 epochs: 0.93).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from model_checks import check_exported_bundle, fit_on_washers, image_and_pixel_auroc, washers

from core.errors import UserError
from trainer.config import parse_train_config
from trainer.models import SURFACE_DEFECTS, create_model
from trainer.models.patch_svdd import (
    NEIGHBOURS,
    Distribute,
    HierEncoder,
    PatchSvdd,
    Standardise,
    crop,
    jitter_pairs,
    position_pairs,
    small_widths,
    svdd_distance,
)

SIZE = 96


def config(epochs: int, extra: str = "") -> str:
    """The test's recipe (module docstring); ``extra``: more patch_svdd settings."""
    return f"""model: patch-svdd
input: {{height: {SIZE}, width: {SIZE}}}
epochs: {epochs}
batch_size: 16
training: {{workers: 0}}
patch_svdd: {{patch_size: 24, stride: 4, small_stride: 4, pairs: 16, lr: 0.003{extra}}}
export: {{max_batch: 8}}
report: {{overlays: 0}}
"""

LN8 = float(np.log(8))  # the position classifier's loss at chance


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return washers(tmp_path_factory.mktemp("patch_svdd") / "ds", SIZE)


@pytest.fixture(scope="module")
def bundle(parts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return fit_on_washers(config(30, ", bank_size: 4096"), parts, tmp_path_factory.mktemp("engines"))


def test_mechanics_through_the_onnx_graph(bundle: Path, parts: Path) -> None:
    image, pixel = image_and_pixel_auroc(bundle, parts, "patch-svdd")
    assert image >= 0.6  # above chance (0.5) after 30 epochs: 0.69 (untrained 0.8-0.9; early training dips first)
    assert pixel is not None and pixel > 0.9  # the map points at the defects
    fit = json.loads((bundle / "report.json").read_text())["fit"]
    history = fit["history"]
    assert len(history) == 30 and fit["patch_sizes"] == [24, 12] and fit["grids"] == [[19, 19], [22, 22]]
    assert history[-1]["ssl_large"] < 0.9 * LN8 < history[0]["ssl_large"]  # the K patches' positions are learned
    assert fit["bank_large"] == fit["bank_small"] == 4096 < fit["patches_small"]  # coreset-cut banks


def test_parity_fp16_order_readiness_and_any_batch(bundle: Path, parts: Path) -> None:
    check_exported_bundle(bundle, parts, SIZE, PatchSvdd.fp32_scopes)


@pytest.mark.slow
def test_the_bar_with_the_longer_recipe(parts: Path, tmp_path: Path) -> None:
    """The issue's bar (image AUROC >= 0.95) on the same washers: 300 epochs, the K/2 level's map (the official
    'mult' of both levels reached 0.93 in the same fit: docstring of trainer/models/patch_svdd.py)."""
    torch.set_num_threads(1)
    path = fit_on_washers(config(300, ", combine: small"), parts, tmp_path)
    image, pixel = image_and_pixel_auroc(path, parts, "patch-svdd")
    assert image >= 0.95  # the bar
    assert pixel is not None and pixel > 0.95


def _model(extra: str = "", size: int = 64) -> PatchSvdd:
    cfg = parse_train_config(f"model: patch-svdd\ninput: {{height: {size}, width: {size}}}\nepochs: 1\n"
                             f"batch_size: 4\ntraining: {{workers: 0}}\n{extra}")
    model = create_model("patch-svdd", cfg)
    assert isinstance(model, PatchSvdd)
    return model


def test_position_pairs_are_the_8_neighbours_with_their_labels() -> None:
    k, hw = 32, (1000, 1000)
    g = torch.Generator().manual_seed(0)
    p1, p2, labels = position_pairs(4000, hw, k, g)
    assert set(labels.tolist()) == set(range(8))
    inside = ((p1 >= k) & (p1 <= hw[0] - 2 * k)).all(1)  # p2 cannot have been clipped
    assert inside.sum() > 3000
    move = (p2 - p1)[inside]
    direction = torch.tensor(NEIGHBOURS)[labels[inside]]
    assert torch.equal(move.sign(), direction)  # the label names where the neighbour is
    moved = move[direction != 0].abs()
    assert moved.min() == 3 * k // 4 and moved.max() == k - 1  # 3K/4 + 0..K/4-1 on each moved axis
    # the label order is the official pos_to_diff: 0 is up-left, 4 right, 6 down
    assert NEIGHBOURS[0] == (-1, -1) and NEIGHBOURS[4] == (0, 1) and NEIGHBOURS[6] == (1, 0)
    p1, p2, _ = position_pairs(500, (40, 40), k, g)
    assert (p2 >= 0).all() and (p2 <= 40 - k).all()  # clipped to the image


def test_jitter_pairs_move_by_up_to_k_over_32_and_never_stay() -> None:
    g = torch.Generator().manual_seed(1)
    for k, j in ((64, 2), (32, 1), (16, 1)):
        p1, p2 = jitter_pairs(3000, (500, 500), k, g)
        inside = ((p1 >= j) & (p1 <= 500 - k - j)).all(1)
        move = (p2 - p1)[inside]
        assert move.abs().max() == j and not (move == 0).all(1).any()
        assert len({tuple(m) for m in move.tolist()}) == (2 * j + 1) ** 2 - 1  # every offset but (0, 0)


def test_svdd_loss_of_identical_embeddings_is_zero_and_l2_otherwise() -> None:
    h = torch.randn(5, 64, 1, 1)
    assert torch.equal(svdd_distance(h, h.clone()), torch.zeros(5))
    other = h.clone()
    other[:, 3] += 0.5
    other[:, 7] -= 1.2
    assert torch.allclose(svdd_distance(h, other), torch.full((5,), float(np.hypot(0.5, 1.2))), atol=1e-6)


def test_the_loss_is_ssl_plus_lambda_svdd_at_both_levels() -> None:
    model = _model("patch_svdd: {patch_size: 16, svdd_weight: 0.5, pairs: 3}")
    x = torch.randn(2, 3, 64, 64)
    parts = model.objective(x, torch.Generator().manual_seed(0))
    assert set(parts) == {"ssl_large", "svdd_large", "ssl_small", "svdd_small"}
    assert all(v.shape == (2,) for v in parts.values())
    expected = parts["ssl_large"] + parts["ssl_small"] + 0.5 * (parts["svdd_large"] + parts["svdd_small"])
    assert torch.allclose(model._total(parts), expected)
    assert (parts["ssl_large"] > 1.5).all() and (parts["ssl_large"] < 3).all()  # untrained: near ln 8


def test_the_fully_convolutional_encoder_is_the_official_patch_encoder() -> None:
    torch.manual_seed(0)
    assert small_widths(32, 64) == [32, 64, 128, 128, 64, 32, 32, 64]  # the official EncoderDeep at K = 64
    for k in (64, 24):
        enc = HierEncoder(3, k, 64).eval()
        x = torch.randn(2, 3, 80, 80)
        with torch.no_grad():
            large, small = enc.maps(x)
            for y, c in ((0, 0), (8, 4), (80 - k, 80 - k)):
                patch = crop(x, torch.tensor([1]), torch.tensor([[y, c]]), k)
                assert torch.allclose(enc(patch)[0, :, 0, 0], large[1, :, y // 2, c // 2], atol=1e-5)
                patch = crop(x, torch.tensor([1]), torch.tensor([[y, c]]), k // 2)
                assert torch.allclose(enc.small(patch)[0, :, 0, 0], small[1, :, y // 2, c // 2], atol=1e-5)
        assert large.shape[-1] == (80 - k) // 2 + 1 and small.shape[-1] == (80 - k // 2) // 2 + 1


def _distribute_loop(scores: np.ndarray, hw: tuple[int, int], k: int, s: int) -> np.ndarray:
    """The official distribute_score, as written there."""
    mask = np.zeros(hw, np.float32)
    cnt = np.zeros(hw, np.int32)
    for i in range(scores.shape[0]):
        for j in range(scores.shape[1]):
            mask[i * s:i * s + k, j * s:j * s + k] += scores[i, j]
            cnt[i * s:i * s + k, j * s:j * s + k] += 1
    cnt[cnt == 0] = 1
    return mask / cnt


def test_the_pixel_map_is_the_official_mean_over_covering_patches() -> None:
    rng = np.random.default_rng(0)
    for hw, k, s in (((23, 19), 8, 3), ((16, 16), 4, 4), ((20, 26), 6, 5)):
        grid = ((hw[0] - k) // s + 1, (hw[1] - k) // s + 1)
        scores = rng.random(grid).astype(np.float32)
        got = Distribute(k, s, grid, hw)(torch.from_numpy(scores)[None, None])[0, 0].numpy()
        assert got.shape == hw
        assert np.allclose(got, _distribute_loop(scores, hw, k, s), atol=1e-6)


def test_the_graphs_nearest_neighbour_distance_is_brute_force() -> None:
    model = _model("patch_svdd: {patch_size: 16, stride: 4, small_stride: 2}\n"
                   "export: {max_batch: 2, max_distance_elements: 2000}")  # small chunks: several per bank
    torch.manual_seed(3)
    model.standardise.mean.normal_(0, 0.1)
    banks = (torch.randn(57, 64) * 0.3, torch.randn(230, 64) * 0.3)
    export = model._scorer(banks, torch.device("cpu"))
    assert export.distance_small.n_chunks > 1
    frames = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        x = model.standardise(frames)
        d_large, d_small = export.distances(x)
        large, small = model.encoder.maps(x)
    for emb, step, bank, d in ((large, 2, banks[0], d_large), (small, 1, banks[1], d_small)):
        q = emb[:, :, ::step, ::step].permute(0, 2, 3, 1).double().numpy()  # [N,h,w,D]
        brute = np.sqrt(((q[..., None, :] - bank.double().numpy()) ** 2).sum(-1)).min(-1)
        assert d.shape == (2, 1, *brute.shape[1:])
        assert np.allclose(d[:, 0].numpy(), brute, atol=1e-4)


def test_the_score_is_the_max_of_the_product_of_the_levels_maps() -> None:
    model = _model("patch_svdd: {patch_size: 16, stride: 4, small_stride: 4}")
    assert model.catches == SURFACE_DEFECTS and model.map_in_score_units
    torch.manual_seed(4)
    banks = (torch.randn(40, 64) * 0.3, torch.randn(90, 64) * 0.3)
    export = model._scorer(banks, torch.device("cpu"))
    frames = torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        score, amap = export(frames)
        d_large, d_small = export.distances(model.standardise(frames))
        product = (export.spread_large(d_large) * export.spread_small(d_small))[:, 0]
    assert amap.shape == (3, 64, 64) and torch.allclose(amap, product)
    assert torch.equal(score, amap.flatten(1).max(1).values)
    assert score.unique().numel() == 3  # three frames, three scores


def test_the_standardisation_is_the_mean_image_over_255() -> None:
    stand = Standardise(3, (4, 4))
    frames = torch.randint(0, 256, (2, 4, 4, 3), dtype=torch.uint8)
    mean_rgb = torch.rand(1, 3, 4, 4) * 255
    stand.mean.copy_(mean_rgb / 127.5 - 1)  # the mean image as FrameInput's [-1, 1] values
    expected = (frames.permute(0, 3, 1, 2).flip(1).float() - mean_rgb) / 255
    assert torch.allclose(stand(frames), expected, atol=1e-5)


def test_the_bank_is_cut_from_the_training_patches_by_coreset_or_at_random() -> None:
    rows = torch.randn(500, 64)
    for extra, size in (("bank_size: 50", 50), ("bank_size: 50, bank_candidates: 30", 30),
                        ("bank_size: 50, bank_selection: random", 50), ("bank_size: 800", 500)):
        model = _model(f"patch_svdd: {{{extra}}}")
        bank = model._select(rows, "small", lambda _m: None)
        assert bank.shape == (size, 64) and model.fit_facts()["bank_small"] == size
        assert (bank[:, None] == rows[None]).all(-1).any(1).all()  # every bank row is a training patch's
        assert len(torch.unique(bank, dim=0)) == size


@pytest.mark.parametrize("bad", ["patch_svdd: {patch_size: 20}", "patch_svdd: {patch_size: 128}",
                                 "patch_svdd: {stride: 5}", "patch_svdd: {combine: max}",
                                 "patch_svdd: {bank_selection: all}"])
def test_bad_settings_are_one_line(bad: str) -> None:
    with pytest.raises((UserError, ValueError)):
        parse_train_config(f"model: patch-svdd\n{bad}\n")
