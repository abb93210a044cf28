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

The backend is chosen per call (``backend=``), per module (the ``backend=`` constructor
argument) or globally, with :func:`use_backend` or the environment variable
``ATTENTION_GATES_BACKEND``, in that order of precedence. An explicitly requested backend
that cannot run raises :class:`BackendUnavailableError` listing its reasons; only ``"auto"``
falls back.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

from . import measured
from .reference import GateOptions, GateWeights, grid_attention_reference
from .triton.support import interpreting, shape_reasons

__all__ = ["BACKENDS", "BackendUnavailableError", "get_backend", "use_backend", "not_supported_reasons", "select", "chosen", "measured_key"]

BACKENDS = ("auto", "reference", "compile", "triton", "cpu")
ENV_VAR = "ATTENTION_GATES_BACKEND"
_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CPU_CAPABILITY = measured.host_capability()
_override: list[str] = []

Impl = Callable[[Tensor, Tensor, GateWeights, GateOptions], tuple[Tensor, Tensor]]


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this call; the message lists every reason."""


def check_name(name: str) -> str:
    """``name`` if it is one of :data:`BACKENDS`, else a ``ValueError`` listing them."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def get_backend() -> str:
    """The global default backend: the innermost :func:`use_backend`, else ``$ATTENTION_GATES_BACKEND``, else ``"auto"``."""
    if _override:
        return _override[-1]
    env = os.environ.get(ENV_VAR)
    if env:
        try:
            return check_name(env.strip())
        except ValueError as e:
            raise ValueError(f"${ENV_VAR}: {e}") from None
    return "auto"


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager setting the default backend of every gate call inside it.

    Example:
        >>> from attention_gates.ops import use_backend, get_backend
        >>> with use_backend("reference"):
        ...     get_backend()
        'reference'
    """
    _override.append(check_name(name))
    try:
        yield
    finally:
        _override.pop()


_HAS_TRITON = importlib.util.find_spec("triton") is not None  # looked up once; does not import it


def _needs_grad(x: Tensor, g: Tensor, w: GateWeights) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, g, *w))


def _fused_reasons(x: Tensor, g: Tensor, w: GateWeights, opt: GateOptions, dtypes=_FUSED_DTYPES) -> list[str]:
    """Reasons shared by the fused backends (triton, cpu)."""
    reasons = []
    if opt.sigma2 != "sigmoid":
        reasons.append(f"sigma2={opt.sigma2!r}: only the paper's 'sigmoid' gate is fused (softmax needs a grid-wide reduction)")
    if w.W_weight is not None and opt.norm not in ("batch", "none"):
        reasons.append(f"norm={opt.norm!r}: only 'batch' or 'none' after W are fused")
    names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
    got = {x.dtype, g.dtype}
    if not got <= set(dtypes):
        reasons.append(f"dtype {sorted(map(str, got))}: supported are {names}")
    bad = next((t.dtype for t in w if t is not None and t.dtype not in dtypes), None)
    if bad is not None:
        reasons.append(f"weight dtype {bad}: supported are {names}")
    return reasons


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
    if torch.compiler.is_compiling():  # already inside a compiled region: trace the reference
        return grid_attention_reference(x, g, w, opt)
    if "fn" not in _compiled:
        _compiled["fn"] = torch.compile(grid_attention_reference, dynamic=False)
    return _compiled["fn"](x, g, w, opt)


def _triton_impl(x: Tensor, g: Tensor, w: GateWeights, opt: GateOptions) -> tuple[Tensor, Tensor]:
    from .triton.autograd import grid_attention_triton

    return grid_attention_triton(x, g, w, opt)


def _cpu_impl(x: Tensor, g: Tensor, w: GateWeights, opt: GateOptions) -> tuple[Tensor, Tensor]:
    from .cpu import grid_attention_cpu

    return grid_attention_cpu(x, g, w, opt)


Check = Callable[[Tensor, Tensor, GateWeights, GateOptions], object]
# name -> (why it cannot run the call, whether its results are reproducible run to run, the implementation)
_REGISTRY: dict[str, tuple[Check, Check, Impl]] = {
    "reference": (_no_reasons, _reference_deterministic, grid_attention_reference),
    "compile": (_no_reasons, _reference_deterministic, _compiled_reference),
    "triton": (_triton_reasons, _triton_deterministic, _triton_impl),
    "cpu": (_cpu_reasons, _always, _cpu_impl),
}


def not_supported_reasons(backend: str, x: Tensor, g: Tensor, w: GateWeights, opt: GateOptions) -> list[str]:
    """Why ``backend`` cannot run this call (an empty list when it can)."""
    if check_name(backend) == "auto":
        return []
    return _REGISTRY[backend][0](x, g, w, opt)


def _layout(x: Tensor) -> str:
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    channels_last = fmt is not None and not x.is_contiguous() and x.is_contiguous(memory_format=fmt)
    return "channels_last" if channels_last else "contiguous"


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
        layout=_layout(x),
        context="compiled" if torch.compiler.is_compiling() else "eager",
    )


def chosen(backend: Optional[str], x: Tensor, g: Tensor, w: GateWeights, opt: GateOptions) -> str:
    """The name of the backend that runs this call (see the module docstring for the rules).

    Raises :class:`BackendUnavailableError` when an explicitly requested backend cannot run it.
    """
    name = check_name(backend) if backend is not None else get_backend()
    if name == "auto":
        fused = measured.winner(measured_key(x, g, w))
        order = [fused, "reference"] if fused is not None else ["reference"]
        if torch.are_deterministic_algorithms_enabled():
            order = [b for b in [*order, "triton"] if _REGISTRY[b][1](x, g, w, opt)] or ["reference"]
        return next((b for b in order if not not_supported_reasons(b, x, g, w, opt)), "reference")
    reasons = not_supported_reasons(name, x, g, w, opt)
    if reasons:
        raise BackendUnavailableError(
            f"backend {name!r} cannot run this call (x: {list(x.shape)} {x.dtype} on {x.device}):\n  - "
            + "\n  - ".join(reasons)
        )
    return name


def select(backend: Optional[str], x: Tensor, g: Tensor, w: GateWeights, opt: GateOptions) -> Impl:
    """The implementation that runs this call: that of :func:`chosen`."""
    return _REGISTRY[chosen(backend, x, g, w, opt)][2]
