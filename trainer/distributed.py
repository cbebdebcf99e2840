"""Training beyond one process: torchrun's environment, the process group, and the few collectives the trainer uses.

``torchrun --nproc_per_node N -m trainer.cli fit ...`` starts N copies of ``edge-train fit``; each reads its
rank from the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Without
torchrun the world is one process and every helper here is the identity, so the one-process path runs the
same code with no process group at all.

Backends: gloo for CPU tensors; on CUDA ``cpu:gloo,cuda:nccl``, so NCCL carries the gradients and gloo the
few CPU-side exchanges (validation scores, the memory-bank model's features). Rank 0 is the writer: it alone logs,
checkpoints and writes the bundle; the other ranks stop after training with ``HelperRankFinished`` (exit 0).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from core.errors import UserError

T = TypeVar("T")
LAUNCH_HINT = "start it with torchrun (torchrun --nproc_per_node N -m trainer.cli fit ...), or unset WORLD_SIZE"


class HelperRankFinished(UserError):
    """A rank other than 0 of a distributed fit has done its share of the training; rank 0 writes the bundle."""

    exit_code = 0


@dataclass(frozen=True)
class Shard:
    """This process's place in the world: ``rank`` of ``world`` processes (``local_rank`` on its machine)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def writer(self) -> bool:
        """Rank 0 logs, checkpoints and writes the bundle."""
        return self.rank == 0

    def part(self, items: Sequence[T]) -> list[T]:
        """This rank's items of ``items``: every ``world``-th from ``rank`` (``gather_interleaved`` undoes it)."""
        return list(items[self.rank::self.world])

    def bounds(self, n: int) -> tuple[int, int]:
        """This rank's contiguous slice [lo, hi) of ``n`` rows (the coreset's candidate rows)."""
        return self.rank * n // self.world, (self.rank + 1) * n // self.world


ONE_PROCESS = Shard()


def _env_int(name: str, default: str) -> int:
    raw = os.environ.get(name, default)
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"{name}={raw!r}: not an integer; {LAUNCH_HINT}") from None


def environment() -> Shard:
    """This process's Shard from torchrun's environment; a one-line error when it is incomplete or inconsistent."""
    world = _env_int("WORLD_SIZE", "1")
    if world < 1:
        raise UserError(f"WORLD_SIZE={world}: must be >= 1; {LAUNCH_HINT}")
    if world == 1:
        return Shard()
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise UserError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: distributed training needs "
                        f"torchrun's environment; {LAUNCH_HINT}")
    rank, local = _env_int("RANK", "0"), _env_int("LOCAL_RANK", "0")
    if not 0 <= rank < world:
        raise UserError(f"RANK={rank} is outside WORLD_SIZE={world}; {LAUNCH_HINT}")
    return Shard(rank, world, local)


def check_world_fits(shard: Shard, n_images: int, batch_size: Optional[int], what: str) -> None:
    """Every rank needs images of its own (in every step, with a ``batch_size`` split across the ranks): refuse
    a world larger than the data or the batch."""
    if not shard.distributed:
        return
    if n_images < shard.world:
        raise UserError(f"{shard.world} processes but only {n_images} {what}: every process needs images of its "
                        f"own; run at most {max(n_images, 1)} processes (torchrun --nproc_per_node) or add images")
    if batch_size is not None and batch_size < shard.world:
        raise UserError(f"batch size {batch_size} is smaller than the {shard.world} processes: a step's batch is "
                        f"split across them; raise --batch-size to at least {shard.world} or run fewer processes")


def device_for(shard: Shard, device: torch.device) -> torch.device:
    """A rank's device: on CUDA the GPU of its LOCAL_RANK (one GPU a process), otherwise ``device`` itself."""
    if not shard.distributed or device.type != "cuda":
        return device
    count = torch.cuda.device_count()
    if shard.local_rank >= count:
        raise UserError(f"LOCAL_RANK={shard.local_rank} but torch sees {count} GPU(s) on this machine: run at most "
                        f"{count} processes a machine (torchrun --nproc_per_node {count})")
    return torch.device("cuda", shard.local_rank)


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[Shard]:
    """Join torchrun's process group for the block (nothing for one process); leave it cleanly afterwards.

    A group that is already up (a caller's own) is used and left running.
    """
    shard = environment()
    if not shard.distributed or dist.is_initialized():
        yield shard
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    try:
        dist.init_process_group(backend=backend, init_method="env://", rank=shard.rank, world_size=shard.world)
    except (RuntimeError, ValueError) as exc:  # unreachable MASTER_ADDR, port in use, a torn-down rendezvous
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"joining the process group at {os.environ.get('MASTER_ADDR')}:"
                        f"{os.environ.get('MASTER_PORT')} failed ({first}); {LAUNCH_HINT}") from None
    try:
        yield shard
    finally:
        dist.destroy_process_group()


