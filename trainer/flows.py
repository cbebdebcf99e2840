"""What the normalizing-flow models share (the four of the flow family in trainer/models/): cached backbone features,
the standard-normal log-likelihood, FrEIA flows and their subnets.

Why a feature cache: the flows learn the density of a *frozen* backbone's features, so the backbone's output of
a training image never changes, but the shared loop (trainer/loop.py) calls ``prepare(frames)`` on every batch of
every epoch. ``FeatureCache`` keys each frame by a hash of its bytes, so the backbone runs once per distinct
training (and held-out) image and every later epoch trains the flows alone: on CPU that is what makes tens of
epochs affordable. Its cost: a BLAKE2b hash of each frame per batch (about 0.1 ms for a 160 px frame) and the
features in host memory, bounded by ``max_bytes``. A frame whose bytes differ (an augmentation, a codec-degraded
copy) is a different key, so the cache never returns features of another image; when the bound is reached it
stops storing (first come, kept: under a shuffled loader an LRU bound smaller than the data set would evict
every entry before its reuse, a kept prefix hits at a constant rate of bound / data) and the backbone runs for
the rest. With codec-robust training the loop shows a model that caches (``EpochModel.caches_features``) each
still and its degraded copies, each copy the same draw every epoch, so every frame repeats. For frames that may
not repeat, ``admit_after=2`` stores a frame only at its second sighting (16 bytes a key to remember the first),
so one-off frames never fill the cache, at the price of the backbone running twice per repeating frame.

Log-likelihood: a flow maps x to z with log|det dz/dx| = the sum of its blocks' terms; under the standard normal
prior log p(x) = sum(-0.5 z^2 - 0.5 log 2 pi) + log|det|. ``log_likelihood`` sums that over the dimensions a
model treats as one sample (a feature vector at one position, or a whole map), so the
exported graphs compute exactly what the training maximised.

Flows are built with FrEIA (PyPI ``FrEIA``, the library the papers' official code uses): ``flow`` stacks
AllInOneBlocks (affine coupling, soft clamping, global affine scaling, a fixed permutation) and seeds the
permutations it draws from numpy's global generator, so a model built twice from one seed is the same model.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator, Sequence
from typing import Callable, Optional

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import numpy as np
import torch
from torch import nn

# log of the standard normal density's constant, -0.5 log(2 pi) (_GCONST_ in the official code of the positional flow)
GAUSS_CONST = -0.5 * math.log(2.0 * math.pi)

Shape = tuple[int, ...]
Subnet = Callable[[int, int], nn.Module]


# -- the feature cache ---------------------------------------------------------------------------------------
def frame_key(frame: torch.Tensor) -> bytes:
    """A 16-byte BLAKE2b digest of one frame's bytes (with its shape: a 2x8 and a 4x4 frame differ)."""
    data = frame.detach().cpu().contiguous().numpy()
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(tuple(data.shape)).encode())
    h.update(data.tobytes())
    return h.digest()


