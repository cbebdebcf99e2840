"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022) on a backbone's taps.

Patch embeddings: two backbone levels (stride 8 and 16), each locally aggregated by a k x k average
pool, the coarser one upsampled to the finer grid, concatenated (optionally randomly projected).
Memory bank: a greedy k-center coreset of the training patches (selection sped up by a random
projection, as in the paper). Score: max over a frame's patches of the nearest-neighbour distance to the
bank; anomaly map: those distances upsampled to the input size and Gaussian-blurred.
The paper's score reweighting is not applied (optional in the paper, small effect).

Under torchrun (trainer/distributed.py) each process extracts the features of its share of the images and
all of them are gathered on every process in the one-process order; the greedy selection's per-pick distance
update is split by candidate rows and the pick is the argmax over the processes, so the coreset is the one a
single process selects.

Every intermediate is bounded at the export batch: the distance tensor batch x patches x bank-chunk
is computed as ||b||^2 - 2ab (+ ||a||^2 after the min) with a matmul, chunked so it stays under
``export.max_distance_elements`` (far below TensorRT's 2^31-element limit). The default bound (2^21 at the export
batch) is set by speed, not memory: a chunk's distances that stay in cache keep the per-frame cost flat in the batch
size (one block over the whole bank made batch 8 cost more per frame than batch 1 on a CPU).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from core.errors import UserError
from trainer import distributed
from trainer.backbones import Backbone, load_backbone, resolve_taps
from trainer.ingraph import ImageNetInput, MapBlur
from trainer.models import (
    FEATURE_MEMORY,
    SURFACE_DEFECTS,
    AnomalyModel,
    ModelDefaults,
    ModelSettings,
    RunOptions,
    register_model,
    setting,
)

if TYPE_CHECKING:
    from trainer.frames import TrainingData


