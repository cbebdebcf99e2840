"""The one training loop of every model trained by epochs (the GAN-based ones, the one-class nets, and every later one).

A model hands the loop its networks, its updates (one optimiser and one loss each, run in order on every
batch: a GAN's generator step then its discriminator step) and its scorer; the loop owns everything else:
device and mixed precision, seeding, the progress bar, per-epoch validation and the choice of the epoch to
keep, checkpoints and ``--resume``, Ctrl-C. Models never call ``backward()`` or ``step()`` themselves.

Epoch choice (never sees DIR/test): with labelled defects in DIR/val, the epoch with the highest validation
AUROC (held-out normals vs DIR/val defects); otherwise the epoch with the lowest validation loss on the
held-out normals (the model's reconstruction objective, which unlike the adversarial terms means the same
thing from one epoch to the next). ``training.select`` can force ``last``, ``val_loss`` or ``val_auroc``.

Determinism: the global torch RNG is reseeded from (seed, epoch) at the start of every epoch and the batch
order is a function of (seed, epoch), so a run resumed from the checkpoint of epoch k continues exactly as
the uninterrupted run would (on CPU; CUDA kernels are not all deterministic).

Beyond one process (``torchrun``, trainer/distributed.py): every network is wrapped in DistributedDataParallel
for the updates, each update synchronising the gradients of the networks its optimiser steps (a GAN's
discriminator runs under ``no_sync`` in the generator's update). Each rank takes its part of every batch of the
one-process batch order, so the ranks together see the same images per step. Per-step loss parts and the
Ctrl-C flag are summed over the ranks (every rank logs, hooks and stops alike); validation is sharded and its
scores gathered, so every rank keeps the same epoch; rank 0 alone logs and writes checkpoints, and reads the
checkpoint to resume from for all.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import math
import signal
import sys
import time
from abc import abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.profiler import record_function

from core.errors import UserError
from core.files import atomic_write_bytes, atomic_write_text
from trainer import distributed
from trainer.frames import Augment, TrainingData, set_epoch
from trainer.models import AnomalyModel, RunOptions

# (loss to minimise, named parts to log)
LossParts = tuple[torch.Tensor, dict[str, torch.Tensor]]
LAST = "last.pt"
BEST = "best.pt"
RUN = "run.json"
Log = Callable[[str], None]


@dataclass
class Update:
    """One optimiser step per batch: ``loss(x, shared)`` minimised by ``optimizer``.

    ``shared`` is a dict the updates of one batch share (a generator's output reused by the discriminator's
    update). ``loss`` returns the scalar to minimise and the named parts to log (detached by the loop).
    ``max_grad_norm``: clip the gradients' norm before each step (0 = off; a flow's official recipe clips).
    ``lr_factor(epoch, epochs)``: the factor on the optimiser's initial learning rates for that epoch (1-based),
    set by the loop at the epoch's start (a drop to a tenth for the last epochs, as some recipes ask); None = constant.
    """

    name: str
    optimizer: torch.optim.Optimizer
    loss: Callable[[torch.Tensor, dict[str, Any]], LossParts]
    max_grad_norm: float = 0.0
    lr_factor: Optional[Callable[[int, int], float]] = None


class EpochModel(AnomalyModel):
    """A model trained by the shared loop: it supplies networks, updates, a validation loss and a scorer."""

    trains_with_epochs = True
    trains_distributed = True
    augment: Optional[Augment] = None
    # DDP: set when an update leaves some parameters of a network it steps without a gradient (costs a graph walk).
    ddp_find_unused_parameters = False
    # Models whose prepare() caches frozen-backbone features per distinct frame (trainer/flows.py): their epochs
    # show every still and its codec-robust copies, each copy the same draw every epoch, so the cache serves them
    # all after the first epoch (a fresh draw per epoch, as other models get, would run the backbone every time).
    caches_features = False

    @abstractmethod
    def networks(self) -> dict[str, nn.Module]:
        """The trainable networks by name (checkpointed, moved to the device, switched train/eval)."""

    @abstractmethod
    def updates(self) -> list[Update]:
        """The optimiser steps of one batch, in order; built once (optimisers hold state)."""

    @abstractmethod
    def prepare(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 BGR frames [B,H,W,3] on the device -> the networks' input (the export graph's own first step)."""

    @abstractmethod
    def validation_loss(self, x: torch.Tensor) -> torch.Tensor:
        """Per-image loss [B] on held-out normals (eval mode, no grad): lower is better."""

    @abstractmethod
    def raw_score(self, x: torch.Tensor) -> torch.Tensor:
        """Per-image anomaly score [B] before calibration scaling (eval mode, no grad)."""

    def after_step(self, logs: dict[str, float]) -> None:
        """Hook after every batch's updates (e.g. re-initialise a collapsed discriminator)."""

    def fit_facts(self) -> dict[str, Any]:
        """Model-specific facts for the report, added to the loop's own."""
        return {}

    def fit(self, data: TrainingData, log: Log = lambda _m: None, run: Optional[RunOptions] = None) -> dict[str, Any]:
        """Train through the shared loop (never a loop of the model's own)."""
        self.require_training_images(data)
        return {**EpochTrainer(self, data, run or RunOptions(), log).run(), **self.fit_facts()}


