"""Tiling (trainer/tiling.py): frames cut into tiles inside the exported graph, scored in one batch, maps stitched.

A 2 x 3 grid of 64 px tiles (frames of 128 x 192, a grid that is not square, so rows and columns cannot be
swapped unnoticed), side by side and overlapping by a quarter (tiles every 48 px, frames of 112 x 160): the cut
and the stitch against numpy, the training tiles against the graph's, and PatchCore fitted on tiles, exported
tiled and scored through ONNX Runtime: a planted defect lands where it is, any batch size gives the same answers,
FP16 agrees with FP32 and the graphs pass the TensorRT readiness check.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from core.bundle import load_bundle
from core.preprocess import resize_frame
from edge.backends.onnxruntime import OrtBackend
from trainer import export as ex
from trainer.cli import main as train_main
from trainer.config import TrainConfig, parse_train_config
from trainer.data import load_test, train_paths
from trainer.evaluate import evaluate_onnx
from trainer.frames import TrainingData
from trainer.models import RunOptions, create_model
from trainer.synthetic import make_dataset, render_part
from trainer.tensorrt_readiness import check_graph, fp16_parity
from trainer.tiling import (
    TiledExport,
    check_tiles,
    split_tiles,
    stitched_map_shape,
    tile_stride,
    tiled_module,
    tiled_scopes,
    tiles_per_frame,
)

TILE = 64
GRID = (2, 3)
FRAME = (TILE * GRID[0], TILE * GRID[1])  # (128, 192)
STRIDE = (48, 48)  # a quarter of a tile shared with the neighbour
OVERLAP_FRAME = (TILE + STRIDE[0], TILE + 2 * STRIDE[1])  # (112, 160)
MAX_BATCH = 4


class TileProbe(nn.Module):
    """An export module that shows what it was given: score = a tile's mean of channel 0, map = channel 0 (plus
    ``shift`` x the tile's mean, so that overlapping tiles disagree and their average shows)."""

    def __init__(self, shift: float = 0.0) -> None:
        super().__init__()
        self.shift = shift

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = frames.to(torch.float32)[..., 0]
        mean = x.mean((1, 2))
        return mean, x + self.shift * mean[:, None, None]


def _stitch(maps: np.ndarray, n: int, frame: tuple[int, int], stride: tuple[int, int]) -> np.ndarray:
    """Reference: each tile's map added at its place on the frame, divided by how many tiles cover each pixel."""
    total, count = np.zeros((n, *frame)), np.zeros(frame)
    k = 0
    for i in range(n):
        for r in range(GRID[0]):
            for c in range(GRID[1]):
                total[i, r * stride[0]:r * stride[0] + TILE, c * stride[1]:c * stride[1] + TILE] += maps[k]
                k += 1
    for r in range(GRID[0]):
        for c in range(GRID[1]):
            count[r * stride[0]:r * stride[0] + TILE, c * stride[1]:c * stride[1] + TILE] += 1
    return total / count


def _frames(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *FRAME, 3), dtype=np.uint8)


def test_the_graph_cuts_and_stitches_as_numpy_does(tmp_path: Path) -> None:
    frames = _frames(3)
    module = TiledExport(TileProbe(), GRID, (TILE, TILE), (TILE, TILE))
    score, amap = module(torch.from_numpy(frames))
    tiles = split_tiles(frames, GRID)  # frame n's tile (r, c) at n*6 + r*3 + c
    assert tiles.shape == (3 * 6, TILE, TILE, 3)
    np.testing.assert_array_equal(tiles[1 * 6 + 1 * 3 + 2], frames[1, TILE:, 2 * TILE:])
    np.testing.assert_array_equal(amap.numpy(), frames[..., 0].astype(np.float32))  # stitched back in place
    means = tiles[..., 0].astype(np.float64).mean((1, 2)).reshape(3, 6)
    np.testing.assert_allclose(score.numpy(), means.max(1), rtol=1e-6)  # the frame's score: its highest tile
    # the same through ONNX Runtime, at batch 1 and at a batch the example never had
    path = tmp_path / "probe.onnx"
    ex.export_onnx(module, path, FRAME)
    for n in (1, 3):
        s, m = ex.run_onnx(ex.onnx_scorer(path, MAX_BATCH), frames[:n])
        np.testing.assert_array_equal(m, frames[:n, ..., 0].astype(np.float32))
        np.testing.assert_allclose(s, means.max(1)[:n], rtol=1e-6)


