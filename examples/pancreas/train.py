"""Training: the loss, the optimiser and its schedule, validation and the training loop.

One process or many: under ``torchrun`` (``WORLD_SIZE`` > 1) the loop runs data-parallel
(DistributedDataParallel; NCCL on CUDA, Gloo on CPU), each rank drawing its own patches; rank 0
logs and writes the checkpoints (:mod:`examples.pancreas.checkpoints` describes the files).

Data: the deterministic preprocessing of every training and validation case runs once, into a
:class:`monai.data.CacheDataset`; a :class:`torch.utils.data.DataLoader` with ``cfg.workers``
processes draws the patches (:func:`examples.pancreas.sampling.patch_loader`), so the GPU does
not wait for augmentation.

Exact resume: every patch of every step is drawn from a random stream of its own
(:mod:`examples.pancreas.sampling`), so the data of step ``s`` do not depend on what ran
before; with the model, optimizer, scheduler and RNG states and the validation record restored
from a checkpoint, a resumed run in deterministic mode (``Config.deterministic``) repeats the
losses, validation Dice and best checkpoint of an uninterrupted one.

Validation (``cfg.val_every`` > 0): every ``val_every`` steps and at the last one, the mean Dice
of sliding-window segmentations of the validation cases (on the training grid) is logged; the
best model so far is kept as ``best.pt`` beside ``checkpoint.pt``, and with ``cfg.patience`` the
run stops after that many validations without a better Dice.

The run's process-wide settings (threads, deterministic algorithms...) hold inside
:func:`train` only (:func:`examples.pancreas.runtime.process_settings`).

Nothing lost, nothing clobbered:

- Ctrl-C (SIGINT) or SIGTERM: the step in progress finishes, a checkpoint of it is written, and
  :func:`train` raises :class:`TrainingInterrupted` (the command line prints how to resume and
  exits with 128 + the signal's number); a second signal stops at once.
- Every file is written atomically; a writer killed mid-write leaves a temporary file, which
  the next run in the folder removes. The log is written before the checkpoint, and a resumed
  run keeps the log's rows up to the checkpoint's step only: the two never disagree.
- The cases that are not cached for training (the test cases, and the validation cases of a
  run without validation) are checked from their headers, image data streams and labels before anything is cached
  (:func:`examples.pancreas.volumes.check_case_files`): a bad case costs seconds, not the run.
"""

from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from attention_gates import deep_supervision_weights
from attention_gates.files import atomic_write

from .cases import load_cases
from .checkpoints import (
    BEST,
    CHECKPOINT,
    LOG,
    best_state,
    build_model,
    prepare_run_dir,
    read_log,
    remove_stale_files,
    restore_best,
    save_checkpoint,
    training_state,
    write_log,
)
from .config import Config
from .evaluate import preferred_layout, validation_dice
from .runtime import StopRequest, distributed, process_settings, resolve_device, rng_state, seed_everything, set_rng_state, stop_signals
from .sampling import patch_loader
from .splits import save_splits, split_cases
from .transforms import split_at_first_random, train_transforms
from .volumes import check_case_files

__all__ = ["train", "TrainingInterrupted", "loss_function", "make_optimizer", "lr_factor"]

#: DDP's note when the 1x1x1 weights' strides differ between the layouts only along their size-1 axes: nothing to fix
GRAD_STRIDES = "Grad strides do not match bucket view strides"


class TrainingInterrupted(Exception):
    """A stop signal (SIGINT, SIGTERM) ended :func:`train` after step ``step`` of ``steps``.

    ``checkpoint``: the checkpoint holding every finished step (``None`` when no step was
    trained and there is none); ``signum``: the signal. ``--resume`` continues the run.
    """

    def __init__(self, signum: int, step: int, steps: int, checkpoint: Optional[Path]) -> None:
        self.signum, self.step, self.steps, self.checkpoint = signum, step, steps, checkpoint
        name = signal.Signals(signum).name
        saved = f"saved in {checkpoint}" if checkpoint is not None else "no step was trained, nothing saved"
        super().__init__(f"{name}: training stopped after step {step} of {steps}, {saved}")


