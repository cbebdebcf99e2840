"""Tiling of large frames: a frame cut into rows x cols tiles of the model's input size, all scored in one batch.

A small defect on a large frame is a few pixels once the frame is shrunk to a model input of 160 px; cut into
tiles, each tile keeps its pixels. The station resizes a frame to the tiled frame size (the manifest's input
size, with the bundle's resize mode) and sends it as any frame: the exported graph cuts it into tiles, scores
every tile of every frame in one batch of the model's own export module, stitches the tiles' maps into the
frame's map and takes the highest tile score as the frame's score (anomalib's Tiler does the same around its
models). Training sees the same tiles: each image is resized to the frame size and cut the same way
(``split_tiles``), so the model learns tiles, and the calibration hold-out is scored through the tiled graph as
whole frames.

Tiles side by side (stride = tile, the frame rows*tile_h x cols*tile_w) are cut and stitched with Reshape and
Transpose alone. Overlapping tiles (stride < tile: a defect on a seam is seen whole by one tile; the frame
tile + (rows-1)*stride) are cut with two Gathers of constant indices, and their maps averaged where they overlap
with two MatMuls by constant averaging matrices, as anomalib's Tiler averages them. Every shape is a constant
(the batch as -1): no loop, no data-dependent size, so TensorRT builds the graph as it builds the model's own.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

MAX_TILES = 8  # per side: 8 x 8 tiles of 160 px is a 1280 px frame, 64 model passes per frame
MAX_OVERLAP = 0.5  # a tile shares at most half of itself with its neighbour (beyond, tiles repeat each other)
INNER_SCOPE = "/inner"  # the ONNX node-name prefix of the wrapped module's nodes (TiledExport.inner)


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


def tile_stride(tile_hw: tuple[int, int], overlap: float) -> tuple[int, int]:
    """The step from one tile to the next, (sh, sw) pixels: the tile less ``overlap`` of it (0: side by side)."""
    if not 0.0 <= overlap <= MAX_OVERLAP:
        raise ValueError(f"input.tile_overlap must be between 0 and {MAX_OVERLAP}, not {overlap}")
    return tile_hw[0] - round(tile_hw[0] * overlap), tile_hw[1] - round(tile_hw[1] * overlap)


def frame_size(tile_hw: tuple[int, int], tiles: Optional[tuple[int, int]],
               stride: Optional[tuple[int, int]] = None) -> tuple[int, int]:
    """The frame the station sends: tile + (rows-1)*stride by tile + (cols-1)*stride (rows*tile_h x cols*tile_w
    side by side; the tile itself without tiling)."""
    if tiles is None:
        return tile_hw
    sh, sw = stride or tile_hw
    return tile_hw[0] + (tiles[0] - 1) * sh, tile_hw[1] + (tiles[1] - 1) * sw


def split_tiles(frames: np.ndarray, tiles: tuple[int, int], tile_hw: Optional[tuple[int, int]] = None,
                stride: Optional[tuple[int, int]] = None) -> np.ndarray:
    """uint8 [N, Hf, Wf, 3] -> [N*R*C, h, w, 3]: tile (r, c) of frame n at row n*R*C + r*C + c, the graph's order.

    Without ``tile_hw`` the tiles lie side by side and the frame must cut into them evenly.
    """
    rows, cols = tiles
    n, fh, fw, ch = frames.shape
    if tile_hw is None:
        if fh % rows or fw % cols:
            raise ValueError(f"frames of {fw}x{fh} do not cut into {rows}x{cols} tiles of equal size")
        tile_hw = fh // rows, fw // cols
    h, w = tile_hw
    sh, sw = stride or tile_hw
    if frame_size(tile_hw, tiles, (sh, sw)) != (fh, fw):
        raise ValueError(f"frames of {fw}x{fh} are not {rows}x{cols} tiles of {w}x{h} every {sw}x{sh} pixels")
    if (sh, sw) == (h, w):
        cut = frames.reshape(n, rows, h, cols, w, ch).transpose(0, 1, 3, 2, 4, 5)
        return np.ascontiguousarray(cut.reshape(n * rows * cols, h, w, ch))
    out = [frames[k, r * sh:r * sh + h, c * sw:c * sw + w] for k in range(n) for r in range(rows) for c in range(cols)]
    return np.ascontiguousarray(np.stack(out))


def _averaging(tiles: int, size: int, stride: int) -> np.ndarray:
    """[frame, tiles*size]: row p averages the tiles' pixels that fall on frame pixel p (1/how many do)."""
    frame = size + (tiles - 1) * stride
    m = np.zeros((frame, tiles * size), np.float32)
    for t in range(tiles):
        m[t * stride + np.arange(size), t * size + np.arange(size)] = 1.0
    return m / m.sum(1, keepdims=True)