def test_overlapping_tiles_are_cut_and_averaged_as_numpy_does(tmp_path: Path) -> None:
    assert tile_stride((TILE, TILE), 0.25) == STRIDE and tile_stride((TILE, TILE), 0.0) == (TILE, TILE)
    frames = np.random.default_rng(1).integers(0, 256, (3, *OVERLAP_FRAME, 3), dtype=np.uint8)
    module = TiledExport(TileProbe(shift=0.5), GRID, (TILE, TILE), (TILE, TILE), STRIDE)
    tiles = split_tiles(frames, GRID, (TILE, TILE), STRIDE)
    assert tiles.shape == (3 * 6, TILE, TILE, 3)
    np.testing.assert_array_equal(tiles[6 + 3 + 2], frames[1, 48:112, 96:160])  # frame 1, tile (1, 2)
    ch0 = tiles[..., 0].astype(np.float64)
    means = ch0.mean((1, 2))
    expected_map = _stitch(ch0 + 0.5 * means[:, None, None], 3, OVERLAP_FRAME, STRIDE)
    score, amap = module(torch.from_numpy(frames))
    np.testing.assert_allclose(amap.numpy(), expected_map, rtol=1e-5)
    np.testing.assert_allclose(score.numpy(), means.reshape(3, 6).max(1), rtol=1e-6)
    path = tmp_path / "overlap.onnx"
    ex.export_onnx(module, path, OVERLAP_FRAME)
    for n in (1, 3):
        s, m = ex.run_onnx(ex.onnx_scorer(path, MAX_BATCH), frames[:n])
        np.testing.assert_allclose(m, expected_map[:n], rtol=1e-5)
        np.testing.assert_allclose(s, means.reshape(3, 6).max(1)[:n], rtol=1e-6)
    ready = check_graph(path, MAX_BATCH)
    assert ready.ready, ready.problems
    assert ready.op_counts.get("MatMul") == 2 and not {"Loop", "Scan", "ScatterND", "ScatterElements"} & set(
        ready.op_counts)  # cut by Gathers of constant indices, averaged by two constant MatMuls


def test_tile_geometry_and_bad_grids() -> None:
    assert check_tiles(None) is None and check_tiles([2, 3]) == (2, 3)
    assert tiles_per_frame(None) == 1 and tiles_per_frame(GRID) == 6
    assert stitched_map_shape((40, 40), GRID) == (80, 120) and stitched_map_shape((40, 40), None) == (40, 40)
    assert tiled_scopes(("/distance/",), GRID) == ("/inner/distance/",)
    assert tiled_scopes(("/distance/",), None) == ("/distance/",)
    inner = TileProbe()
    assert tiled_module(inner, None, (TILE, TILE), (TILE, TILE)) is inner
    bad_grids: list[list[Any]] = [[2], [0, 2], [2, 9], [2.0, 2]]
    for bad in bad_grids:
        with pytest.raises(ValueError, match=r"input\.tiles"):
            check_tiles(bad)
    with pytest.raises(ValueError, match="do not cut into 2x3 tiles"):
        split_tiles(np.zeros((1, 129, 192, 3), np.uint8), GRID)
    with pytest.raises(ValueError, match="are not 2x3 tiles of 64x64 every 48x48 pixels"):
        split_tiles(np.zeros((1, *FRAME, 3), np.uint8), GRID, (TILE, TILE), STRIDE)
    with pytest.raises(ValueError, match=r"input\.tile_overlap must be between 0 and 0\.5"):
        tile_stride((TILE, TILE), 0.6)
    with pytest.raises(ValueError, match="overlapping tiles need the model's map at its input size"):
        TiledExport(inner, GRID, (TILE, TILE), (16, 16), STRIDE)


def test_config_reads_tiles_and_says_what_is_wrong() -> None:
    cfg = parse_train_config(f"input: {{height: {TILE}, width: {TILE}, tiles: [2, 3]}}\n")
    assert cfg.input.hw == (TILE, TILE) and cfg.input.tile_grid == GRID and cfg.input.frame_hw == FRAME
    assert parse_train_config(f"input: {{height: {TILE}, width: {TILE}}}\n").input.frame_hw == (TILE, TILE)
    overlapping = parse_train_config(f"input: {{height: {TILE}, width: {TILE}, tiles: [2, 3], tile_overlap: 0.25}}\n")
    assert overlapping.input.tile_stride == STRIDE and overlapping.input.frame_hw == OVERLAP_FRAME
    with pytest.raises(Exception, match=r"<train config>:1: input\.tile_overlap must be between 0 and 0\.5"):
        parse_train_config("input: {tiles: [2, 2], tile_overlap: 0.75}\n")
    with pytest.raises(Exception, match=r"<train config>:1: input\.tiles must be \[rows, cols\], each 1\.\.8"):
        parse_train_config("input: {tiles: [0, 3]}\n")


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Generated parts drawn at the frame's size: good ones to learn from, good and defective ones to test."""
    return make_dataset(tmp_path_factory.mktemp("tiles") / "ds", n_train=16, n_test_good=8, n_test_defect=8,
                        size=FRAME, seed=3)