def all_sum(values: torch.Tensor) -> torch.Tensor:
    """``values`` summed over the ranks (in place; the identity for one process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def gather_interleaved(local: torch.Tensor, shard: Shard) -> torch.Tensor:
    """Undo ``Shard.part`` on rows: rank r's rows were items r, r+world, ...; returns all rows in their order.

    Every rank gets the whole tensor (CPU, any row count, including none, on any rank).
    """
    if not shard.distributed:
        return local
    local = local.contiguous().cpu()
    counts = [torch.zeros(1, dtype=torch.long) for _ in range(shard.world)]
    dist.all_gather(counts, torch.tensor([len(local)], dtype=torch.long))
    sizes = [int(c) for c in counts]
    longest = max(sizes)
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype)
    padded[:len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(shard.world)]
    dist.all_gather(parts, padded)
    out = torch.empty((sum(sizes), *local.shape[1:]), dtype=local.dtype)
    for rank, (part, size) in enumerate(zip(parts, sizes, strict=True)):
        out[rank::shard.world] = part[:size]
    return out


def global_argmax(value: float, index: int, shard: Shard) -> int:
    """The index of the largest ``value`` over the ranks; ties go to the smallest index (as ``torch.argmax``)."""
    if not shard.distributed:
        return index
    mine = torch.tensor([value, float(index)], dtype=torch.float64)
    every = [torch.empty_like(mine) for _ in range(shard.world)]
    dist.all_gather(every, mine)
    best = max(every, key=lambda t: (float(t[0]), -float(t[1])))
    return int(best[1])


def broadcast_from_writer(obj: T, shard: Shard) -> T:
    """Rank 0's ``obj`` on every rank (pickled through the process group; CPU objects only)."""
    if not shard.distributed:
        return obj
    box: list[Any] = [obj if shard.writer else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sync_buffers(nets: dict[str, nn.Module]) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank: each rank's last training step moved its own."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    for net in nets.values():
        for buf in net.buffers():
            dist.broadcast(buf, src=0)


def check_replicas(nets: dict[str, nn.Module], shard: Shard) -> None:
    """Fail loudly when a network's weights differ between ranks (gradients not synchronised, or a model hook
    that changed weights on one rank only): the bundle would hold one rank's weights and hide the fault."""
    if not shard.distributed:
        return
    sums = torch.tensor([[float(sum(p.detach().double().sum() for p in net.parameters())),
                          float(sum(p.detach().double().pow(2).sum() for p in net.parameters()))]
                         for net in nets.values()], dtype=torch.float64)
    every = [torch.empty_like(sums) for _ in range(shard.world)]
    dist.all_gather(every, sums)
    for i, name in enumerate(nets):
        if any(not torch.equal(every[0][i], other[i]) for other in every[1:]):
            raise RuntimeError(f"network '{name}' differs between ranks after an epoch: its updates are not "
                               "synchronised (a model must call its networks, not their submodules, in its losses, "
                               "and change weights in after_step the same way on every rank)")


def replicate(nets: dict[str, nn.Module], device: torch.device,
              find_unused_parameters: bool = False) -> dict[str, nn.parallel.DistributedDataParallel]:
    """Each network wrapped in DistributedDataParallel (rank 0's weights and buffers copied to every rank).

    One wrapper a network, not one around the model: a GAN's two updates each synchronise only the gradients
    of the network their optimiser steps (the other runs under ``no_sync``). BatchNorm keeps per-rank batch
    statistics (SyncBatchNorm has no CPU kernel); DDP broadcasts rank 0's running statistics at each forward.
    """
    ids = [device.index] if device.type == "cuda" else None
    return {name: nn.parallel.DistributedDataParallel(net, device_ids=ids,
                                                      find_unused_parameters=find_unused_parameters)
            for name, net in nets.items()}


@contextlib.contextmanager
def routed(model: object, replicas: dict[str, nn.parallel.DistributedDataParallel]) -> Iterator[None]:
    """While inside, the model's attributes that hold its networks hold their DDP wrappers instead.

    A model's losses call ``self.generator(x)``: routing that call through the wrapper is what makes DDP
    synchronise the gradients, without the model knowing. Outside (validation, scoring, export) the plain
    networks are back, so no forward outside training waits for another rank.
    """
    swaps: list[tuple[str, nn.Module]] = []
    for attr, value in list(vars(model).items()):
        for replica in replicas.values():
            if value is replica.module:
                swaps.append((attr, value))
                setattr(model, attr, replica)
    found = {id(value) for _, value in swaps}
    lost = [name for name, replica in replicas.items() if id(replica.module) not in found]
    try:
        if lost:
            raise RuntimeError(f"{type(model).__name__}: network(s) {', '.join(lost)} are not attributes of the "
                               "model, so their calls cannot be routed through DistributedDataParallel")
        yield
    finally:
        for attr, value in swaps:
            setattr(model, attr, value)


def check_launch(model_name: str, trains_distributed: bool) -> Shard:
    """This process's Shard, refusing (one line) a model that cannot fit on several processes."""
    shard = environment()
    if shard.distributed and not trains_distributed:
        raise UserError(f"{model_name} does not fit on several processes (WORLD_SIZE={shard.world}): it learns in "
                        "one pass over the images; run edge-train fit without torchrun")
    return shard