def loss_function(cfg: Config) -> Callable[[Any, Tensor], Tensor]:
    """The paper's soft Dice loss (or Dice + cross-entropy) on softmax outputs, in float32, in
    MONAI's ``DeepSupervisionLoss``: with per-scale deep supervision (one output per decoder
    level, ``len(cfg.filters) - 1``), the sum over scales weighted by
    ``deep_supervision_weights``, the labels resampled to each scale by nearest neighbour."""
    from monai.losses import DeepSupervisionLoss, DiceCELoss, DiceLoss

    base = DiceLoss(to_onehot_y=True, softmax=True) if cfg.loss == "dice" else DiceCELoss(to_onehot_y=True, softmax=True)
    return DeepSupervisionLoss(base, weights=deep_supervision_weights(len(cfg.filters) - 1))


def make_optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    """Adam, or SGD with Nesterov momentum (``cfg.optimizer``), at ``cfg.lr`` with ``cfg.weight_decay``."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)


def lr_factor(cfg: Config) -> Callable[[int], float]:
    """The learning-rate factor of a step (for ``LambdaLR``): a linear warm-up over
    ``cfg.warmup_steps``, then ``cfg.schedule`` (poly 0.9, cosine, or constant) to ``cfg.steps``."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        if cfg.schedule == "poly":
            return (1 - t) ** 0.9
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * t))
        return 1.0

    return factor