def test_training_sees_the_tiles_the_graph_cuts(parts: Path) -> None:
    paths = train_paths(parts)[:5]
    data = TrainingData(fit_paths=paths, holdout_paths=[], hw=(TILE, TILE), tiles=GRID)
    assert data.frame_hw == FRAME
    frames = data.read(paths)  # what a station sends: whole frames
    assert frames.shape == (5, *FRAME, 3)
    batches = [b.numpy() for b in data.loader(paths, batch_size=2)]
    assert [len(b) for b in batches] == [12, 12, 6]  # 2 images of 6 tiles a batch
    np.testing.assert_array_equal(np.concatenate(batches), split_tiles(frames, GRID))
    np.testing.assert_array_equal(np.concatenate(batches), data.model_inputs(frames))
    whole = np.concatenate([b.numpy() for b in data.loader(paths, batch_size=2, whole=True)])
    np.testing.assert_array_equal(whole, frames)
    overlapping = TrainingData(fit_paths=paths, holdout_paths=[], hw=(TILE, TILE), tiles=GRID, tile_stride=STRIDE)
    frames = overlapping.read(paths)
    assert overlapping.frame_hw == OVERLAP_FRAME and frames.shape == (5, *OVERLAP_FRAME, 3)
    batches = [b.numpy() for b in overlapping.loader(paths, batch_size=3)]
    np.testing.assert_array_equal(np.concatenate(batches), split_tiles(frames, GRID, (TILE, TILE), STRIDE))


