"""DifferNet (Rudolph et al., "Same Same But DifferNet", WACV 2021), after the official code (marco-rudolph/differnet).

Features: the image at ``scales`` sizes (input, 1/2, 1/4; the paper's 448/224/112 px), each through the frozen
backbone, its deepest level average-pooled and the scales concatenated (the paper: AlexNet's 256 channels x 3 =
768 dims; here the configured backbone's deepest level before its head: Lite0's tap 15, 320 x 3 = 960 dims;
timm CNNs their last stage). Resizing is nearest, the official ``F.interpolate`` default.

Flow: ``coupling_blocks`` (8) FrEIA blocks, each a fixed random permutation then a GLOW coupling
(``Fm.GLOWCouplingBlock``, one subnet giving scale and shift) whose subnets are the official
``F_fully_connected``: three hidden layers of ``hidden`` units with ReLU. The soft clamp is the official
``clamp * 0.636 * atan(s / clamp)`` (FrEIA's own ATAN clamp lacks the ``/ clamp``), clamp 3. Trained by maximum
likelihood (the official loss: mean of (||z||^2 / 2 - log|det J|) / D), Adam lr 2e-4, betas (0.8, 0.8), eps 1e-4,
weight decay 1e-5.

Transformations: the official code draws random rotations (+-180 deg), 4 per training image and 64 per test image,
and scores the mean over them of mean(z^2). Inside an exported graph the transformations must be fixed ops: here
``transforms`` is a fixed set of right-angle rotations (1: none; 2: 0 and 180 deg; 4: the four right angles; 8:
those and their mirror images; exact Transpose/Slice ops, no resampling), used both in training (every view of
every image) and in the graph. Each view is a full backbone pass at every scale: the graph costs ``transforms`` x
(1 + 1/4 + 1/16) backbone passes a frame (4 views: 5.3 passes), the flow ``transforms`` passes of one vector.

Anomaly map: the paper's is the gradient of the score w.r.t. the image, which needs a backward pass and is not
in a feed-forward graph. In the graph instead, at the finest scale of the unrotated view: how much lower the
score would be without each position, score(f) - score(f without p), f_p left out of the average pool (the
other scales kept); one extra flow pass per position of the stride-32 grid (5 x 5 at 160 px), upsampled and
blurred. It is in score units, coarse (stride 32), and can be negative where a position pulls the score down.

Backbone: AlexNet's ImageNet weights cannot be had here, so the default is Lite0 (offline weights); AlexNet is
not in timm, but any timm CNN is selectable by name (``backbone.name``). What differs from the paper: the
backbone and its feature size, a fixed set of right-angle rotations instead of random ones (64 at test time),
subnets of ``hidden`` 512 units (the paper's 2048 give a 725 MB graph with Lite0's 960 dims; 512: 80 MB),
and the map.

On CPU: the backbone runs once per training image (every view, every scale; trainer/flows.py's FeatureCache in
prepare()) and the flow trains on those features through the shared loop. Reduced recipe for CPU runs:
``--epochs 20`` with ``differnet.lr: 0.001`` and ``differnet.hidden: 256`` instead of the official 192 epochs (24 x
8) at 2e-4, ``transforms: 4``; the loop keeps the epoch with the lowest validation loss (or the best validation
AUROC with DIR/val defects), where the official code reports its last. Measured on the generated washers (256 px,
40 training images, 2-core VM): image AUROC 0.975 through the torch graph, the epoch kept 19 of 40 (at 128 px,
whose stride-32 grid is 4 x 4: 0.87 after 40-60 epochs; at 224 px with the 128 px parts upscaled, hidden 512, lr
2e-4, 30 epochs: 0.94). On the elpv mono solar cells (benchmarks/protocol.py --dataset elpv --cell mono, seed 0,
224 px, ``transforms: 2``, hidden 256, lr 1e-3, 20 epochs, codec copies off; through the ONNX graph): image AUROC
0.903, average precision 0.930 (PatchCore as shipped on the same split: 0.944, docs/training.md). Codec-robust
training draws a fresh degraded copy of each still every epoch, which the feature cache cannot reuse: with it on,
the backbone runs again for half the images each epoch (x 4 views x 3 scales).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Union

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import UserError
from trainer.backbones import check_tap_list, is_lite, resolve_taps
from trainer.features import BackboneTaps, config_taps
from trainer.flows import FeatureCache, log_likelihood, seeded_numpy
from trainer.ingraph import MapBlur
from trainer.loop import EpochModel, LossParts, Update
from trainer.models import FOREIGN_OBJECTS, NORMALIZING_FLOWS, ModelDefaults, ModelSettings, register_model, setting

VIEW_COUNTS = (1, 2, 4, 8)
CACHE_BYTES = 1 << 30  # cached training features kept in host memory (flows.FeatureCache stops storing beyond)


class AtanClamp:
    """The official soft clamp's shape for FrEIA: FrEIA computes ``clamp * f(s)``; the official code
    ``clamp * 0.636 * atan(s / clamp)``, so f(s) = 0.636 * atan(s / clamp)."""

    def __init__(self, clamp: float) -> None:
        self.clamp = float(clamp)

    def __call__(self, s: torch.Tensor) -> torch.Tensor:
        return 0.636 * torch.atan(s / self.clamp)


def differnet_subnet(hidden: int) -> Callable[[int, int], nn.Module]:
    """The official ``F_fully_connected``: three hidden layers of ``hidden`` units with ReLU (dropout 0)."""

    def build(c_in: int, c_out: int) -> nn.Module:
        return nn.Sequential(nn.Linear(c_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                             nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, c_out))

    return build


def glow_flow(dim: int, blocks: int, hidden: int, clamp: float) -> nn.Module:
    """The official ``nf_head``: per block a random permutation (seeded by the block index) and a GLOW coupling.

    FrEIA's PermuteRandom seeds numpy's global generator (with k, as the official permute_layer); the generator's
    state is put back afterwards (``seeded_numpy``).
    """
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    flow = Ff.SequenceINN(dim)
    with seeded_numpy(0):
        for k in range(blocks):
            flow.append(Fm.PermuteRandom, seed=k)
            flow.append(Fm.GLOWCouplingBlock, subnet_constructor=differnet_subnet(hidden), clamp=clamp,
                        clamp_activation=AtanClamp(clamp))
    return flow


def quarter_turns(x: torch.Tensor, k: int) -> torch.Tensor:
    """x [N,C,H,W] rotated by k x 90 deg with Transpose and Slice (ONNX has no rot90)."""
    if k == 1:
        return x.transpose(2, 3).flip(2)
    if k == 2:
        return x.flip(2).flip(3)
    if k == 3:
        return x.transpose(2, 3).flip(3)
    return x


class RightAngleViews(nn.Module):
    """x [N,C,H,W] -> its ``n`` fixed views [n*N,C,H,W], view-major: rotations by k x 90 deg, then mirrored
    (n = 8). Exact ops (Transpose, Slice): no resampling. n = 2: 0 and 180 deg."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.turns = [0, 2] if n == 2 else [k % 4 for k in range(n)]
        self.mirrored = [k >= 4 for k in range(n)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        views = []
        for turns, mirror in zip(self.turns, self.mirrored, strict=True):
            v = x.flip(3) if mirror else x
            views.append(quarter_turns(v, turns))
        return views[0] if len(views) == 1 else torch.cat(views, 0)


class ScaledFeatures(nn.Module):
    """Normalised images [N,3,H,W] -> the tap maps of each scale (the image resized to 1/2^s, nearest),
    [scale][tap] -> [N,C,h,w]."""

    def __init__(self, taps: BackboneTaps, hw: tuple[int, int], scales: int) -> None:
        super().__init__()
        self.backbone = taps.backbone
        self.taps = taps.taps
        self.sizes = [(max(1, hw[0] >> s), max(1, hw[1] >> s)) for s in range(scales)]

    def forward(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        out = []
        for s, size in enumerate(self.sizes):
            xs = x if s == 0 else F.interpolate(x, size=size, mode="nearest")
            out.append(self.backbone.features(xs, self.taps))
        return out


class DifferNetFeatures(nn.Module):
    """frames uint8 [N,H,W,3] BGR -> pooled multi-scale features of every view [N, views, D]."""

    def __init__(self, taps: BackboneTaps, hw: tuple[int, int], scales: int, views: int) -> None:
        super().__init__()
        self.input = taps.input
        self.views = RightAngleViews(views)
        self.n_views = views
        self.scaled = ScaledFeatures(taps, hw, scales)

    def maps(self, frames: torch.Tensor) -> list[list[torch.Tensor]]:
        return self.scaled(self.views(self.input(frames)))

    @staticmethod
    def pool(maps: list[list[torch.Tensor]]) -> torch.Tensor:
        return torch.cat([m.mean((2, 3)) for scale in maps for m in scale], 1)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        f = self.pool(self.maps(frames))  # [views*N, D], view-major
        return f.reshape(self.n_views, -1, f.shape[1]).transpose(0, 1)


def mean_z2(flow: nn.Module, f: torch.Tensor) -> torch.Tensor:
    """[..., D] features -> mean of z^2 over D, [...]: DifferNet's score of one view."""
    z, _ = flow(f.reshape(-1, f.shape[-1]))
    return z.pow(2).mean(1).reshape(f.shape[:-1])


class LeaveOneOutMap(nn.Module):
    """The unrotated view's finest-scale maps -> per position p, score(f) - score(f with p left out of the pool)."""

    def __init__(self, flow: nn.Module, grid: tuple[int, int], hw: tuple[int, int], sigma: float) -> None:
        super().__init__()
        self.flow = flow
        self.grid = grid
        self.hw = hw
        self.blur = MapBlur(sigma, hw) if sigma > 0 else None

    def _on_grid(self, m: torch.Tensor) -> torch.Tensor:
        """A finer tap's map averaged onto the map's grid (whole cells: its mean over them is its global mean)."""
        kh, kw = int(m.shape[2]) // self.grid[0], int(m.shape[3]) // self.grid[1]
        return m if (kh, kw) == (1, 1) else F.avg_pool2d(m, (kh, kw))

    def forward(self, finest: list[torch.Tensor], rest: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        p = self.grid[0] * self.grid[1]
        if p < 2:  # one position: nothing to leave out, the map is the score
            return score.reshape(-1, 1, 1) * torch.ones(1, *self.hw, device=score.device)
        cells = torch.cat([self._on_grid(m).flatten(2) for m in finest], 1)  # [N, C0, P]
        total = cells.sum(2, keepdim=True)
        without = ((total - cells) / (p - 1)).transpose(1, 2)  # [N, P, C0]: the pool without p
        # rest broadcast over the positions by an Add (Expand and Tile leave the position count unknown in ONNX)
        f = torch.cat([without, rest.unsqueeze(1) + without[:, :, :1] * 0.0], 2)
        drop = score.unsqueeze(1) - mean_z2(self.flow, f)  # [N, P]
        amap = F.interpolate(drop.reshape(-1, 1, *self.grid), size=self.hw, mode="bilinear", align_corners=False)
        if self.blur is not None:
            amap = self.blur(amap)
        return amap.reshape(-1, *self.hw)  # not squeeze: its export is an If node, whose output FP16 leaves unranked


class DifferNetExport(nn.Module):
    """frames uint8 [N,H,W,3] BGR -> (score float32 [N]: mean over views of mean z^2, anomaly_map [N,H,W])."""

    def __init__(self, features: DifferNetFeatures, flow: nn.Module, lmap: LeaveOneOutMap) -> None:
        super().__init__()
        self.features = features
        self.flow = flow
        self.map = lmap

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.features.maps(frames)
        f = self.features.pool(maps)  # [views*N, D], view-major
        per_view = mean_z2(self.flow, f).reshape(self.features.n_views, -1)  # [views, N]
        score = per_view.mean(0)
        first = [m.reshape(self.features.n_views, -1, *m.shape[1:])[0] for m in maps[0]]  # the unrotated view
        rest = f.reshape(self.features.n_views, -1, f.shape[1])[0]
        c0 = sum(int(m.shape[1]) for m in maps[0])  # the finest scale's channels come first in f
        return score, self.map(first, rest[:, c0:], per_view[0])


def flow_parameters(flow: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters (FrEIA keeps its permutations as int64 parameters without gradients)."""
    return [p for p in flow.parameters() if p.requires_grad]


def deepest_tap(name: str, taps: Union[List[int], str], key: str) -> list[int]:
    """``auto``: the deepest level before the head (Lite: the last block, Lite0 tap 15, 320 ch /32; a timm CNN:
    its last stage); a list: checked against the backbone."""
    if isinstance(taps, str):
        top = resolve_taps(name, taps, "top", key)
        return [top[-2] if is_lite(name) else top[-1]]
    return resolve_taps(name, taps, "top", key)


@dataclass
class DifferNetSettings(ModelSettings):
    """DifferNet (Rudolph et al. 2021): a normalizing flow on pooled multi-scale features of the whole image."""

    layers: Union[List[int], str] = setting(
        "auto", "taps average-pooled at every scale, or auto: the deepest level before the head (Lite0: [15], 320 "
        "ch at stride 32, as the paper pools AlexNet's last conv block; timm CNNs: their last stage)")
    scales: int = setting(3, "image scales (input, 1/2, 1/4 ...; the paper's 3: 448, 224, 112 px)")
    coupling_blocks: int = setting(8, "flow blocks (a random permutation and a GLOW coupling each; the paper's 8)")
    hidden: int = setting(512, "units of each of the subnets' three hidden layers (the paper's 2048: with Lite0 a "
                          "725 MB graph; 512: 80 MB)")
    clamp: float = setting(3.0, "soft clamp of the coupling scales, clamp x 0.636 x atan(s / clamp) (the paper's 3)")
    transforms: int = setting(4, "fixed views of each image, in training and in the graph: 1 none, 2 (0 and 180 "
                              "deg), 4 right-angle rotations, 8 with mirrors (the paper: 64 random rotations at "
                              "test time); each costs a backbone pass at every scale")
    lr: float = setting(2e-4, "Adam learning rate (betas 0.8, 0.8; eps 1e-4; weight decay 1e-5: the official code's)")
    map_sigma: float = setting(4.0, "Gaussian blur of the leave-one-position-out map, input px; 0 = off")

    def validate(self) -> None:
        check_tap_list(self.layers, "differnet.layers")
        if not 1 <= self.scales <= 4:
            raise ValueError("differnet.scales must be 1 to 4")
        if self.coupling_blocks < 1 or self.hidden < 1:
            raise ValueError("differnet.coupling_blocks and hidden must be >= 1")
        if self.clamp <= 0 or self.lr <= 0 or self.map_sigma < 0:
            raise ValueError("differnet.clamp and lr must be > 0, map_sigma >= 0")
        if self.transforms not in VIEW_COUNTS:
            raise ValueError("differnet.transforms must be 1, 2, 4 or 8")


@register_model("differnet", settings=DifferNetSettings)
class DifferNet(EpochModel):
    """DifferNet: the likelihood of pooled multi-scale backbone features under a normalizing flow."""

    catches = FOREIGN_OBJECTS  # one pooled vector of the whole image: image-level departures
    family = NORMALIZING_FLOWS
    display_name = "DifferNet"
    caches_features = True  # prepare() caches the backbone's features: fixed codec-robust draws (trainer/loop.py)
    defaults = ModelDefaults(input_size=224, batch_size=24, epochs=192)  # official batch 24; 24 x 8 epochs
    trains_distributed = False  # the feature cache is per process and FrEIA's int64 permutations are parameters

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.cfg: DifferNetSettings = config.settings_for(self.name)
        self.hw = config.input.hw
        if self.cfg.transforms > 2 and self.hw[0] != self.hw[1]:
            raise UserError(f"differnet.transforms {self.cfg.transforms} rotates by 90 deg, which needs a square "
                            f"input (input is {self.hw[0]}x{self.hw[1]}); set transforms to 1 or 2, or a square input")
        name = str(config.backbone.name)
        taps = deepest_tap(name, self.cfg.layers, "differnet.layers")
        self.taps = config_taps(config.backbone, taps, "top", "differnet.layers")
        self.features = DifferNetFeatures(self.taps, self.hw, self.cfg.scales, self.cfg.transforms).eval()
        with torch.no_grad():
            maps = self.features.maps(torch.zeros(1, *self.hw, 3, dtype=torch.uint8))
        self.dim = sum(int(m.shape[1]) for scale in maps for m in scale)
        grids = [(int(m.shape[2]), int(m.shape[3])) for m in maps[0]]
        self.grid = grids[-1]  # the map's grid: the deepest tap's; finer taps are averaged onto it
        if any(h % self.grid[0] or w % self.grid[1] for h, w in grids):
            raise UserError(f"differnet.layers {list(self.taps.taps)}: at {self.hw[0]}x{self.hw[1]} their grids "
                            f"{grids} do not divide the deepest one's evenly (the map averages them onto it); "
                            "choose an input size that is a multiple of 32, or one tap")
        torch.manual_seed(int(config.seed))
        self.flow = glow_flow(self.dim, self.cfg.coupling_blocks, self.cfg.hidden, self.cfg.clamp)
        self.optimizer = torch.optim.Adam(flow_parameters(self.flow), lr=self.cfg.lr, betas=(0.8, 0.8), eps=1e-4,
                                          weight_decay=1e-5)
        self.cache = FeatureCache(self._features, CACHE_BYTES)

    # -- the loop's interface --------------------------------------------------------------------------------
    def networks(self) -> dict[str, nn.Module]:
        return {"flow": self.flow}

    def updates(self) -> list[Update]:
        return [Update("likelihood", self.optimizer, self._loss)]

    def _features(self, frames: torch.Tensor) -> torch.Tensor:
        return self.features.to(frames.device)(frames)

    def prepare(self, frames: torch.Tensor) -> torch.Tensor:
        """[B, views, D] pooled features (cached per frame: the backbone is frozen)."""
        return self.cache(frames)

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        """Per image, mean over views of -log p(f) / D: the official loss (||z||^2 / 2 - log|det J|) / D plus
        the prior's constant 0.5 log(2 pi)."""
        z, log_det = self.flow(x.reshape(-1, self.dim).float())
        per_view = -log_likelihood(z, log_det) / self.dim
        return per_view.reshape(x.shape[0], -1).mean(1)

    def _loss(self, x: torch.Tensor, _shared: dict[str, Any]) -> LossParts:
        loss = self.nll(x).mean()
        return loss, {"nll": loss}

    def validation_loss(self, x: torch.Tensor) -> torch.Tensor:
        return self.nll(x)

    def raw_score(self, x: torch.Tensor) -> torch.Tensor:
        return mean_z2(self.flow, x.float()).mean(1)

    def fit_facts(self) -> dict[str, Any]:
        return {"feature_dim": self.dim, "taps": list(self.taps.taps), "scales": self.cfg.scales,
                "views": self.cfg.transforms, "map_grid": list(self.grid), "feature_cache": self.cache.facts(),
                "flow_parameters": sum(p.numel() for p in flow_parameters(self.flow))}

    # -- export ----------------------------------------------------------------------------------------------
    def map_shape(self) -> tuple[int, int]:
        return self.hw

    def export_checks(self, max_batch: int, max_elements: int) -> dict[str, Any]:
        """The flow's largest intermediate: the map's hidden layer, one row per position of every frame."""
        largest = max_batch * max(self.grid[0] * self.grid[1], self.cfg.transforms) * max(self.cfg.hidden, self.dim)
        if largest > max_elements:
            raise UserError(f"differnet: export.max_batch {max_batch} x {self.grid[0] * self.grid[1]} map positions "
                            f"x {self.cfg.hidden} hidden units exceeds export.max_distance_elements {max_elements}; "
                            "lower export.max_batch, differnet.hidden or the input size")
        return {"max_batch": max_batch, "views": self.cfg.transforms, "largest_tensor_elements": largest,
                "feature_dim": self.dim, "map_grid": list(self.grid)}

    def export_module(self) -> nn.Module:
        self.flow.cpu().eval()
        self.features.cpu().eval()
        lmap = LeaveOneOutMap(self.flow, self.grid, self.hw, self.cfg.map_sigma)
        return DifferNetExport(self.features, self.flow, lmap).eval()
