"""Choosing an implementation of the grid attention gate.

Every backend computes :func:`~attention_gates.ops.reference.grid_attention_reference`, takes
``(x, g, weights: GateWeights, options: GateOptions)`` and says, for a given call, why it cannot
run it (:func:`not_supported_reasons`):

- ``"reference"``: eager PyTorch, every case.
- ``"compile"``: :func:`torch.compile` of the reference.
- ``"triton"``: fused Triton kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).
- ``"cpu"``: the gate as channel matrix products with a recomputing backward, for CPU tensors.
- ``"auto"``: a fused backend only where a measurement showed it ahead: the committed table of
  :mod:`attention_gates.ops.measured` names, per device kind, dtype, mode (eval or training),
  memory layout and context (eager or inside :func:`torch.compile`), the backend that beat both
  the reference and ``compile``; where it names none (or that backend cannot run the call), the
  reference.

Under ``torch.use_deterministic_algorithms(True)`` only implementations whose results are
reproducible run to run may run: an explicit request for a fused one that is not raises, and
``"auto"`` takes the first deterministic one of the table's winner, the reference and the fused
kernels. On CUDA the reference's backward is not deterministic (the adjoint of alpha's
resampling, ``upsample_*_backward``, adds with atomics, and PyTorch refuses it in that mode),
while the Triton kernels' backward is (fixed-order sums) unless ``g`` itself must be resampled
onto theta's grid.

Under :func:`torch.jit.trace`, :func:`torch.jit.script` and :func:`torch.export.export` (which
ONNX's dynamo exporter runs), ``"auto"`` takes the reference: plain PyTorch operations, which
they record and ONNX Runtime runs; never a Python autograd function (the ``cpu`` backend) nor a
custom op. An explicitly requested backend they cannot record raises. Inside plain
:func:`torch.compile` the table's ``"compiled"`` rows decide, as above.

The backend is chosen per call (``backend=``), per module (the ``backend=`` constructor
argument) or per thread, with :func:`use_backend` (each thread sees only its own) or, for the
process, the environment variable ``ATTENTION_GATES_BACKEND``, in that order of precedence. An
explicitly requested backend that cannot run raises :class:`BackendUnavailableError` listing its
reasons; only ``"auto"`` falls back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import os
import threading
import warnings
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

from . import cpu_gate, measured
from .layout import is_channels_last
from .reference import GateOptions, GateWeights, grid_attention_reference
from .support import BackendUnavailableError, dtype_reasons, fused_math_reasons, recorder, unavailable
from .triton.support import interpreting, shape_reasons

__all__ = [
    "BACKENDS", "Backend", "BackendUnavailableError", "get_backend", "use_backend", "not_supported_reasons", "select", "chosen",
    "measured_key", "registry",
]  # fmt: skip

BACKENDS = ("auto", "reference", "compile", "triton", "cpu")
ENV_VAR = "ATTENTION_GATES_BACKEND"
_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CPU_CAPABILITY = measured.host_capability()

Impl = Callable[[Tensor, Tensor, GateWeights, GateOptions], tuple[Tensor, Tensor]]
Check = Callable[[Tensor, Tensor, GateWeights, GateOptions], object]


class _Override(threading.local):
    """The :func:`use_backend` blocks around the running code, innermost last: each thread its own.

    A ``threading.local`` rather than a ``contextvars.ContextVar``: the gate's call reads it
    inside :func:`torch.compile`, whose tracer follows a ``threading.local`` (and recompiles when
    it changes) but cannot trace ``ContextVar.get``.
    """

    names: tuple[str, ...] = ()


_override = _Override()


def check_name(name: str) -> str:
    """``name`` if it is one of :data:`BACKENDS`, else a ``ValueError`` listing them."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def get_backend() -> str:
    """The default backend of this thread: its innermost :func:`use_backend`, else
    ``$ATTENTION_GATES_BACKEND``, else ``"auto"``."""
    if _override.names:
        return _override.names[-1]
    env = os.environ.get(ENV_VAR)
    if env:
        try:
            return check_name(env.strip())
        except ValueError as e:
            raise ValueError(f"${ENV_VAR}: {e}") from None
    return "auto"


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager setting the default backend of every gate call inside it, in this thread
    (other threads keep theirs).

    Example:
        >>> from attention_gates.ops import use_backend, get_backend
        >>> with use_backend("reference"):
        ...     get_backend()
        'reference'
    """
    outer = _override.names
    _override.names = (*outer, check_name(name))
    try:
        yield
    finally:
        _override.names = outer


_HAS_TRITON = importlib.util.find_spec("triton") is not None  # looked up once; does not import it


def _needs_grad(x: Tensor, g: Tensor, w: GateWeights) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, g, *w))


def _fused_reasons(x: Tensor, g: Tensor, w: GateWeights, opt: GateOptions, dtypes=_FUSED_DTYPES) -> list[str]:
    """Reasons shared by the fused backends (triton, cpu)."""
    return fused_math_reasons(w, opt) + dtype_reasons(x, g, w, dtypes)


def _triton_reasons(x: Tensor, g: Tensor, w: GateWeights, opt: GateOptions) -> list[str]:
    reasons = []
    if not _HAS_TRITON:
        reasons.append("Triton is not installed (pip install 'attention-gates[triton]')")
    if x.device.type == "cpu":
        if not interpreting():
            reasons.append("x is on the CPU: Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1)")
    elif x.device.type != "cuda":
        reasons.append(f"device {x.device.type!r}: Triton kernels need a CUDA tensor")
    # float64 (for gradcheck) only through the interpreter
    reasons += _fused_reasons(x, g, w, opt, dtypes=_FUSED_DTYPES + ((torch.float64,) if x.device.type == "cpu" else ()))
    if torch.are_deterministic_algorithms_enabled() and not _triton_deterministic(x, g, w, opt):
        reasons.append(
            "torch.use_deterministic_algorithms(True): g is resampled onto theta's grid by F.interpolate, "
            "whose CUDA backward adds with atomics (give g on theta's grid, x's size // the subsample factor)"
        )
    return reasons + shape_reasons(x, g, w.theta_weight)


def _cpu_reasons(x: Tensor, g: Tensor, w: GateWeights, opt: GateOptions) -> list[str]:
    reasons = []
    if x.device.type != "cpu":
        reasons.append(f"x is on {x.device}: the cpu backend runs on CPU tensors")
    return reasons + _fused_reasons(x, g, w, opt)


def _no_reasons(x: Tensor, g: Tensor, w: GateWeights, opt: GateOptions) -> list[str]:
    return []


def _resamples_g(x: Tensor, g: Tensor, w: GateWeights) -> bool:
    return tuple(g.shape[2:]) != tuple(s // k for s, k in zip(x.shape[2:], w.theta_weight.shape[2:]))


def _cuda_backward(x: Tensor, g: Tensor, w: GateWeights) -> bool:
    return x.device.type == "cuda" and _needs_grad(x, g, w)


def _reference_deterministic(x: Tensor, g: Tensor, w: GateWeights, opt: GateOptions) -> bool:
    """Whether the reference's results are reproducible: not with a CUDA backward through a resampling."""
    resamples = _resamples_g(x, g, w) or any(k > 1 for k in w.theta_weight.shape[2:])
    return not (_cuda_backward(x, g, w) and resamples)


