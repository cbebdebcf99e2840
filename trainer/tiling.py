"""Tiling of large frames: a frame cut into rows x cols tiles of the model's input size, all scored in one batch.

A small defect on a large frame is a few pixels once the frame is shrunk to a model input of 160 px; cut into
tiles, each tile keeps its pixels. The station resizes a frame to rows*tile_h x cols*tile_w (the manifest's
input size, with the bundle's resize mode) and sends it as any frame: the exported graph cuts it into tiles,
scores every tile of every frame in one batch of the model's own export module, stitches the tiles' maps into
the frame's map and takes the highest tile score as the frame's score (anomalib's Tiler does the same around
its models). Cutting and stitching are Reshape and Transpose with constant shapes (the batch as -1): no loop,
no data-dependent size, so TensorRT builds the graph as it builds the model's own. Training sees the same
tiles: each image is resized to the full frame size and cut the same way (``split_tiles``), so the model
learns tiles, and the calibration hold-out is scored through the tiled graph as whole frames.

Tiles do not overlap: a defect on a seam is seen in part by each neighbour, and the stitched map is the tiles'
own maps side by side.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

MAX_TILES = 8  # per side: 8 x 8 tiles of 160 px is a 1280 px frame, 64 model passes per frame


def check_tiles(tiles: Optional[Sequence[int]]) -> Optional[tuple[int, int]]:
    """``tiles`` as (rows, cols), None for no tiling; a ValueError naming ``input.tiles`` when it is not two
    whole numbers in 1..MAX_TILES."""
    if tiles is None:
        return None
    values = list(tiles)
    if len(values) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError("input.tiles must be [rows, cols], two whole numbers, e.g. [2, 2] (or null: no tiling)")
    rows, cols = values
    if not (1 <= rows <= MAX_TILES and 1 <= cols <= MAX_TILES):
        raise ValueError(f"input.tiles rows and cols must be between 1 and {MAX_TILES}, not [{rows}, {cols}]")
    return rows, cols


def frame_size(tile_hw: tuple[int, int], tiles: Optional[tuple[int, int]]) -> tuple[int, int]:
    """The frame the station sends: rows*tile_h x cols*tile_w (the tile itself without tiling)."""
    if tiles is None:
        return tile_hw
    return tile_hw[0] * tiles[0], tile_hw[1] * tiles[1]


def split_tiles(frames: np.ndarray, tiles: tuple[int, int]) -> np.ndarray:
    """uint8 [N, R*h, C*w, 3] -> [N*R*C, h, w, 3]: tile (r, c) of frame n at row n*R*C + r*C + c, the graph's order."""
    rows, cols = tiles
    n, fh, fw, ch = frames.shape
    if fh % rows or fw % cols:
        raise ValueError(f"frames of {fw}x{fh} do not cut into {rows}x{cols} tiles of equal size")
    h, w = fh // rows, fw // cols
    cut = frames.reshape(n, rows, h, cols, w, ch).transpose(0, 1, 3, 2, 4, 5)
    return np.ascontiguousarray(cut.reshape(n * rows * cols, h, w, ch))


class TiledExport(nn.Module):
    """A model's export module run on the tiles of each frame: frames [N, R*h, C*w, 3] -> score [N] (the highest
    tile score), anomaly_map [N, R*mh, C*mw] (the tiles' maps stitched in place).

    ``inner`` is any registered model's export module (uint8 [B, h, w, 3] -> score [B], map [B, mh, mw]): the
    wrapper needs nothing of it but that contract, so every model tiles without a change to its file.
    """

    def __init__(self, inner: nn.Module, tiles: tuple[int, int], tile_hw: tuple[int, int],
                 map_hw: tuple[int, int]) -> None:
        super().__init__()
        self.inner = inner
        self.rows, self.cols = tiles
        self.tile_h, self.tile_w = tile_hw
        self.map_h, self.map_w = map_hw

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r, c, h, w = self.rows, self.cols, self.tile_h, self.tile_w
        # Cast first: TensorRT takes UINT8 only at the graph's edge (the inner module's own cast is then a no-op).
        # -1 for the batch: the shapes are constants, so no Shape/Gather arithmetic enters the graph.
        x = frames.to(torch.float32)
        tiles = x.reshape(-1, r, h, c, w, 3).permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, 3)
        score, amap = self.inner(tiles)
        score = score.reshape(-1, r * c).amax(1)
        mh, mw = self.map_h, self.map_w
        amap = amap.reshape(-1, r, c, mh, mw).permute(0, 1, 3, 2, 4).reshape(-1, r * mh, c * mw)
        return score, amap


def tiled_module(inner: nn.Module, tiles: Optional[tuple[int, int]], tile_hw: tuple[int, int],
                 map_hw: tuple[int, int]) -> nn.Module:
    """``inner`` wrapped by TiledExport, or ``inner`` itself when ``tiles`` is None (no tiling)."""
    return inner if tiles is None else TiledExport(inner, tiles, tile_hw, map_hw)


def stitched_map_shape(map_hw: tuple[int, int], tiles: Optional[tuple[int, int]]) -> tuple[int, int]:
    """The frame map's shape: the tile map's shape times (rows, cols) (the manifest's ``anomaly_map`` shape)."""
    return frame_size(map_hw, tiles)


def tiles_per_frame(tiles: Optional[tuple[int, int]]) -> int:
    """How many model inputs one frame is: rows*cols (1 without tiling). The graph's batch of N frames is a batch
    of N*rows*cols inputs of the model, so export.max_batch and the model's size bounds count in those."""
    return 1 if tiles is None else tiles[0] * tiles[1]


INNER_SCOPE = "/inner"  # the ONNX node-name prefix of the wrapped module's nodes (TiledExport.inner)


def tiled_scopes(fp32_scopes: Sequence[str], tiles: Optional[tuple[int, int]]) -> tuple[str, ...]:
    """A model's FP32-kept scopes (node-name prefixes) in the tiled graph, where its nodes sit under ``inner``."""
    if tiles is None:
        return tuple(fp32_scopes)
    return tuple(INNER_SCOPE + scope for scope in fp32_scopes)
