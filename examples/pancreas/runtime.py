"""The process a run trains in: its device, its process group under ``torchrun``, its random
state, the process-wide settings a run changes (and gives back), the stop signals it answers,
and whether the gates' backend can run on the device.

PyTorch keeps some settings per process (the CPU thread count, deterministic algorithms,
cuDNN's benchmark mode, the ``CUBLAS_WORKSPACE_CONFIG`` variable) and Python keeps the warning
filters and signal handlers per process: :func:`process_settings` and :func:`stop_signals` set
what a run asks for and restore every one of them on exit, also when the run raises.
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
import signal
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "process_settings",
    "StopRequest",
    "stop_signals",
    "ignore_stop_signals",
    "forwarded_stop_signals",
    "STOP_SIGNALS",
    "backend_problem",
    "resolve_device",
    "distributed",
    "rng_state",
    "set_rng_state",
    "seed_everything",
]

#: The signals that ask a run to stop after the step in progress: Ctrl-C, and a scheduler's or ``kill``'s SIGTERM.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

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


class StopRequest:
    """What :func:`stop_signals` received: ``signum``, the first stop signal's number (0: none yet)."""

    def __init__(self) -> None:
        self.signum = 0

    def __bool__(self) -> bool:
        return self.signum != 0


@contextlib.contextmanager
def stop_signals(signals: Sequence[int] = STOP_SIGNALS) -> Iterator[StopRequest]:
    """Context manager: inside, the first of ``signals`` does not stop the process but is
    recorded in the yielded :class:`StopRequest`, for the caller to stop at a safe point; a
    second one is handled as it would have been without this (Ctrl-C raises
    ``KeyboardInterrupt``, SIGTERM ends the process). A signal the process ignores (``nohup``,
    a shell's background job) stays ignored. The previous handlers are restored on exit.
    Handlers can be set in the main thread only: in another thread nothing is installed."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {s: signal.getsignal(s) for s in signals if signal.getsignal(s) is not signal.SIG_IGN}

    def restore() -> None:
        for s, handler in previous.items():
            signal.signal(s, handler)

    def handler(signum: int, frame: Any) -> None:
        if not request:
            request.signum = signum
            return
        restore()  # a second signal: what it would have done without us
        before = previous[signum]
        if callable(before):
            before(signum, frame)
        else:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)

    for s in previous:
        signal.signal(s, handler)
    try:
        yield request
    finally:
        restore()


@contextlib.contextmanager
def forwarded_stop_signals(process: Any, signals: Sequence[int] = STOP_SIGNALS) -> Iterator[list[int]]:
    """Context manager for a process waiting on a child that trains: inside, each of ``signals``
    that reaches this process is sent on to ``process`` (a ``multiprocessing.Process``, which
    stops as :func:`stop_signals` says: the first signal after its step, a second at once) and
    appended to the yielded list. The child should run in a process group of its own, so that a
    terminal's Ctrl-C reaches it once, through here. Signals this process ignores stay ignored;
    the previous handlers are restored on exit; in another thread than the main one nothing is
    installed."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {s: signal.getsignal(s) for s in signals if signal.getsignal(s) is not signal.SIG_IGN}

    def forward(signum: int, frame: Any) -> None:
        received.append(signum)
        if process.pid is not None and process.exitcode is None:
            os.kill(process.pid, signum)

    for s in previous:
        signal.signal(s, forward)
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def ignore_stop_signals(*_: Any) -> None:
    """Ignore :data:`STOP_SIGNALS` in this process (a data-loading worker: the training process
    stops it when the run stops, after the step in progress). Takes and ignores a
    ``worker_init_fn``'s worker id."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def backend_problem(model: nn.Module, device: Union[str, torch.device], training: bool) -> Optional[str]:
    """Why the gates of ``model`` cannot run with the backend they were given on ``device``
    (the library's reasons, ``"; "``-joined), or ``None`` when they can.

    Each gate (:class:`attention_gates.GridAttentionGate`) with an explicit backend is called
    once, a copy of it on ``device`` in training or evaluation mode, on a tiny input of its
    channels (``x`` of twice its subsample factor per axis, ``g`` on theta's grid); the
    library raises :class:`attention_gates.BackendUnavailableError` listing its reasons. Run
    it under the run's settings (deterministic algorithms change what can run). ``"auto"``
    always runs (it falls back), and ``"compile"`` runs wherever the reference does: neither
    is called (a call would compile)."""
    from attention_gates import BackendUnavailableError, GridAttentionGate

    device = torch.device(device)
    for gate in model.modules():
        if not isinstance(gate, GridAttentionGate) or gate.backend in (None, "auto", "compile"):
            continue
        probe = copy.deepcopy(gate).to(device).train(training)
        x = torch.randn(1, probe.in_channels, *(2 * k for k in probe.subsample_factor), device=device, requires_grad=training)
        g = torch.randn(1, probe.gating_channels, *(2,) * len(probe.subsample_factor), device=device)
        try:
            with torch.set_grad_enabled(training):
                probe(x, g)
        except BackendUnavailableError as e:
            reasons = [line.strip()[2:] for line in str(e).splitlines() if line.strip().startswith("- ")]
            return "; ".join(reasons) if reasons else " ".join(str(e).split())
    return None


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