def _triton_deterministic(x: Tensor, g: Tensor, w: GateWeights, opt: GateOptions) -> bool:
    """The kernels' sums run in a fixed order; only resampling ``g`` (F.interpolate) adds with atomics on CUDA."""
    return not (_cuda_backward(x, g, w) and _resamples_g(x, g, w))


def _always(x: Tensor, g: Tensor, w: GateWeights, opt: GateOptions) -> bool:
    return True


_compiled: dict[str, Impl] = {}


def _compiled_reference(x: Tensor, g: Tensor, w: GateWeights, opt: GateOptions) -> tuple[Tensor, Tensor]:
    if torch.compiler.is_compiling():  # already inside a compiled region (or export): trace the reference
        return grid_attention_reference(x, g, w, opt)
    if "fn" not in _compiled:
        _compiled["fn"] = torch.compile(grid_attention_reference, dynamic=False)
    return _compiled["fn"](x, g, w, opt)


def _triton_impl(x: Tensor, g: Tensor, w: GateWeights, opt: GateOptions) -> tuple[Tensor, Tensor]:
    from .triton.autograd import grid_attention_triton

    return grid_attention_triton(x, g, w, opt)


@dataclasses.dataclass(frozen=True)
class Backend:
    """One implementation of the gate, as the dispatcher knows it."""

    name: str
    reasons: Check
    """``(x, g, weights, options) -> list[str]``: why it cannot run a call (empty when it can)."""
    deterministic: Check
    """``(x, g, weights, options) -> bool``: whether its results for a call are reproducible run to run."""
    impl: Impl
    """``(x, g, weights, options) -> (out, alpha)``: the implementation."""
    recorders: frozenset = frozenset()
    """The :func:`~attention_gates.ops.support.recorder` names that can record it as a graph."""
    unrecordable: str = ""
    """Why the others cannot."""


