"""Checks of the command line's arguments, made before any data is read or any file written.

Each check raises :class:`ArgumentError` with one line that names the argument, says what was
expected and what came; the command line prints it and exits with status 2.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from .checkpoints import BEST, CHECKPOINT
from .runtime import backend_problem

__all__ = ["ArgumentError", "check_out", "write_problem", "check_device", "resolve_checkpoint", "check_backend"]


class ArgumentError(ValueError):
    """An argument that cannot work: the message names it, what was expected and what came."""


def write_problem(folder: Union[str, os.PathLike]) -> Optional[str]:
    """Why this process cannot create a file in the existing ``folder`` (``os.access``, then a
    probe file created and removed, which also catches what permission bits do not say: a
    read-only file system, an administrator's view of the bits), or ``None``."""
    folder = Path(folder)
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"{folder} is not writable by this user"
    probe = folder / f".write-probe.{os.getpid()}.tmp"
    try:
        probe.open("x").close()
        probe.unlink()
    except OSError as e:
        return f"cannot create a file in {folder} ({e.strerror or e})"
    return None


def check_out(path: Union[str, os.PathLike], flag: str = "--out") -> Path:
    """``path`` as a folder to write in: an existing folder, or one that can be made (its
    closest existing parent is a folder this process can write in). Creates nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ArgumentError(f"{flag}: expected a folder (existing or new); got {path}, which is a file")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ArgumentError(f"{flag}: expected a folder that can be made; got {path}, but {existing} is a file")
    problem = write_problem(existing)
    if problem is not None:
        raise ArgumentError(f"{flag}: expected a folder this process can write in; got {path}: {problem}")
    return path


def check_device(device: Optional[Union[str, torch.device]], flag: str = "--device") -> torch.device:
    """``device`` as a :class:`torch.device` this machine has (``None``: CUDA when available, else the CPU)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ArgumentError(f"{flag}: expected cpu, cuda or cuda:N; got {str(device)!r}") from None
    if parsed.type not in ("cpu", "cuda"):
        raise ArgumentError(f"{flag}: expected cpu, cuda or cuda:N; got {str(device)!r}")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            why = "this PyTorch is built without CUDA" if torch.version.cuda is None else "torch.cuda.is_available() is False"
            raise ArgumentError(f"{flag}: expected a device this machine has; got {str(device)!r}, but PyTorch finds no CUDA device ({why})")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise ArgumentError(f"{flag}: expected a device this machine has; got {str(device)!r}, but there are {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    return parsed


def resolve_checkpoint(path: Union[str, os.PathLike], flag: str = "--checkpoint") -> Path:
    """The checkpoint file ``path`` names: the file itself, or for a run folder its ``best.pt``
    (the best validated model, what ``train`` evaluates), else its ``checkpoint.pt`` (a run
    without validation)."""
    path = Path(path)
    if path.is_dir():
        found = next((path / name for name in (BEST, CHECKPOINT) if (path / name).is_file()), None)
        if found is None:
            raise ArgumentError(f"{flag}: expected a checkpoint file or a run folder holding {BEST} or {CHECKPOINT}; got the folder {path}, which holds neither")
        return found
    if not path.exists():
        raise ArgumentError(f"{flag}: expected a checkpoint file or a run folder; got {path}, which does not exist")
    return path


def check_backend(model: nn.Module, device: Union[str, torch.device], backend: Optional[str], training: bool,
                  flag: str = "--backend") -> None:  # fmt: skip
    """Refuse an explicit ``backend`` (the one ``model``'s gates were given) that cannot run them
    on ``device``, with the library's reasons (:func:`~examples.pancreas.runtime.backend_problem`)."""
    problem = backend_problem(model, device, training)
    if problem is not None:
        mode = "train" if training else "run"
        raise ArgumentError(f"{flag} {backend}: expected a backend that can {mode} the gates on {torch.device(device)}; the library says: {problem}")