def _peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MiB: on CUDA the peak PyTorch allocated since the run's start; on the CPU
    the peak resident set of the whole process (run one model per process to compare them,
    as :func:`examples.pancreas.compare.compare` does)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:  # not on Windows
        return math.nan
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Trainer:
    """One run's training state (model, optimizer, schedule, validation record, log rows) and its steps."""

    def __init__(self, cfg: Config, out: Path, model: nn.Module, device: torch.device, rank: int, world: int) -> None:
        self.cfg, self.out, self.model, self.device, self.rank, self.world = cfg, out, model, device, rank, world
        self.optimizer = make_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(cfg))
        self.start = 0
        self.record: dict[str, Any] = {"best": None, "since_best": 0, "stopped": False}
        self.log_rows: list[dict[str, float]] = []
        self.net = model
        self.layout = preferred_layout(device)
        self.loss_fn = loss_function(cfg)
        self.amp = cfg.amp and device.type == "cuda"
        self.step_times: list[float] = []
        self.val_seconds = 0.0

    def resume(self, ckpt: dict[str, Any]) -> None:
        """Continue from a checkpoint: weights, optimizer, schedule, random states, validation record."""
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        self.start = int(ckpt["step"])
        self.record = restore_best(self.out, ckpt, write=self.rank == 0)

    def parallel(self) -> None:
        """Wrap the model in DistributedDataParallel when there are several processes."""
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

    def checkpoint(self, step: int, improved: bool) -> None:
        """Write (rank 0) the log, ``checkpoint.pt`` of ``step``, and ``best.pt`` when ``improved``.

        In this order: a process killed between two writes leaves a log ahead of the checkpoint
        (cut back to it on resume, :func:`~examples.pancreas.checkpoints.read_log`), or a
        checkpoint ahead of ``best.pt`` (rebuilt from it, :func:`~examples.pancreas.checkpoints.restore_best`).
        """
        if self.rank != 0:
            return
        state = training_state(
            self.model, optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(), step=step,
            rng=rng_state(), args=self.cfg.to_dict(), validation=dict(self.record),
        )  # fmt: skip
        write_log(self.out / LOG, self.log_rows)
        save_checkpoint(state, self.out / CHECKPOINT)
        if improved:
            save_checkpoint(best_state(state, self.record["best"]["val_dice"]), self.out / BEST)

    def agreed(self, flag: bool) -> bool:
        """``flag`` of any rank (all-reduced under torchrun, so that every rank stops at the same step)."""
        if self.world == 1:
            return flag
        value = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(value)
        return bool(value.item())

    def step(self, image: Tensor, label: Tensor, step: int) -> tuple[float, float]:
        """One optimizer step on a batch; ``(loss averaged over the ranks, learning rate used)``."""
        image = image.to(self.device, non_blocking=True).contiguous(memory_format=self.layout)
        label = label.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            output = self.net(image)
        loss = self.loss_fn(output, label)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        value = loss.detach()
        if self.world > 1:
            dist.all_reduce(value)
            value /= self.world
        value = float(value)
        if not math.isfinite(value):
            raise FloatingPointError(f"loss is {value} at step {step + 1}; lower --lr or check the data")
        return value, lr

    def validate(self, step: int, val_cases: list[dict[str, Any]]) -> tuple[float, bool]:
        """Validation Dice after ``step`` steps and whether it is the best so far (the record updated)."""
        t1 = time.perf_counter()
        dice = validation_dice(self.model, val_cases, self.cfg, self.device, self.rank, self.world)
        self.net.train()
        self.val_seconds += time.perf_counter() - t1
        improved = self.record["best"] is None or dice > self.record["best"]["val_dice"]
        if improved:
            self.record.update(best={"step": step, "val_dice": dice}, since_best=0)
        else:
            self.record["since_best"] += 1
        self.record["stopped"] = bool(self.cfg.patience) and self.record["since_best"] >= self.cfg.patience
        return dice, improved

    def loop(self, batches, last: int, val_cases: list[dict[str, Any]], bar, on_step, stop: StopRequest) -> Optional[int]:
        """Steps ``start .. last - 1``: train, validate, checkpoint, log; stops early when the
        record says so. Returns the step after which a stop signal ended the loop (its checkpoint
        written), or ``None``."""
        cfg = self.cfg
        postfix = {} if self.record["best"] is None else {"best": f"{self.record['best']['val_dice']:.3f}"}
        self.net.train()
        if self.agreed(bool(stop)):  # before the first step: nothing new to save
            return self.start
        for step in range(self.start, last):
            t0 = time.perf_counter()
            value, lr = self.step(*next(batches), step)
            dt = time.perf_counter() - t0
            self.step_times.append(dt)
            row = {"step": step + 1, "loss": value, "lr": lr, "seconds": dt, "val_dice": math.nan}
            validate = cfg.val_every > 0 and ((step + 1) % cfg.val_every == 0 or step + 1 == cfg.steps)
            improved = False
            if validate:
                row["val_dice"], improved = self.validate(step + 1, val_cases)
                postfix.update(val_dice=f"{row['val_dice']:.3f}", best=f"{self.record['best']['val_dice']:.3f}")
            bar.set_postfix(postfix | {"loss": f"{value:.4f}", "lr": f"{lr:.2g}"})
            self.log_rows.append(row)
            bar.update()
            stopping = self.agreed(bool(stop))
            if validate or stopping or (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:  # a stop comes at a validation
                self.checkpoint(step + 1, improved)
            if on_step is not None:
                on_step(step + 1, value)
            if stopping:
                return step + 1
            if self.record["stopped"]:
                break
        return None

    def result(self, splits: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
        """:func:`train`'s return value."""
        timed = self.step_times[1:] or self.step_times
        best, rows = self.record["best"], self.log_rows
        return {
            "losses": [r["loss"] for r in rows],
            "steps": int(rows[-1]["step"]) if rows else self.start,
            "seconds_per_step": float(np.mean(timed)) if timed else float("nan"),
            "validation_seconds": self.val_seconds,
            "peak_memory_mb": _peak_memory_mb(self.device),
            "params": sum(p.numel() for p in self.model.parameters()),
            "checkpoint": str(self.out / (BEST if best is not None else CHECKPOINT)),
            "last_checkpoint": str(self.out / CHECKPOINT),
            "best": best,
            "val_dice": [(int(r["step"]), r["val_dice"]) for r in rows if not math.isnan(r["val_dice"])],
            "stopped_early": bool(self.record["stopped"]),
            "splits": {k: [c["case_id"] for c in v] for k, v in splits.items()},
        }


def _cache(cfg: Config, splits: dict[str, list[dict[str, Any]]], progress: bool):
    """``(cache, tail, validation cases)``: the training (then validation) cases after the
    deterministic head of the training transforms, cached, and the random tail."""
    from monai.data import CacheDataset

    head, tail = split_at_first_random(train_transforms(cfg))
    cached = splits["train"] + (splits["val"] if cfg.val_every else [])
    cache = CacheDataset(cached, head, cache_rate=cfg.cache_rate, num_workers=max(1, cfg.workers), progress=progress)
    return cache, tail, [cache[i] for i in range(len(splits["train"]), len(cached))]


def train(
    cfg: Config,
    out: Union[str, Path],
    *,
    resume: bool = False,
    overwrite: bool = False,
    device: Optional[Union[str, torch.device]] = None,
    progress: bool = True,
    on_step: Optional[Callable[[int, float], None]] = None,
    cases: Optional[list[dict[str, Any]]] = None,
) -> dict[str, Any]:
    """Train ``cfg``'s model into the run folder ``out`` (see the module docstring).

    Writes ``config.json``, ``splits.json``, ``log.csv`` (step, loss, lr, seconds, and
    ``val_dice`` at the validation steps), ``checkpoint.pt`` and, with validation, ``best.pt``.
    ``resume`` continues the run in ``out`` from its checkpoint (the steps after it are redone;
    a run that stopped early stays stopped); ``overwrite`` lets a new run replace one.
    ``on_step(step, loss)`` is called after every optimizer step (steps count from 1).
    ``cases``: the loaded cases (default: :func:`~examples.pancreas.cases.load_cases` of ``cfg``).

    Returns ``{"losses", "steps" (the last step trained), "seconds_per_step",
    "validation_seconds", "peak_memory_mb", "params", "checkpoint" (``best.pt`` when the run
    validated, else ``checkpoint.pt``), "last_checkpoint", "best" ({"step", "val_dice"} or
    ``None``), "val_dice" ([(step, Dice)]), "stopped_early", "splits"}`` (losses averaged over
    the ranks; ``seconds_per_step`` leaves out the first step and the validations).

    Raises:
        ValueError: ``cfg.val_every`` > 0 and the split has no validation cases; a case that
            cannot be read or checked (one line naming the case and the file), before any step.
        TrainingInterrupted: a stop signal came; the checkpoint of the last finished step is written.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    rank, world, local_rank = distributed()
    splits = split_cases(cfg, load_cases(cfg) if cases is None else cases)
    if cfg.val_every and not splits["val"]:
        raise ValueError(f"val_every={cfg.val_every} needs validation cases, the split has none (val_fraction={cfg.val_fraction})")
    for case in splits["test"] + ([] if cfg.val_every else splits["val"]):  # the others are read and checked by the cache
        check_case_files(case)
    ckpt = prepare_run_dir(cfg, out, resume, overwrite)
    if rank == 0:
        remove_stale_files(out)
    device = resolve_device(device, local_rank)
    quiet = [GRAD_STRIDES] if world > 1 and preferred_layout(device) == torch.channels_last_3d else []
    with process_settings(cfg.threads, cfg.deterministic, device, quiet), stop_signals() as stop:
        seed_everything(cfg.seed)
        cache, tail, val_cases = _cache(cfg, splits, progress and rank == 0)
        trainer = _Trainer(cfg, out, build_model(cfg).to(device, memory_format=preferred_layout(device)), device, rank, world)
        if ckpt is not None:
            trainer.resume(ckpt)
        trainer.parallel()
        last = trainer.start if trainer.record["stopped"] else cfg.steps
        loader = patch_loader(cache, tail, len(splits["train"]), trainer.start, last, cfg, rank, world, device.type == "cuda")
        trainer.log_rows = read_log(out / LOG, trainer.start) if resume else []
        if rank == 0:
            atomic_write(out / "config.json", json.dumps(cfg.to_dict(), indent=2))
            save_splits({k: [c["case_id"] for c in v] for k, v in splits.items()}, out / "splits.json")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        bar = tqdm(total=cfg.steps, initial=trainer.start, desc=f"train {cfg.model}", unit="step", disable=not progress or rank != 0)
        batches = iter(loader)
        try:
            stopped_at = trainer.loop(batches, last, val_cases, bar, on_step, stop)
        finally:
            del batches  # stops the loader's worker processes
            bar.close()
    if world > 1:  # every rank has written what it had to; rank 0 evaluates alone
        dist.barrier()
        dist.destroy_process_group()
    if stopped_at is not None:
        saved = out / CHECKPOINT
        raise TrainingInterrupted(stop.signum, stopped_at, cfg.steps, saved if saved.is_file() else None)
    return trainer.result(splits)