_ALL_RECORDERS = frozenset({"torch.jit.trace", "torch.jit.script", "torch.export"})
_REGISTRY = {
    b.name: b
    for b in (
        Backend("reference", _no_reasons, _reference_deterministic, grid_attention_reference, _ALL_RECORDERS),
        Backend("compile", _no_reasons, _reference_deterministic, _compiled_reference, frozenset({"torch.export"}),
                "torch.compile cannot run inside TorchScript's tracing or scripting"),
        Backend("triton", _triton_reasons, _triton_deterministic, _triton_impl, frozenset({"torch.jit.trace", "torch.export"}),
                "its launcher is Python code that TorchScript's scripting cannot compile"),  # the custom op is recorded
        Backend("cpu", _cpu_reasons, _always, cpu_gate.grid_attention_cpu, frozenset(),
                "a Python autograd function, which tracing, scripting and export cannot record"),
    )
}  # fmt: skip


def registry() -> dict[str, Backend]:
    """Every implementation by name (all of :data:`BACKENDS` but ``"auto"``)."""
    return dict(_REGISTRY)


def not_supported_reasons(backend: str, x: Tensor, g: Tensor, w: GateWeights, opt: GateOptions) -> list[str]:
    """Why ``backend`` cannot run this call (an empty list when it can)."""
    if check_name(backend) == "auto":
        return []
    impl = _REGISTRY[backend]
    reasons = list(impl.reasons(x, g, w, opt))
    recording = recorder()
    if recording is not None and recording not in impl.recorders:
        reasons.append(f"{recording} is recording this call, and cannot record the {backend!r} backend: {impl.unrecordable} "
                       "(backend='auto' or 'reference' records the reference)")  # fmt: skip
    return reasons


def measured_key(x: Tensor, g: Tensor, w: GateWeights) -> measured.Key:
    """The row of :mod:`~attention_gates.ops.measured` that this call falls under."""
    if x.device.type == "cuda":
        props = torch.cuda.get_device_properties(x.device)
        capability = f"{props.major}.{props.minor}"
    else:
        capability = _CPU_CAPABILITY
    return measured.Key(
        device=x.device.type,
        capability=capability,
        dtype=str(x.dtype).replace("torch.", ""),
        mode="train" if _needs_grad(x, g, w) else "eval",
        layout="channels_last" if is_channels_last(x) else "contiguous",
        context="compiled" if torch.compiler.is_compiling() else "eager",
    )


@functools.lru_cache(maxsize=None)  # once per process and kind of GPU
def _warn_unmeasured(backend: str, device: str, capability: str) -> None:
    warnings.warn(
        f"backend {backend!r} on a {device} device of capability {capability}: no measurement of this kind of device is "
        f"in the table behind 'auto' (attention_gates/ops/measured.json), and the Triton kernels have not run on a GPU "
        f"since their rewrite. Check its results against backend='reference' on your shapes (docs: tutorials/backends), "
        f"and measure it with benchmarks/gpu_check.sh",
        stacklevel=4,
    )


def chosen(backend: Optional[str], x: Tensor, g: Tensor, w: GateWeights, opt: GateOptions) -> str:
    """The name of the backend that runs this call (see the module docstring for the rules).

    Raises :class:`BackendUnavailableError` when an explicitly requested backend cannot run it.
    Warns once per process when ``"triton"`` is requested, in eager execution, on a kind of GPU the
    table has no row of.
    """
    name = check_name(backend) if backend is not None else get_backend()
    if name == "auto":
        if recorder() is not None:
            return "reference"
        fused = measured.winner(measured_key(x, g, w))
        order = [fused, "reference"] if fused is not None else ["reference"]
        if torch.are_deterministic_algorithms_enabled():
            order = [b for b in [*order, "triton"] if _REGISTRY[b].deterministic(x, g, w, opt)] or ["reference"]
        return next((b for b in order if not not_supported_reasons(b, x, g, w, opt)), "reference")
    reasons = not_supported_reasons(name, x, g, w, opt)
    if reasons:
        raise unavailable(name, x, reasons)
    if name == "triton" and x.device.type == "cuda" and not torch.compiler.is_compiling():  # dynamo cannot trace warnings.warn
        key = measured_key(x, g, w)
        if not measured.has_rows(key.device, key.capability):
            _warn_unmeasured(name, key.device, key.capability)
    return name


def select(backend: Optional[str], x: Tensor, g: Tensor, w: GateWeights, opt: GateOptions) -> Impl:
    """The implementation that runs this call: that of :func:`chosen`."""
    return _REGISTRY[chosen(backend, x, g, w, opt)].impl