class TrainingInterrupted(UserError):
    """Ctrl-C during training: stopped after the current step, the last checkpoint kept."""

    exit_code = 130


def resolve_device(name: str) -> torch.device:
    """auto = CUDA when torch sees a GPU, else CPU; asking for CUDA without one is a one-line error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{name}': torch sees no CUDA GPU here (torch {torch.__version__}); "
                        "use --device cpu or auto")
    return torch.device(name)


class _StopFlag:
    """First Ctrl-C sets the flag (the loop stops after the current step); a second one interrupts at once."""

    def __init__(self) -> None:
        self.set = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if not _main_thread():
            yield
            return
        previous = signal.getsignal(signal.SIGINT)

        def handler(_sig: int, _frame: Any) -> None:
            if self.set:
                signal.signal(signal.SIGINT, previous)
                raise KeyboardInterrupt
            self.set = True

        signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _seed_everything(seed: int, epoch: int) -> None:
    torch.manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))


@dataclass
class _History:
    epochs: list[dict[str, Any]] = field(default_factory=list)
    selected: Optional[int] = None


class EpochTrainer:
    """Runs ``model``'s updates over ``data`` for ``model.config.epochs`` epochs; see the module docstring."""

    def __init__(self, model: EpochModel, data: TrainingData, run: RunOptions, log: Log) -> None:
        self.model = model
        self.data = data
        self.run_opts = run
        self.shard = distributed.environment()
        self.rank, self.world = self.shard.rank, self.shard.world
        self.log: Log = log if self.rank == 0 else (lambda _m: None)
        self.device = distributed.device_for(self.shard, resolve_device(run.device))
        self.epochs = int(model.config.epochs)
        self.batch_size = int(model.config.batch_size)
        distributed.check_world_fits(self.shard, len(data.fit_paths), self.batch_size, "training images")
        cuda = self.device.type == "cuda"
        self.amp_dtype: Optional[torch.dtype] = None
        if cuda and run.amp:
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.nets = model.networks()
        for net in self.nets.values():
            net.to(self.device)
        self.updates = model.updates()
        self.initial_lrs = {u.name: [float(g["lr"]) for g in u.optimizer.param_groups] for u in self.updates}
        # Per update, the networks its optimiser does not step: their gradients are not synchronised in it.
        stepped = {u.name: {id(p) for g in u.optimizer.param_groups for p in g["params"]} for u in self.updates}
        self.frozen = {u.name: [k for k, net in self.nets.items() if not any(id(p) in stepped[u.name]
                                                                            for p in net.parameters())]
                       for u in self.updates}
        self.replicas: Optional[dict[str, nn.parallel.DistributedDataParallel]] = None
        self.has_val_defects = data.has_val_defects
        self.select = run.select if run.select != "auto" else ("val_auroc" if self.has_val_defects else "val_loss")
        if self.select == "val_auroc" and not self.has_val_defects:
            raise UserError("training.select is val_auroc but DIR/val has no defect images; add DIR/val/<defect>/ "
                            "images or set training.select: val_loss")
        self.history = _History()
        self.best_state: Optional[dict[str, Any]] = None
        self.stop = _StopFlag()
        self.stopping = False  # the step loop's agreed decision to stop (all ranks alike)

    # -- checkpoints ---------------------------------------------------------------------------------------
    def _ckpt(self, name: str) -> Optional[Path]:
        d = self.run_opts.checkpoint_dir
        return None if d is None else d / name

    def _write_run(self, status: str) -> None:
        path = self._ckpt(RUN)
        if path is None or self.rank != 0:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        done = len(self.history.epochs)
        atomic_write_text(path, json.dumps({
            "status": status, "model": self.model.name, "epochs_done": done, "epochs": self.epochs,
            "selected_epoch": self.history.selected, "fingerprint": self.run_opts.fingerprint,
            "history": self.history.epochs}, indent=2) + "\n")

    def _state(self) -> dict[str, Any]:
        return {"networks": {k: v.state_dict() for k, v in self.nets.items()},
                "optimizers": {u.name: u.optimizer.state_dict() for u in self.updates},
                "scaler": self.scaler.state_dict()}

    def _save(self, epoch: int) -> None:
        if self.run_opts.checkpoint_dir is None or self.rank != 0:
            return
        self.run_opts.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        payload = {"epoch": epoch, **self._state(), "history": self.history.epochs,
                   "selected": self.history.selected, "fingerprint": self.run_opts.fingerprint}
        _atomic_torch_save(payload, self._ckpt(LAST))
        if self.history.selected == epoch:
            _atomic_torch_save({"epoch": epoch, "networks": payload["networks"]}, self._ckpt(BEST))
        self._write_run("running")

    def _resume(self) -> int:
        """Load the last checkpoint (read by rank 0, sent to every rank); returns the number of epochs already done."""
        if not self.shard.distributed:
            state, best_state = self._read_checkpoint()
        else:
            loaded: tuple[str, Any, Any] = ("", None, None)
            if self.shard.writer:
                try:
                    loaded = ("ok", *self._read_checkpoint())
                except UserError as exc:
                    loaded = ("error", str(exc), None)
            status, state, best_state = distributed.broadcast_from_writer(loaded, self.shard)
            if status == "error":
                raise UserError(state)
        for k, net in self.nets.items():
            net.load_state_dict(state["networks"][k])
        for u in self.updates:
            u.optimizer.load_state_dict(state["optimizers"][u.name])
        self.scaler.load_state_dict(state["scaler"])
        self.history = _History(list(state["history"]), state["selected"])
        self.best_state = best_state
        done = int(state["epoch"])
        self.log(f"resuming from {self._ckpt(LAST)} after epoch {done}/{self.epochs}"
                 + (f" on {self.world} processes" if self.shard.distributed else ""))
        return done

    def _read_checkpoint(self) -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
        """The last checkpoint and the kept epoch's networks, checked against this run; one-line errors."""
        last = self._ckpt(LAST)
        if last is None or not last.is_file():
            where = self.run_opts.checkpoint_dir
            raise UserError(f"{where}: no checkpoint to resume from; run edge-train fit without --resume")
        onto = torch.device("cpu") if self.shard.distributed else self.device  # sent to the other ranks from the CPU
        try:
            state = torch.load(last, map_location=onto, weights_only=True)
        except Exception as exc:  # a truncated or foreign file: say which, do not guess
            raise UserError(f"{last}: unreadable checkpoint ({type(exc).__name__}); "
                            "run edge-train fit without --resume to start over") from None
        if state.get("fingerprint") != self.run_opts.fingerprint:
            raise UserError(f"{last}: this checkpoint was made with other data or settings; "
                            "resume with the same --data and config, or run without --resume to start over")
        done = int(state["epoch"])
        if done >= self.epochs:
            raise UserError(f"{last}: the run already finished its {done} epochs; "
                            "raise --epochs to train longer, or run without --resume")
        best = self._ckpt(BEST)
        best_state = None
        if state["selected"] is not None and best is not None and best.is_file():
            best_state = torch.load(best, map_location="cpu", weights_only=True)["networks"]
        return state, best_state

    # -- one epoch -----------------------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _set_learning_rates(self, epoch: int) -> None:
        """Each update's learning rates for ``epoch``: a function of the epoch alone, so a resumed run matches."""
        for u in self.updates:
            if u.lr_factor is not None:
                factor = float(u.lr_factor(epoch, self.epochs))
                for group, lr in zip(u.optimizer.param_groups, self.initial_lrs[u.name], strict=True):
                    group["lr"] = lr * factor

    def _train_epoch(self, epoch: int, loader: Any) -> dict[str, float]:
        for net in self.nets.values():
            net.train()
        self._set_learning_rates(epoch)
        sums: dict[str, float] = {}
        seen = 0
        t0 = time.monotonic()
        bar = _progress(len(loader), f"epoch {epoch}/{self.epochs}", self.run_opts.progress and self.rank == 0)
        batches = iter(loader)
        replicas = self.replicas or {}
        for step in range(1, len(loader) + 1):
            # The labels name the phases of a step for torch.profiler (benchmarks/train_throughput.py).
            with record_function("step.data"):
                frames = next(batches).to(self.device, non_blocking=True)
                with torch.no_grad():
                    x = self.model.prepare(frames)
            shared: dict[str, Any] = {}
            logs: dict[str, float] = {}
            for update in self.updates:
                update.optimizer.zero_grad(set_to_none=True)
                with contextlib.ExitStack() as unsynced:
                    for name in self.frozen[update.name] if replicas else ():
                        unsynced.enter_context(replicas[name].no_sync())
                    with record_function(f"step.{update.name}.forward"), self._autocast():
                        loss, parts = update.loss(x, shared)
                    with record_function(f"step.{update.name}.backward"):
                        self.scaler.scale(loss).backward()
                with record_function(f"step.{update.name}.optimizer"):
                    if update.max_grad_norm > 0:
                        self.scaler.unscale_(update.optimizer)
                        params = [p for g in update.optimizer.param_groups for p in g["params"] if p.grad is not None]
                        torch.nn.utils.clip_grad_norm_(params, update.max_grad_norm)
                    self.scaler.step(update.optimizer)
                logs.update({k: float(v.detach()) for k, v in parts.items()})
            self.scaler.update()
            n = int(frames.shape[0])
            stop = self.stop.set  # read once: a Ctrl-C landing after this step's exchange counts at the next
            if self.shard.distributed:
                n, logs, stop = self._across_ranks(n, logs, stop)
            self.model.after_step(logs)
            seen += n
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v * n
            if bar is not None and (step % self.run_opts.log_every == 0 or step == len(loader)):
                rate = seen / max(time.monotonic() - t0, 1e-9)
                bar.set_postfix({**{k: f"{v / seen:.4g}" for k, v in sums.items()}, "img/s": f"{rate:.0f}"})
                bar.update(step - bar.n)
            if stop:
                self.stopping = True
                break
        if bar is not None:
            bar.close()
        seconds = time.monotonic() - t0
        out = {k: v / max(seen, 1) for k, v in sums.items()}
        out.update({"images": seen, "seconds": seconds, "images_per_second": seen / max(seconds, 1e-9)})
        return out

    def _across_ranks(self, n: int, logs: dict[str, float], stop: bool) -> tuple[int, dict[str, float], bool]:
        """This step's images and loss parts over all ranks (means weighted by images), and whether any rank
        saw Ctrl-C: every rank then hooks, logs and stops at the same step."""
        local = torch.tensor([float(stop), float(n), *(v * n for v in logs.values())], dtype=torch.float64)
        total = distributed.all_sum(local)
        n_all = int(total[1])
        return n_all, {k: float(total[2 + i]) / max(n_all, 1) for i, k in enumerate(logs)}, bool(total[0] > 0)

    @torch.no_grad()
    def _validate(self) -> dict[str, Optional[float]]:
        for net in self.nets.values():
            net.eval()
        # Each rank scores its part of the held-out normals (and of DIR/val); all ranks get all the scores.
        losses: list[np.ndarray] = []
        normal_scores: list[np.ndarray] = []
        loader = self.data.loader(self.shard.part(self.data.holdout_paths), self.batch_size, shuffle=False)
        for frames in loader:
            x = self.model.prepare(frames.to(self.device))
            losses.append(self.model.validation_loss(x).float().cpu().numpy())
            normal_scores.append(self.model.raw_score(x).float().cpu().numpy())
        loss = self._gathered(losses)
        out: dict[str, Optional[float]] = {"val_loss": float(loss.mean()) if len(loss) else None, "val_auroc": None}
        if self.has_val_defects:
            assert self.data.val is not None
            val = self.data.val
            mine = val.images[self.rank::self.world]
            scores = [self.model.raw_score(self.model.prepare(torch.from_numpy(mine[i:i + self.batch_size])
                                                               .to(self.device))).float().cpu().numpy()
                      for i in range(0, len(mine), self.batch_size)]
            normal = self._gathered(normal_scores)
            s = np.concatenate([normal, self._gathered(scores)])
            y = np.concatenate([np.zeros(len(normal)), val.labels])
            out["val_auroc"] = float(roc_auc_score(y, s)) if np.isfinite(s).all() else None
        return out

    def _gathered(self, parts: list[np.ndarray]) -> np.ndarray:
        """This rank's per-image values joined with the other ranks' (in the images' order)."""
        local = np.concatenate(parts) if parts else np.zeros(0, np.float32)
        return distributed.gather_interleaved(torch.from_numpy(local), self.shard).numpy()

    def _better(self, row: dict[str, Any]) -> bool:
        """Is this epoch the one to keep so far (``self.select``)? Ties go to the later epoch."""
        if self.select == "last" or self.history.selected is None:
            return True
        best = self.history.epochs[self.history.selected - 1]
        key = "val_auroc" if self.select == "val_auroc" else "val_loss"
        new, old = row.get(key), best.get(key)
        if new is None or not math.isfinite(new):
            return False
        if old is None or not math.isfinite(old):
            return True
        return new >= old if key == "val_auroc" else new <= old

    # -- the run -------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train, validate and keep the chosen epoch (in torchrun's process group when there is one)."""
        with distributed.process_group(self.device):
            try:
                return self._run()
            finally:
                self.replicas = None

    def _run(self) -> dict[str, Any]:
        start = 0
        if self.run_opts.resume:
            start = self._resume()
        elif self.run_opts.checkpoint_dir is not None and (self.run_opts.checkpoint_dir / LAST).exists():
            self.log(f"starting over: {self.run_opts.checkpoint_dir} holds an earlier run (--resume continues one)")
        if self.shard.distributed:
            self.replicas = distributed.replicate(self.nets, self.device, self.model.ddp_find_unused_parameters)
        loader = self.data.loader(self.data.fit_paths, self.batch_size, shuffle=True,
                                  drop_last=len(self.data.fit_paths) > self.batch_size,
                                  augment=self.model.augment, pin_memory=self.device.type == "cuda",
                                  shard=(self.rank, self.world), per_epoch=not self.model.caches_features,
                                  fixed_draws=self.model.caches_features)
        where = f"{self.world} processes ({self.device} each)" if self.shard.distributed else str(self.device)
        self.log(f"training {self.model.name} on {where} for {self.epochs} epochs: "
                 f"{len(self.data.fit_paths)} images, batch {self.batch_size}, "
                 f"{len(self.data.holdout_paths)} held out; amp {self.amp_dtype or 'off'}; epoch kept by {self.select}")
        t_run = time.monotonic()
        with self.stop.installed():
            for epoch in range(start + 1, self.epochs + 1):
                _seed_everything(self.model.config.seed, epoch)
                set_epoch(loader, epoch)
                with distributed.routed(self.model, self.replicas) if self.replicas else contextlib.nullcontext():
                    row: dict[str, Any] = {"epoch": epoch, **self._train_epoch(epoch, loader)}
                if self.stopping:
                    self._interrupted(epoch)
                distributed.sync_buffers(self.nets)
                distributed.check_replicas(self.nets, self.shard)
                row.update(self._validate())
                if self._better(row):
                    self.history.selected = epoch
                    self.best_state = copy.deepcopy({k: v.state_dict() for k, v in self.nets.items()})
                self.history.epochs.append(_rounded(row))
                self._save(epoch)
                self.log(_epoch_line(row, self.epochs, self.history.selected == epoch))
                if self.run_opts.stop_after_epoch == epoch and epoch < self.epochs:
                    self.stop.set = True
                    self._interrupted(epoch + 1)
        assert self.history.selected is not None and self.best_state is not None
        for k, net in self.nets.items():
            net.load_state_dict(self.best_state[k])
            net.eval()
        self._write_run("complete")
        chosen = self.history.epochs[self.history.selected - 1]
        self.log(f"kept epoch {self.history.selected} ({self.select}); {time.monotonic() - t_run:.1f}s")
        rates = [r["images_per_second"] for r in self.history.epochs[start:]]
        return {"device": str(self.device), "amp": str(self.amp_dtype) if self.amp_dtype else None,
                "epochs": self.epochs, "batch_size": self.batch_size, "selection_rule": self.select,
                "selected_epoch": self.history.selected, "selected": chosen, "history": self.history.epochs,
                "images_per_second": round(float(np.median(rates)), 2) if rates else None,
                "n_train_images": len(self.data.fit_paths), "n_holdout_images": len(self.data.holdout_paths),
                "resumed_from_epoch": start or None, "processes": self.world}

    def _interrupted(self, epoch: int) -> None:
        done = len(self.history.epochs)
        where = self.run_opts.checkpoint_dir
        kept = (f"the last checkpoint (epoch {done}) is kept in {where}; continue with the same command and --resume"
                if done and where is not None else "no epoch finished, nothing to resume")
        self._write_run("interrupted")
        raise TrainingInterrupted(f"interrupted during epoch {epoch}/{self.epochs}; {kept}")


def _rounded(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}


def _epoch_line(row: dict[str, Any], epochs: int, kept: bool) -> str:
    skip = {"epoch", "images", "seconds", "images_per_second"}
    parts = [f"{k} {v:.4g}" for k, v in row.items() if k not in skip and isinstance(v, float)]
    return (f"epoch {row['epoch']}/{epochs}: " + ", ".join(parts)
            + f"; {row['images_per_second']:.0f} img/s, {row['seconds']:.1f}s" + (" (kept)" if kept else ""))


def _progress(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar on stderr when it is a terminal (disable=None); None when progress is off."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="batch", file=sys.stderr, leave=False, disable=None,
                dynamic_ncols=True)


def _atomic_torch_save(obj: Any, path: Optional[Path]) -> None:
    assert path is not None
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def run_fingerprint(config: dict[str, Any], data_sha256: str) -> str:
    """What must match for --resume: the training settings (not the epoch count) and the training data."""
    relevant = {k: v for k, v in config.items() if k not in ("epochs", "device", "report", "export", "training")}
    blob = json.dumps({"config": relevant, "data": data_sha256}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()

