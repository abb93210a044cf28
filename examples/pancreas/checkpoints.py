"""The files of a run folder: the model built from a config, checkpoints, the best checkpoint and the log.

Checkpoint format (``checkpoint.pt`` in the run folder, written atomically every
``checkpoint_every`` steps, at every validation and at the end; loadable with
``torch.load(weights_only=True)``)::

    {"model": state_dict, "config": attention_gates.checkpoint_config(model)
     (``"arch"``: "UNet" | "AttentionUNet", and the model's constructor arguments),
     "optimizer": ..., "scheduler": ..., "step": int, "rng": {...}, "args": Config.to_dict(),
     "validation": {"best": {"step", "val_dice"} or None, "since_best": int, "stopped": bool}}

``best.pt`` holds ``"model"``, ``"config"``, ``"step"``, ``"args"`` and ``"val_dice"`` of the
best validation. Both load with :func:`load_checkpoint`; :func:`model_from_checkpoint` rebuilds
the model from the checkpoint alone (:func:`attention_gates.network_from_config`), and
``AttentionUNet3D.from_unet(path)`` reads a U-Net checkpoint of this example directly.

``log.csv`` holds one row per step: ``step, loss, lr, seconds, val_dice`` (``val_dice`` blank
where the step was not validated).
"""

from __future__ import annotations

import csv
import io
import math
import os
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from attention_gates import AttentionUNet, UNet, checkpoint_config, network_from_config
from attention_gates.files import atomic_write, remove_stale_temporaries
from attention_gates.finetune import freeze_backbone

from .config import Config

__all__ = [
    "CHECKPOINT",
    "BEST",
    "LOG",
    "LOG_FIELDS",
    "RUNTIME_SETTINGS",
    "CheckpointError",
    "build_model",
    "load_checkpoint",
    "model_from_checkpoint",
    "save_checkpoint",
    "training_state",
    "best_state",
    "restore_best",
    "prepare_run_dir",
    "remove_stale_files",
    "read_log",
    "write_log",
]

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
LOG = "log.csv"
LOG_FIELDS = ("step", "loss", "lr", "seconds", "val_dice")

