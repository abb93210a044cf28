"""The process a run trains in: its device, its process group under ``torchrun``, its random
state, and the process-wide settings a run changes (and gives back).

PyTorch keeps some settings per process (the CPU thread count, deterministic algorithms,
cuDNN's benchmark mode, the ``CUBLAS_WORKSPACE_CONFIG`` variable) and Python keeps the warning
filters per process: :func:`process_settings` sets what a run asks for and restores every one
of them on exit, also when the run raises.
"""

from __future__ import annotations

import contextlib
import os
import random
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["process_settings", "resolve_device", "distributed", "rng_state", "set_rng_state", "seed_everything"]

CUBLAS_WORKSPACE = "CUBLAS_WORKSPACE_CONFIG"


@contextlib.contextmanager
def process_settings(
    threads: int = 0,
    deterministic: bool = False,
    device: Union[str, torch.device] = "cpu",
    ignore_warnings: Sequence[str] = (),
) -> Iterator[None]:
    """Context manager: a run's process-wide settings inside, the caller's restored on exit.

    Args:
        threads: CPU threads (``torch.set_num_threads``); 0 leaves the count as it is.
        deterministic: deterministic algorithms (``torch.use_deterministic_algorithms``; on CUDA
            warn-only, as CUDA has no deterministic trilinear-upsampling backward), cuDNN's
            benchmark off and ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` unless already set.
        device: the run's device (it decides warn-only).
        ignore_warnings: regular expressions of warning messages to ignore inside.

    On exit (normal or by an exception) the thread count, both deterministic flags, cuDNN's
    benchmark flag, ``CUBLAS_WORKSPACE_CONFIG`` (removed again if it was unset) and the warning
    filters are what they were on entry.
    """
    saved = (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
        os.environ.get(CUBLAS_WORKSPACE),
    )
    try:
        with warnings.catch_warnings():
            for message in ignore_warnings:
                warnings.filterwarnings("ignore", message=message)
            if threads > 0:
                torch.set_num_threads(threads)
            if deterministic:
                os.environ.setdefault(CUBLAS_WORKSPACE, ":4096:8")
                torch.use_deterministic_algorithms(True, warn_only=torch.device(device).type == "cuda")
                torch.backends.cudnn.benchmark = False
            yield
    finally:
        threads_before, det, warn_only, benchmark, workspace = saved
        torch.set_num_threads(threads_before)
        torch.use_deterministic_algorithms(det, warn_only=warn_only)
        torch.backends.cudnn.benchmark = benchmark
        if workspace is None:
            os.environ.pop(CUBLAS_WORKSPACE, None)
        else:
            os.environ[CUBLAS_WORKSPACE] = workspace


def resolve_device(device: Optional[Union[str, torch.device]], local_rank: int = 0) -> torch.device:
    """The device to run on: ``device``, else ``cuda:<local_rank>`` when CUDA is available, else
    the CPU; a CUDA device without an index takes ``local_rank`` and becomes the current one."""
    if device is None:
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    return device


def distributed() -> tuple[int, int, int]:
    """``(rank, world, local_rank)``, initialising the process group under torchrun
    (``WORLD_SIZE`` > 1; NCCL on CUDA, Gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))


def rng_state() -> dict[str, Any]:
    """The random states of PyTorch (CPU and CUDA), NumPy and Python, in a form
    ``torch.load(weights_only=True)`` reads back (:func:`set_rng_state`)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the random states :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x):
    """Python's RNG state with its tuples restored (a checkpoint round trip may give lists)."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and PyTorch's global random generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