class FeatureCache:
    """frames uint8 [B,H,W,3] -> ``extract(frames)`` [B, ...], each frame's result computed once and kept.

    ``extract`` must be deterministic per frame (a frozen backbone in eval mode) and batch-independent (no
    batch statistics). Results are kept on the CPU as float32 (``max_bytes`` bounds them) and returned on the
    frames' device. ``admit_after``: the sighting of a frame at which its result is stored (1 = at once).
    """

    def __init__(self, extract: Callable[[torch.Tensor], torch.Tensor], max_bytes: int, admit_after: int = 1) -> None:
        if max_bytes < 0 or admit_after < 1:
            raise ValueError("max_bytes must be >= 0 and admit_after >= 1")
        self.extract = extract
        self.max_bytes = int(max_bytes)
        self.admit_after = int(admit_after)
        self._sightings: dict[bytes, int] = {}
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._store: dict[bytes, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._store)

    @torch.no_grad()
    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        keys = [frame_key(f) for f in frames]
        missing = [i for i, k in enumerate(keys) if k not in self._store]
        fresh: dict[int, torch.Tensor] = {}
        if missing:
            index = torch.tensor(missing, device=frames.device)
            out = self.extract(frames.index_select(0, index)).float()
            for j, i in enumerate(missing):
                fresh[i] = out[j].cpu()
            for i in missing:
                seen = self._sightings.get(keys[i], 0) + 1
                if seen < self.admit_after:
                    self._sightings[keys[i]] = seen
                    continue
                self._sightings.pop(keys[i], None)
                size = fresh[i].numel() * fresh[i].element_size()
                if keys[i] not in self._store and self.bytes + size <= self.max_bytes:
                    self._store[keys[i]] = fresh[i]
                    self.bytes += size
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        rows = [fresh[i] if i in fresh else self._store[k] for i, k in enumerate(keys)]
        return torch.stack(rows).to(frames.device)

    def facts(self) -> dict[str, float]:
        """For the fit report: entries, megabytes held, hits and misses so far."""
        return {"entries": len(self._store), "megabytes": round(self.bytes / 1e6, 1), "hits": self.hits,
                "misses": self.misses}