#: Settings that change how fast a run goes, not what it computes (the thread count up to float
#: rounding): a resumed run may change them, e.g. on another machine.
RUNTIME_SETTINGS = ("threads", "workers", "cache_rate")


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not match the run."""


# ----------------------------------------------------------------------------- models


def build_model(cfg: Config) -> UNet:
    """A fresh model for ``cfg`` (``cfg.model``: an :class:`~attention_gates.AttentionUNet` or a
    :class:`~attention_gates.UNet`, 3D, one input channel, two classes), or with ``cfg.init_from``
    the Attention U-Net made from a trained U-Net checkpoint (pass-through gates,
    :mod:`attention_gates.finetune`), with only the gates trainable when ``cfg.train_params ==
    "gates"``. Its checkpoints describe it with :func:`attention_gates.checkpoint_config`."""
    if cfg.init_from is None:
        common = dict(in_channels=1, out_channels=2, filters=list(cfg.filters), norm=cfg.norm, deep_supervision=cfg.deep_supervision)
        if cfg.model == "attention":
            return AttentionUNet(3, heads=cfg.heads, backend=cfg.backend, **common)
        return UNet(3, **common)
    if cfg.model != "attention":
        raise ValueError("init_from (a U-Net checkpoint to add gates to) needs model='attention'")
    from attention_gates import AttentionUNet3D

    unet = model_from_checkpoint(cfg.init_from)
    if isinstance(unet, AttentionUNet):
        raise CheckpointError(f"init_from must be a UNet checkpoint, got an AttentionUNet from {cfg.init_from}")
    model, _ = AttentionUNet3D.from_unet(unet, heads=cfg.heads)
    if tuple(model.filters) != tuple(cfg.filters):
        raise ValueError(f"init_from has filters {list(model.filters)}, the run asks for {list(cfg.filters)}")
    if cfg.backend is not None:
        model.set_backend(cfg.backend)
    if cfg.train_params == "gates":
        freeze_backbone(model)
    return model


def load_checkpoint(path: Union[str, Path], map_location: Union[str, torch.device] = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; ``CheckpointError`` names what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, not a torch file, foreign pickle...
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    missing = [k for k in ("model", "config", "step") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not a pancreas-example checkpoint (missing {missing})")
    return ckpt


def model_from_checkpoint(
    checkpoint: Union[str, Path, dict[str, Any]], backend: Optional[str] = None, map_location: str = "cpu"
) -> nn.Module:
    """Rebuild the trained model from a checkpoint (path or loaded dict) alone, in eval mode:
    :func:`attention_gates.network_from_config` of its ``"config"`` (``backend``: the gates'),
    then its weights."""
    ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint, map_location)
    config = ckpt["config"]
    overrides = {"backend": backend} if isinstance(config, dict) and config.get("arch") == "AttentionUNet" else {}
    try:
        model = network_from_config(config, **overrides)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint model config cannot be built: {e}") from None
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint weights do not fit its own model config: {e}") from None
    return model.eval()


def save_checkpoint(state: dict[str, Any], path: Union[str, Path]) -> None:
    """``torch.save`` atomically and durably (:func:`attention_gates.files.atomic_write`)."""
    atomic_write(path, lambda f: torch.save(state, f))


def training_state(model: nn.Module, **entries: Any) -> dict[str, Any]:
    """A checkpoint's dict: ``model``'s weights and its :func:`~attention_gates.checkpoint_config`, plus ``entries``."""
    return {"model": model.state_dict(), "config": checkpoint_config(model), **entries}


def best_state(state: dict[str, Any], val_dice: float) -> dict[str, Any]:
    """The ``best.pt`` of a training checkpoint ``state``: the model and what rebuilds it."""
    return {**{k: state[k] for k in ("model", "config", "step", "args")}, "val_dice": val_dice}


# ----------------------------------------------------------------------------- the run folder


def _config_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    keys = sorted((set(a) | set(b)) - set(RUNTIME_SETTINGS))
    return [f"{k}: saved {a.get(k)!r}, given {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def prepare_run_dir(cfg: Config, out: Union[str, Path], resume: bool, overwrite: bool = False) -> Optional[dict[str, Any]]:
    """Check ``out`` for a new run or a resumed one; return the checkpoint to resume from (or ``None``).

    A new run refuses a folder holding another run's checkpoint unless ``overwrite`` (which
    deletes that checkpoint, its best checkpoint and its log, so that a later ``resume`` cannot
    pick them up); a resumed run needs the folder's checkpoint and the same config it was
    started with (the checkpoint's ``"args"``; settings added to :class:`Config` since take their
    defaults), :data:`RUNTIME_SETTINGS` aside. Nothing is written or deleted when a check fails.
    """
    out = Path(out)
    ckpt_path = out / CHECKPOINT
    if not resume:
        if ckpt_path.exists():
            if not overwrite:
                raise CheckpointError(
                    f"{out} already holds a run ({CHECKPOINT}); pass --resume to continue it, --overwrite to replace it, "
                    "or choose another --out"
                )
            if int(os.environ.get("RANK", "0")) == 0:
                for name in (CHECKPOINT, BEST, LOG):
                    (out / name).unlink(missing_ok=True)
        return None
    ckpt = load_checkpoint(ckpt_path)
    try:
        saved = Config.from_dict(ckpt.get("args") or {}).to_dict()
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{ckpt_path} holds a config this version cannot read: {e}") from None
    diff = _config_diff(saved, cfg.to_dict())
    if diff:
        raise CheckpointError(f"{out} was started with a different config; cannot resume with this one: " + "; ".join(diff))
    return ckpt


def restore_best(out: Union[str, Path], ckpt: dict[str, Any], write: bool = True) -> dict[str, Any]:
    """Make ``best.pt`` in ``out`` agree with a resumed checkpoint's validation record; returns
    the record (``{"best", "since_best", "stopped"}``) the resumed run continues with.

    ``best.pt`` is written right after the checkpoint of the same step, so a run stopped between
    the two writes leaves an older ``best.pt``: the checkpoint then holds the best model itself,
    and ``best.pt`` is rewritten from it (when ``write``: by one process only). An unreadable
    ``best.pt`` (cut short, damaged) whose model the checkpoint does not hold is lost: a warning
    says so, and the record forgets its best, so that the next validation writes ``best.pt``
    again (the count of validations without improvement, which early stopping reads, is kept).
    Any other disagreement means the folder was altered: ``CheckpointError``.
    """
    record = {"best": None, "since_best": 0, "stopped": False, **(ckpt.get("validation") or {})}
    best = record["best"]
    if best is None:
        return record
    path = Path(out) / BEST
    try:
        have = load_checkpoint(path)["step"] if path.is_file() else None
    except CheckpointError as e:
        if best["step"] != ckpt["step"]:
            warnings.warn(
                f"{e}; the best model so far (step {best['step']}, validation Dice {best['val_dice']:.4f}) is lost: training resumes "
                f"from {CHECKPOINT}, and {BEST} will be rewritten at the next validation",
                stacklevel=2,
            )
            return {**record, "best": None}
        have = None  # the checkpoint holds the best model: rewritten below
    if have == best["step"]:
        return record
    if best["step"] != ckpt["step"]:
        held = "is missing" if have is None else f"holds step {have}"
        raise CheckpointError(
            f"{path} {held}, but the checkpoint's validation record names step {best['step']} as the best; "
            "the run folder was changed by hand: start a new run (--overwrite)"
        )
    if write:
        save_checkpoint(best_state(ckpt, best["val_dice"]), path)
    return record


def remove_stale_files(out: Union[str, Path]) -> list[Path]:
    """Delete the temporary files that writers killed mid-write left in the run folder ``out``
    (:func:`attention_gates.files.remove_stale_temporaries` of every file they were meant to
    replace; a live writer's are kept); returns what was deleted."""
    out = Path(out)
    if not out.is_dir():
        return []
    targets = {p.name[1:].rsplit(".", 3)[0] for p in out.glob(".*.tmp") if p.name.count(".") >= 4}
    return sorted(q for name in targets for q in remove_stale_temporaries(out / name))


def read_log(path: Union[str, Path], upto: int) -> list[dict[str, float]]:
    """The rows of a run's ``log.csv`` up to step ``upto`` (none when there is no log); a blank
    cell (no validation at that step, or a log written before validation existed) reads as NaN."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = [{k: float(r.get(k) or "nan") for k in LOG_FIELDS} for r in csv.DictReader(f)]
    return [r for r in rows if r["step"] <= upto]


def write_log(path: Union[str, Path], rows: list[dict[str, float]]) -> None:
    """Write ``rows`` (dicts of :data:`LOG_FIELDS`) as ``log.csv``, atomically; NaN as a blank cell."""
    text = io.StringIO()
    w = csv.DictWriter(text, fieldnames=LOG_FIELDS)
    w.writeheader()
    w.writerows({k: "" if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()} for r in rows)
    atomic_write(path, text.getvalue())