@pytest.fixture(scope="module", params=[0.0, 0.25], ids=["side_by_side", "overlapping"])
def tiled(request: pytest.FixtureRequest, parts: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """PatchCore fitted on the 64 px tiles of the training frames, exported as a tiled graph (FP32 and FP16)."""
    cfg = TrainConfig()
    cfg.input.height = cfg.input.width = TILE
    cfg.input.tiles = list(GRID)
    cfg.input.tile_overlap = request.param
    cfg.batch_size = 8
    model = create_model("patchcore", cfg)
    data = TrainingData(fit_paths=train_paths(parts), holdout_paths=[], hw=cfg.input.hw, tiles=cfg.input.tile_grid,
                        tile_stride=cfg.input.tile_stride)
    model.fit(data, run=RunOptions(device="cpu", amp=False, progress=False))
    module = tiled_module(model.export_module(), cfg.input.tile_grid, cfg.input.hw, model.map_shape(),
                          cfg.input.tile_stride)
    out = tmp_path_factory.mktemp("tiled")
    fp32, fp16 = out / "model.onnx", out / "model.fp16.onnx"
    ex.export_onnx(module, fp32, cfg.input.frame_hw)
    scopes = tiled_scopes(model.fp32_scopes, cfg.input.tile_grid)
    info = ex.convert_fp16(fp32, fp16, scopes)
    return {"module": module, "fp32": fp32, "fp16": fp16, "scopes": scopes, "info": info, "frame": cfg.input.frame_hw,
            "stride": cfg.input.tile_stride}


def _tiles_at(point: tuple[int, int], stride: tuple[int, int]) -> set[tuple[int, int]]:
    """The tiles (row, col) whose pixels include ``point``."""
    return {(r, c) for r in range(GRID[0]) for c in range(GRID[1])
            if r * stride[0] <= point[0] < r * stride[0] + TILE and c * stride[1] <= point[1] < c * stride[1] + TILE}


def test_a_planted_defect_lights_up_where_it_is(tiled: dict[str, Any]) -> None:
    scorer = ex.onnx_scorer(tiled["fp32"], MAX_BATCH)
    frame = tiled["frame"]
    for seed in range(4):
        # the same part with and without a defect (the defect draws from its own stream)
        clean, _ = render_part(np.random.default_rng(100 + seed), frame, None)
        defect, mask = render_part(np.random.default_rng(100 + seed), frame, "spot")
        assert mask.any()
        scores, maps = ex.run_onnx(scorer, np.stack([clean, defect]))
        assert maps.shape == (2, *frame)
        assert scores[1] > scores[0]
        defect_tiles = set().union(*(_tiles_at((int(y), int(x)), tiled["stride"]) for y, x in zip(*np.nonzero(mask),
                                                                                                 strict=True)))
        y, x = np.unravel_index(int(np.argmax(maps[1])), frame)
        peak = (int(y), int(x))
        assert _tiles_at(peak, tiled["stride"]) & defect_tiles, (seed, peak)  # the defect's own tile lights up
        # where the defect changed the map most: at the defect (the map is smoothed, sigma 4 px)
        change = tuple(int(v) for v in np.unravel_index(int(np.argmax(maps[1] - maps[0])), frame))
        assert cv2.dilate(mask, np.ones((9, 9), np.uint8))[change] > 0, (seed, change)


def test_tiled_graph_evaluates_and_any_batch_gives_the_same_answer(tiled: dict[str, Any], parts: Path) -> None:
    frame = tiled["frame"]
    test = load_test(parts, frame)
    assert test is not None and test.masks is not None
    ev = evaluate_onnx(tiled["fp32"], test, threshold=1e9, batch=MAX_BATCH)
    assert ev.metrics["image_auroc"] >= 0.9 and ev.metrics["pixel_auroc"] >= 0.9
    assert ev.maps is not None and ev.maps.shape == (len(test), *frame)
    for batch in (1, 3):
        s, m = ex.run_onnx(ex.onnx_scorer(tiled["fp32"], batch), test.images)
        np.testing.assert_allclose(s, ev.scores, rtol=1e-5)
        np.testing.assert_allclose(m, ev.maps, rtol=1e-4, atol=1e-4 * float(np.abs(ev.maps).max()))
    with torch.no_grad():  # the graph computes what the torch module does
        ref, _ = tiled["module"](torch.from_numpy(test.images[:4]))
    np.testing.assert_allclose(ev.scores[:4], ref.numpy(), rtol=1e-4)


def test_tiled_graphs_are_tensorrt_ready_and_fp16_agrees(tiled: dict[str, Any], parts: Path) -> None:
    assert tiled["info"]["fp32_nodes"] and all(n.startswith("/inner/distance/") for n in tiled["info"]["fp32_nodes"])
    for path, scopes in ((tiled["fp32"], ()), (tiled["fp16"], tiled["scopes"])):
        result = check_graph(path, MAX_BATCH, scopes)
        assert result.ready, "\n".join(result.problems)
        assert "Loop" not in result.op_counts and "Scan" not in result.op_counts
    test = load_test(parts, tiled["frame"])
    assert test is not None
    parity = fp16_parity(tiled["fp32"], tiled["fp16"], test.images, test.labels, MAX_BATCH)
    assert parity["ok"], parity


# -- the whole fit through edge-train (needs trainer/stages.py to honour input.tiles) -------------------------
def test_a_tiled_bundle_fits_evaluates_and_runs_on_the_station(parts: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "train.yaml"
    config.write_text(f"model: patchcore\nbatch_size: 8\ninput: {{height: {TILE}, width: {TILE}, tiles: [2, 3]}}\n"
                      f"training: {{workers: 0}}\ncalibration: {{holdout_fraction: 0.25}}\n"
                      f"export: {{max_batch: {MAX_BATCH}}}\nreport: {{overlays: 2}}\n")
    engines = tmp_path / "engines"
    assert train_main(["fit", "--data", str(parts), "--out", str(engines), "--config", str(config),
                       "--device", "cpu"]) == 0
    bundle = load_bundle(engines / "patchcore")
    spec = bundle.manifest["input"]
    assert bundle.input_hw == FRAME  # the station sends whole frames
    assert spec["tiles"] == {"grid": list(GRID), "tile": [TILE, TILE], "stride": [TILE, TILE]}
    assert bundle.manifest["outputs"][1]["shape"] == ["N", *FRAME]
    assert bundle.manifest["fp16"]["fp32_scopes"] == ["/inner/distance/"]
    assert bundle.manifest["metrics"]["image_auroc"] >= 0.9
    # the station: its resize to the manifest's size, its backend, any frame size in
    backend = OrtBackend(bundle, max_batch=MAX_BATCH, providers=["CPUExecutionProvider"], warmup=False)
    defect, _ = render_part(np.random.default_rng(7), (300, 420), "spot")
    clean, _ = render_part(np.random.default_rng(7), (300, 420), None)
    frames = np.stack([resize_frame(f, bundle.input_hw, bundle.input_resize) for f in (clean, defect)])
    out = backend.infer(frames)
    assert out["anomaly_map"].shape == (2, *FRAME) and out["score"][1] > out["score"][0]
    assert train_main(["check-engine", str(bundle.path), "--data", str(parts)]) == 0
    assert capsys.readouterr().out.rstrip().endswith(f"TensorRT readiness at batch {MAX_BATCH}: ready")
    assert train_main(["eval", str(bundle.path), "--data", str(parts), "--out", str(tmp_path / "eval")]) == 0
    capsys.readouterr()
    # a rerun reads the tiles back from the manifest: the same hold-out through the same graph, the same threshold
    assert train_main(["rerun", str(bundle.path), "--data", str(parts), "--stages", "calibrate,evaluate",
                       "--json"]) == 0
    rerun = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rerun["calibration"]["threshold"] == pytest.approx(bundle.threshold, rel=1e-5)
    assert rerun["metrics"]["image_auroc"] == pytest.approx(bundle.manifest["metrics"]["image_auroc"])