def pack_maps(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Feature maps [B,C_i,h_i,w_i] -> one tensor [B, sum C_i h_i w_i] (what ``prepare`` hands the loop)."""
    return torch.cat([m.flatten(1) for m in maps], 1)


def unpack_maps(packed: torch.Tensor, shapes: Sequence[Shape]) -> list[torch.Tensor]:
    """The inverse of ``pack_maps``: [B, sum C_i h_i w_i] -> maps of the per-sample ``shapes`` (C_i, h_i, w_i)."""
    sizes = [int(np.prod(s)) for s in shapes]
    if packed.shape[1] != sum(sizes):
        raise ValueError(f"packed features have {packed.shape[1]} values a sample, the shapes {list(shapes)} "
                         f"{sum(sizes)}")
    return [p.reshape(-1, *s) for p, s in zip(packed.split(sizes, 1), shapes, strict=True)]


# -- the standard-normal log-likelihood ------------------------------------------------------------------------
def log_density(z: torch.Tensor, dim: int | tuple[int, ...] = 1) -> torch.Tensor:
    """sum over ``dim`` of the standard normal log density of z's elements: sum(-0.5 z^2) + n log(2 pi)^-0.5."""
    dims = (dim,) if isinstance(dim, int) else dim
    n = int(np.prod([z.shape[d] for d in dims]))
    return n * GAUSS_CONST - 0.5 * z.pow(2).sum(dims)


def log_likelihood(z: torch.Tensor, log_det: torch.Tensor, dim: int | tuple[int, ...] = 1) -> torch.Tensor:
    """log p(x) of the flow's input: the prior's log density of z over ``dim`` plus the summed log|det dz/dx|
    (``log_det`` shaped like the result: per vector [E], per sample [N], per position [N,h,w])."""
    return log_density(z, dim) + log_det


# -- FrEIA flows -----------------------------------------------------------------------------------------------
class StaticAllInOneBlock(Fm.AllInOneBlock):  # type: ignore[misc]
    """FrEIA's AllInOneBlock with the coupling's split size taken from the block's constants, not from the
    tensor's shape: FrEIA's ``_affine`` slices ``a[:, :x.shape[1]]``, which the ONNX exporter records as a Slice
    whose end comes from a Shape, leaving every later shape unknown to ONNX shape inference (TensorRT readiness
    refuses such a graph). Same arithmetic, same parameters (a state dict of either loads into the other)."""

    def _affine(self, x: torch.Tensor, a: torch.Tensor, rev: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        a = a * 0.1  # FrEIA scales the subnet's output by 0.1 (in place there)
        ch = int(self.splits[1])
        sub_jac = self.clamp * torch.tanh(a[:, :ch])
        if self.GIN:
            sub_jac = sub_jac - torch.mean(sub_jac, dim=self.sum_dims, keepdim=True)
        if not rev:
            return x * torch.exp(sub_jac) + a[:, ch:], torch.sum(sub_jac, dim=self.sum_dims)
        return (x - a[:, ch:]) * torch.exp(-sub_jac), -torch.sum(sub_jac, dim=self.sum_dims)


@contextlib.contextmanager
def seeded_numpy(seed: int) -> Iterator[None]:
    """numpy's global generator seeded for a while, then restored (FrEIA draws its permutations from it)."""
    state = np.random.get_state()
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        np.random.set_state(state)


def fc_subnet(hidden_ratio: float = 2.0) -> Subnet:
    """(c_in, c_out) -> Linear(c_in, hidden) - ReLU - Linear(hidden, c_out), hidden = ratio x c_in (the official
    subnet_fc of the positional flow: ratio 2)."""
    def make(c_in: int, c_out: int) -> nn.Module:
        hidden = max(1, int(c_in * hidden_ratio))
        return nn.Sequential(nn.Linear(c_in, hidden), nn.ReLU(), nn.Linear(hidden, c_out))
    return make


def conv_subnet(kernel_size: int, hidden_ratio: float = 1.0) -> Subnet:
    """(c_in, c_out) -> conv k x k - ReLU - conv k x k, same size, hidden = ratio x c_in (the 2D flow's subnet_conv;
    symmetric padding for the odd kernels it uses)."""
    if kernel_size % 2 != 1:
        raise ValueError("conv_subnet: kernel_size must be odd")

    def make(c_in: int, c_out: int) -> nn.Module:
        hidden = max(1, int(c_in * hidden_ratio))
        pad = kernel_size // 2
        return nn.Sequential(nn.Conv2d(c_in, hidden, kernel_size, padding=pad), nn.ReLU(),
                             nn.Conv2d(hidden, c_out, kernel_size, padding=pad))
    return make


def flow(dims: Shape, subnets: Sequence[Subnet], clamp: float, seed: int, cond_dims: Optional[Shape] = None,
         permute_soft: bool = False, global_affine_type: str = "SOFTPLUS") -> Ff.SequenceINN:
    """A FrEIA SequenceINN of one (static-shaped) AllInOneBlock per subnet (``dims`` per sample: (C,) vectors or
    (C, h, w) maps), conditioned on condition 0 of shape ``cond_dims`` when given; permutations drawn from ``seed``."""
    inn = Ff.SequenceINN(*dims)
    with seeded_numpy(seed):
        for subnet in subnets:
            if cond_dims is None:
                inn.append(StaticAllInOneBlock, subnet_constructor=subnet, affine_clamping=clamp,
                           global_affine_type=global_affine_type, permute_soft=permute_soft)
            else:
                inn.append(StaticAllInOneBlock, cond=0, cond_shape=cond_dims, subnet_constructor=subnet,
                           affine_clamping=clamp, global_affine_type=global_affine_type, permute_soft=permute_soft)
    return inn


class TapsThenHead(nn.Module):
    """A flow model's exported graph: uint8 BGR frames [N,H,W,3] -> the backbone's taps -> the model's head, which
    gives (score float32 [N], anomaly_map float32 [N,H,W])."""

    def __init__(self, taps: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.taps = taps
        self.head = head

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.taps(frames))  # type: ignore[no-any-return]


def score_and_map(amap: torch.Tensor, blur: Optional[nn.Module], hw: tuple[int, int]) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """(score [N], map [N,H,W]) of a per-pixel map [N,1,H,W]: blurred when ``blur``, the score its maximum.

    The score is taken from the [N,1,H,W] map, not from the output tensor: the FP16 converter retypes a graph output
    that another node also reads. The map is reshaped, not squeezed: squeeze exported as an If where the exporter
    lost a size."""
    if blur is not None:
        amap = blur(amap)
    return amap.amax((1, 2, 3)), amap.reshape(-1, *hw)