class TiledExport(nn.Module):
    """A model's export module run on the tiles of each frame: frames [N, Hf, Wf, 3] -> score [N] (the highest
    tile score), anomaly_map [N, Hf, Wf] (the tiles' maps stitched in place, averaged where tiles overlap).

    ``inner`` is any registered model's export module (uint8 [B, h, w, 3] -> score [B], map [B, mh, mw]): the
    wrapper needs nothing of it but that contract, so every model tiles without a change to its file.
    Overlapping tiles need the map at the input's size (mh, mw = h, w), as every model's map is.
    """

    rows_at: torch.Tensor
    cols_at: torch.Tensor
    average_h: torch.Tensor
    average_w: torch.Tensor

    def __init__(self, inner: nn.Module, tiles: tuple[int, int], tile_hw: tuple[int, int],
                 map_hw: tuple[int, int], stride: Optional[tuple[int, int]] = None) -> None:
        super().__init__()
        self.inner = inner
        self.rows, self.cols = tiles
        self.tile_h, self.tile_w = tile_hw
        self.map_h, self.map_w = map_hw
        sh, sw = stride or tile_hw
        self.overlaps = (sh, sw) != tuple(tile_hw)
        if self.overlaps:
            if tuple(map_hw) != tuple(tile_hw):
                raise ValueError(f"overlapping tiles need the model's map at its input size {tile_hw}, not {map_hw}")
            if not (1 <= sh <= self.tile_h and 1 <= sw <= self.tile_w):
                raise ValueError(f"tile stride {sh}x{sw} must be 1..the tile's size {self.tile_h}x{self.tile_w}")
            # constant INT64 indices: TensorRT's Gather takes them as weights, not as values computed at run time
            self.register_buffer("rows_at", torch.cat([torch.arange(self.tile_h) + r * sh for r in range(self.rows)]))
            self.register_buffer("cols_at", torch.cat([torch.arange(self.tile_w) + c * sw for c in range(self.cols)]))
            self.register_buffer("average_h", torch.from_numpy(_averaging(self.rows, self.tile_h, sh)))
            self.register_buffer("average_w", torch.from_numpy(_averaging(self.cols, self.tile_w, sw).T.copy()))

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r, c, h, w = self.rows, self.cols, self.tile_h, self.tile_w
        # Cast first: TensorRT takes UINT8 only at the graph's edge (the inner module's own cast is then a no-op).
        # -1 for the batch: the shapes are constants, so no Shape/Gather arithmetic enters the graph.
        x = frames.to(torch.float32)
        if self.overlaps:  # lay the overlapping tiles side by side: [N, R*h, C*w, 3]
            x = x.index_select(1, self.rows_at).index_select(2, self.cols_at)
        tiles = x.reshape(-1, r, h, c, w, 3).permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, 3)
        score, amap = self.inner(tiles)
        score = score.reshape(-1, r * c).amax(1)
        mh, mw = self.map_h, self.map_w
        amap = amap.reshape(-1, r, c, mh, mw).permute(0, 1, 3, 2, 4).reshape(-1, r * mh, c * mw)
        if self.overlaps:  # average the side-by-side maps back onto the frame: [Hf, R*h] @ map @ [C*w, Wf]
            amap = torch.matmul(torch.matmul(self.average_h, amap), self.average_w)
        return score, amap


def tiled_module(inner: nn.Module, tiles: Optional[tuple[int, int]], tile_hw: tuple[int, int],
                 map_hw: tuple[int, int], stride: Optional[tuple[int, int]] = None) -> nn.Module:
    """``inner`` wrapped by TiledExport, or ``inner`` itself when ``tiles`` is None (no tiling)."""
    return inner if tiles is None else TiledExport(inner, tiles, tile_hw, map_hw, stride)


def stitched_map_shape(map_hw: tuple[int, int], tiles: Optional[tuple[int, int]],
                       stride: Optional[tuple[int, int]] = None) -> tuple[int, int]:
    """The frame map's shape (the manifest's ``anomaly_map`` shape): the tiles' maps side by side, or the frame's
    size when they overlap (their maps are the input's size then)."""
    return frame_size(map_hw, tiles, stride)


def tiles_per_frame(tiles: Optional[tuple[int, int]]) -> int:
    """How many model inputs one frame is: rows*cols (1 without tiling). The graph's batch of N frames is a batch
    of N*rows*cols inputs of the model, so export.max_batch and the model's size bounds count in those."""
    return 1 if tiles is None else tiles[0] * tiles[1]


def tiled_scopes(fp32_scopes: Sequence[str], tiles: Optional[tuple[int, int]]) -> tuple[str, ...]:
    """A model's FP32-kept scopes (node-name prefixes) in the tiled graph, where its nodes sit under ``inner``."""
    if tiles is None:
        return tuple(fp32_scopes)
    return tuple(INNER_SCOPE + scope for scope in fp32_scopes)
