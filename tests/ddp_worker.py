"""Run under torchrun by tests/test_trainer_ddp.py: PatchCore's sharded pieces on every rank, rank 0 saves them.

  python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py DATA OUT.pt

Selects a greedy coreset from ``coreset_features()`` and fits PatchCore on DATA/train/good, both inside
torchrun's process group (so split across the ranks); rank 0 saves the coreset indices and the memory bank
to OUT.pt for the test to compare with one process's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from trainer import distributed
from trainer.config import TrainConfig
from trainer.data import train_paths
from trainer.frames import TrainingData
from trainer.models import create_model
from trainer.models.patchcore import greedy_coreset

SIZE = 64


def coreset_features() -> torch.Tensor:
    """Clustered rows, every one present twice (rows i and i + 600): with two ranks each copy lands on another
    rank, so every farthest-point pick is a tie across ranks that must go to the smaller index, as in one process."""
    g = torch.Generator().manual_seed(5)
    centres = torch.randn(12, 96, generator=g) * 4
    base = centres[torch.randint(12, (600,), generator=g)] + torch.randn(600, 96, generator=g)
    return torch.cat([base, base])


def coreset(shard: distributed.Shard = distributed.ONE_PROCESS) -> torch.Tensor:
    """The test's coreset: 80 picks in a 32-dim projection, seeded."""
    return greedy_coreset(coreset_features(), 80, 32, torch.Generator().manual_seed(11), shard=shard)


def patchcore_config() -> TrainConfig:
    cfg = TrainConfig()
    cfg.input.height = cfg.input.width = SIZE
    cfg.batch_size = 4
    cfg.settings_for("patchcore").coreset_ratio = 0.05
    return cfg


def patchcore_bank(data_dir: Path) -> torch.Tensor:
    """PatchCore fitted on data_dir/train/good (inside torchrun's group when there is one); its memory bank."""
    model = create_model("patchcore", patchcore_config())
    data = TrainingData(fit_paths=train_paths(data_dir), holdout_paths=[], hw=(SIZE, SIZE))
    model.fit(data)
    assert model.bank is not None  # type: ignore[attr-defined]
    return model.bank  # type: ignore[attr-defined]


def main(data_dir: Path, out: Path) -> None:
    with distributed.process_group(torch.device("cpu")) as shard:
        assert shard.world == 2, shard
        indices = coreset(shard)
        bank = patchcore_bank(data_dir)  # joins the group that is already up
        if shard.writer:
            torch.save({"indices": indices, "bank": bank, "world": shard.world}, out)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