class FrameFeatures(nn.Module):
    """uint8 BGR frames [N,H,W,3] -> locally aware patch embeddings [N,C,h,w] (cast, RGB, normalise in-graph)."""

    projection: Optional[torch.Tensor]

    def __init__(self, backbone: Backbone, layers: tuple[int, int], neighbourhood: int,
                 projection: Optional[torch.Tensor] = None):
        super().__init__()
        self.backbone = backbone.eval()
        self.layers = tuple(layers)
        self.neighbourhood = neighbourhood
        self.input = ImageNetInput(backbone.mean, backbone.std)
        if projection is not None:
            self.register_buffer("projection", projection.reshape(*projection.shape, 1, 1).clone())
        else:
            self.projection = None

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        fine, coarse = self.backbone.features(self.input(frames), self.layers)
        k = self.neighbourhood
        if k > 1:
            fine = F.avg_pool2d(fine, k, stride=1, padding=k // 2, count_include_pad=False)
            coarse = F.avg_pool2d(coarse, k, stride=1, padding=k // 2, count_include_pad=False)
        if coarse.shape[-2:] != fine.shape[-2:]:
            coarse = F.interpolate(coarse, size=(int(fine.shape[-2]), int(fine.shape[-1])), mode="bilinear",
                                   align_corners=False)
        emb = torch.cat([fine, coarse], dim=1)
        if self.projection is not None:
            emb = F.conv2d(emb, self.projection)
        return emb


class BankDistance(nn.Module):
    """Nearest-neighbour distance of each query patch to the memory bank, in bounded chunks.

    ``min_m ||a - b_m||^2 = ||a||^2 + min_m (||b_m||^2 - 2 a.b_m)``: one matmul and one reduction per
    chunk of the bank; features are centred on the bank mean first so the squared norms stay small
    (less cancellation, FP16-friendlier). The ``||b_m||^2`` term rides in the matmul (a column of ones on
    the queries, a row of squared norms under the bank): adding it separately was a second pass over the
    [N, P, chunk] product, 17 % of a frame's time at 160 px.
    """

    mu: torch.Tensor

    def __init__(self, bank: torch.Tensor, chunk: int):
        super().__init__()
        mu = bank.mean(0)
        centred = bank - mu
        self.register_buffer("mu", mu.clone())
        self.n_chunks = 0
        for i, start in enumerate(range(0, len(bank), chunk)):
            part = centred[start:start + chunk]
            augmented = torch.cat([-2.0 * part.t(), (part * part).sum(1)[None]], 0)  # [C+1, chunk]
            self.register_buffer(f"bank_aug_t{i}", augmented.contiguous())
            self.n_chunks += 1

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        q = q - self.mu
        q_aug = torch.cat([q, torch.ones_like(q[..., :1])], -1)  # [..., C+1]
        best: Optional[torch.Tensor] = None
        for i in range(self.n_chunks):
            part = torch.matmul(q_aug, getattr(self, f"bank_aug_t{i}")).amin(-1)
            best = part if best is None else torch.minimum(best, part)
        assert best is not None
        return ((q * q).sum(-1) + best).clamp_min(0.0).sqrt()


class PatchCoreExport(nn.Module):
    """frames uint8 [N,H,W,3] BGR -> (score float32 [N], anomaly_map float32 [N,H,W])."""

    def __init__(self, features: FrameFeatures, bank: torch.Tensor, grid: tuple[int, int], hw: tuple[int, int],
                 blur_sigma: float, chunk: int):
        super().__init__()
        self.features = features
        self.distance = BankDistance(bank, chunk)
        self.grid = grid
        self.hw = hw
        self.blur = MapBlur(blur_sigma, hw) if blur_sigma > 0 else None

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.features(frames)  # [N,C,h,w]
        q = emb.flatten(2).transpose(1, 2)  # [N,P,C]
        d = self.distance(q)  # [N,P]
        score = d.amax(1)
        amap = F.interpolate(d.reshape(-1, 1, self.grid[0], self.grid[1]), size=self.hw, mode="bilinear",
                             align_corners=False)
        if self.blur is not None:
            amap = self.blur(amap)
        return score, amap.squeeze(1)


def greedy_coreset(features: torch.Tensor, n: int, projection_dim: int, generator: torch.Generator,
                   log: Callable[[str], None] = lambda _m: None,
                   shard: distributed.Shard = distributed.ONE_PROCESS) -> torch.Tensor:
    """Indices of ``n`` rows chosen by greedy k-center (farthest-point) selection.

    Distances are measured in a random Gaussian projection to ``projection_dim`` dims (Johnson-Lindenstrauss;
    the paper's speed-up); 0 = full dims. Starts from a random row (seeded). With a ``shard`` of several
    processes (all holding the same ``features``), each keeps the distances of its slice of the rows and the
    pick is the argmax over the processes: the same indices as one process, in 1/world of the work a pick.
    """
    total = features.shape[0]
    if n >= total:
        return torch.arange(total)
    x = features
    if 0 < projection_dim < features.shape[1]:
        r = torch.randn(features.shape[1], projection_dim, generator=generator) / math.sqrt(projection_dim)
        x = features @ r
    start = int(torch.randint(total, (1,), generator=generator))
    chosen = torch.empty(n, dtype=torch.long)
    chosen[0] = start
    x = x - x.mean(0)  # centred: smaller norms, less cancellation in ||a||^2 - 2ab + ||b||^2
    x_sq_all = (x * x).sum(1)
    lo, hi = shard.bounds(total)
    mine = x[lo:hi].contiguous()  # this rank's candidate rows (all of them in one process)
    x_sq = x_sq_all[lo:hi]
    min_d = x_sq - 2.0 * (mine @ x[start]) + x_sq_all[start]
    dist = torch.empty_like(min_d)
    t0 = time.monotonic()
    # Each pick is one memory-bound O(N*d) pass: a second thread buys nothing, and under contention (a busy
    # station PC, a nightly job beside others) two threads made each pick 3-4x slower than one.
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tqdm(total=n, initial=1, desc="coreset", unit="pick", disable=None if shard.writer else True,
                  mininterval=1.0, leave=False) as bar:
            for i in range(1, n):
                local = int(torch.argmax(min_d)) if len(min_d) else 0
                value = float(min_d[local]) if len(min_d) else -math.inf
                idx = distributed.global_argmax(value, lo + local, shard)
                chosen[i] = idx
                torch.mv(mine, x[idx], out=dist)  # one mat-vec per pick instead of materialising (x - x[idx])
                dist.mul_(-2.0).add_(x_sq).add_(x_sq_all[idx])
                torch.minimum(min_d, dist, out=min_d)
                bar.update(1)
                if bar.disable and time.monotonic() - t0 > 10:  # no terminal: a log line now and then instead
                    log(f"coreset: {i}/{n} selected")
                    t0 = time.monotonic()
    finally:
        torch.set_num_threads(previous_threads)
    return chosen


@dataclass
class PatchCoreSettings(ModelSettings):
    """PatchCore (Roth et al. 2022): a memory bank of normal patch features from the taps in backbone.layers; the
    score is the distance of a frame's farthest patch to its nearest bank row. Input: a multiple of 16 (raise it
    for small defects; the cost grows with the pixel count)."""

    neighbourhood: int = setting(3, "local aggregation window (avg pool, stride 1) over each feature map, odd")
    projection_dim: int = setting(0, "random projection of patch features to this many dims before the bank; "
                                  "0 = off (64 dims with [2, 4])")
    coreset_ratio: float = setting(
        0.025, "fraction of training patches kept by greedy k-center coreset selection: 0.025 matched 0.1 on "
        "generated parts (image AUROC 0.997 vs 0.995, 3 seeds) at 2.4x the frames/s; 0.01 lost some (0.992, F1 "
        "0.96 vs 0.98): benchmarks/README.md. Counted over every fitted image, codec copies included (twice the "
        "rows for stills; counting only the distinct images lost 0.0045 image AUROC)")
    coreset_projection_dim: int = setting(128, "random projection used only to speed up coreset selection "
                                          "(paper); 0 = off")
    max_bank_size: int = setting(20000, "hard cap on memory-bank rows (bounds export size and per-frame work)")
    coreset_candidates: int = setting(
        200000, "at most this many patches (a seeded random subset) enter coreset selection, whose time is picks "
        "x candidates; 0 = all (500 images: 640 000 patches, 148 s)")
    blur_sigma: float = setting(4.0, "Gaussian blur of the anomaly map, in input pixels; 0 = off")

    def validate(self) -> None:
        if self.neighbourhood < 1 or self.neighbourhood % 2 == 0:
            raise ValueError("patchcore.neighbourhood must be an odd number >= 1")
        if not 0.0 < self.coreset_ratio <= 1.0:
            raise ValueError("patchcore.coreset_ratio must be in (0, 1]")
        if self.projection_dim < 0 or self.coreset_projection_dim < 0:
            raise ValueError("patchcore projection dims must be >= 0 (0 = off)")
        if self.coreset_candidates < 0:
            raise ValueError("patchcore.coreset_candidates must be >= 0 (0 = every patch)")
        if self.max_bank_size < 1 or self.blur_sigma < 0:
            raise ValueError("patchcore.max_bank_size must be >= 1 and blur_sigma >= 0")


@register_model("patchcore", settings=PatchCoreSettings)
class PatchCore(AnomalyModel):
    """PatchCore: memory bank of normal patch features; kNN distance as the anomaly score."""

    catches = SURFACE_DEFECTS
    family = FEATURE_MEMORY
    map_in_score_units = True  # score = max of the patch distances the map upsamples and smooths
    trains_with_epochs = False
    trains_distributed = True
    display_name = "PatchCore"
    defaults = ModelDefaults(input_size=160, batch_size=16, epochs=None)
    fp32_scopes = ("/distance/",)  # the nearest-neighbour matmul + min: FP16 cancellation would cost precision

    def __init__(self, config: Any):
        super().__init__(config)
        self.cfg: PatchCoreSettings = config.settings_for(self.name)
        self.hw = config.input.hw
        self.generator = torch.Generator().manual_seed(int(config.seed))
        chosen = resolve_taps(config.backbone.name, config.backbone.layers, "patch", "backbone.layers", at_least=2)
        if len(chosen) != 2:
            raise UserError(f"backbone.layers {chosen}: PatchCore takes two taps, finer first")
        layers = (chosen[0], chosen[1])
        backbone = load_backbone(config.backbone.name, config.backbone.weights, layers)
        in_dim = sum(backbone.channels(layers))
        projection = None
        if 0 < self.cfg.projection_dim < in_dim:
            projection = torch.randn(self.cfg.projection_dim, in_dim, generator=self.generator)
            projection /= math.sqrt(self.cfg.projection_dim)
        self.features = FrameFeatures(backbone, layers, self.cfg.neighbourhood, projection).eval()
        with torch.no_grad():
            probe = self.features(torch.zeros(1, *self.hw, 3, dtype=torch.uint8))
        self.feature_dim = int(probe.shape[1])
        self.grid = (int(probe.shape[2]), int(probe.shape[3]))
        self.bank: Optional[torch.Tensor] = None
        self._export: Optional[PatchCoreExport] = None

    def map_shape(self) -> tuple[int, int]:
        return self.hw

    def fit(self, data: TrainingData, log: Callable[[str], None] = lambda _m: None,
            run: Optional[RunOptions] = None) -> dict[str, Any]:
        """Extract patch features of the training images (streamed) and keep a coreset of them as the bank.

        In torchrun's process group the extraction and the selection are split across the processes.
        """
        distributed.check_world_fits(distributed.environment(), len(data.fit_paths), None, "training images")
        with distributed.process_group(torch.device("cpu")) as shard:
            return self._fit(data, log, shard)

    def _fit(self, data: TrainingData, log: Callable[[str], None], shard: distributed.Shard) -> dict[str, Any]:
        t0 = time.monotonic()
        chunks = [torch.zeros(0, self.grid[0] * self.grid[1], self.feature_dim)]
        with torch.no_grad():
            for frames in data.loader(shard.part(data.fit_paths), int(self.config.batch_size)):
                emb = self.features(frames)
                chunks.append(emb.flatten(2).transpose(1, 2))  # [B, patches, C]
        per_image = distributed.gather_interleaved(torch.cat(chunks), shard)  # every image, in the one-process order
        n_images = len(per_image)
        feats = per_image.reshape(-1, per_image.shape[-1])
        del per_image
        t_feat = time.monotonic() - t0
        n_patches = len(feats)
        n = max(1, min(int(round(self.cfg.coreset_ratio * n_patches)), self.cfg.max_bank_size))
        limit = self.cfg.coreset_candidates
        if 0 < limit < n_patches:
            # Greedy selection costs picks x candidates: a seeded random subset keeps fit time bounded as the
            # data grows (500 images: 148 s of selection over all 640 000 patches).
            feats = feats[torch.randperm(n_patches, generator=self.generator)[:limit]]
            n = min(n, limit)
        log(f"patchcore: {n_patches} patches of {feats.shape[1]} dims from {n_images} images "
            f"({t_feat:.1f}s{f', {shard.world} processes' if shard.distributed else ''}); "
            f"selecting a {n}-row coreset from {len(feats)} of them")
        t1 = time.monotonic()
        with torch.no_grad():
            idx = greedy_coreset(feats, n, self.cfg.coreset_projection_dim, self.generator, log, shard)
        self.bank = feats[idx].clone()
        self._export = None
        t_core = time.monotonic() - t1
        log(f"patchcore: memory bank {tuple(self.bank.shape)} ({t_core:.1f}s)")
        return {"n_train_images": n_images, "n_patches": n_patches, "coreset_candidates": len(feats),
                "feature_dim": self.feature_dim,
                "patch_grid": list(self.grid), "bank_size": len(self.bank), "coreset_ratio": self.cfg.coreset_ratio,
                "feature_seconds": round(t_feat, 3), "coreset_seconds": round(t_core, 3), "processes": shard.world}

    def export_batch_limit(self, max_elements: int, n_images: Optional[int] = None) -> Optional[int]:
        """The bank is chunked to the bound, but one chunk row per patch of the batch must fit it."""
        return max_elements // (self.grid[0] * self.grid[1])

    def _chunk(self, max_batch: int, max_elements: int) -> int:
        assert self.bank is not None
        rows = max_batch * self.grid[0] * self.grid[1]
        if rows > max_elements:
            raise UserError(f"export.max_batch {max_batch} x {rows // max_batch} patches exceeds "
                            f"export.max_distance_elements {max_elements}; lower export.max_batch or the input size")
        return max(1, min(len(self.bank), max_elements // rows))

    def export_checks(self, max_batch: int, max_elements: int) -> dict[str, Any]:
        """Check the distance tensor bound at ``max_batch`` and report the chunking used."""
        chunk = self._chunk(max_batch, max_elements)
        assert self.bank is not None
        bank = len(self.bank)
        patches = self.grid[0] * self.grid[1]
        largest = max_batch * patches * chunk
        assert largest <= max_elements < 2**31, "distance tensor bound violated"
        return {"max_batch": max_batch, "patches_per_frame": patches, "bank_size": bank,
                "bank_chunk": chunk, "bank_chunks": -(-bank // chunk),
                "largest_distance_tensor_elements": largest, "max_distance_elements": max_elements}

    def export_module(self) -> nn.Module:
        if self.bank is None:
            raise RuntimeError("PatchCore.export_module() called before fit()")
        if self._export is None:
            chunk = self._chunk(self.config.export.max_batch, self.config.export.max_distance_elements)
            self._export = PatchCoreExport(self.features, self.bank, self.grid, self.hw,
                                           self.cfg.blur_sigma, chunk).eval()
        return self._export
