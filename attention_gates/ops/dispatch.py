"""Choosing an implementation of the grid attention gate.

Every backend computes :func:`attention_gates.functional.grid_attention_reference` and
says, for a given call, why it cannot run (``not_supported_reasons``):

- ``"reference"``: eager PyTorch, every case.
- ``"compile"``: :func:`torch.compile` of the reference.
- ``"triton"``: fused Triton kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).
- ``"cpu"``: the gate as channel matrix products with a recomputing backward, for CPU tensors.
- ``"auto"``: triton on CUDA tensors, cpu on float32 CPU tensors when no gradient is needed
  (inference), when they support the call; else the reference.

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

from .. import functional as _functional

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "get_backend",
    "use_backend",
    "not_supported_reasons",
    "select",
    "chosen",
]

BACKENDS = ("auto", "reference", "compile", "triton", "cpu")
ENV_VAR = "ATTENTION_GATES_BACKEND"
_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_override: list[str] = []


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this call; the message lists every reason."""


def _check_name(name: str) -> str:
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
            return _check_name(env.strip())
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
    _override.append(_check_name(name))
    try:
        yield
    finally:
        _override.pop()


_HAS_TRITON = importlib.util.find_spec("triton") is not None  # looked up once; does not import it


def triton_available() -> bool:
    return _HAS_TRITON


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _fused_reasons(backend: str, x: Tensor, g: Tensor, *, W_weight, norm, training, sigma1, sigma2, weights, dtypes=_FUSED_DTYPES) -> list[str]:
    """Reasons shared by the fused backends (triton, cpu)."""
    reasons = []
    if sigma2 != "sigmoid":
        reasons.append(f"sigma2={sigma2!r}: only the paper's 'sigmoid' gate is fused (softmax needs a grid-wide reduction)")
    if W_weight is not None and norm not in ("batch", "none"):
        reasons.append(f"norm={norm!r}: only 'batch' or 'none' after W are fused")
    names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
    got = {x.dtype, g.dtype}
    if not got <= set(dtypes):
        reasons.append(f"dtype {sorted(map(str, got))}: supported are {names}")
    for t in weights:
        if t is not None and t.dtype not in dtypes:
            reasons.append(f"weight dtype {t.dtype}: supported are {names}")
            break
    return reasons


def _triton_reasons(x: Tensor, g: Tensor, **case) -> list[str]:
    reasons = []
    if not triton_available():
        reasons.append("Triton is not installed (pip install 'attention-gates[triton]')")
    if x.device.type == "cuda":
        pass
    elif x.device.type == "cpu":
        if not _interpreting():
            reasons.append("x is on the CPU: Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1)")
    else:
        reasons.append(f"device {x.device.type!r}: Triton kernels need a CUDA tensor")
    # float64 (for gradcheck) only through the interpreter
    dtypes = _FUSED_DTYPES + ((torch.float64,) if x.device.type == "cpu" else ())
    reasons += _fused_reasons("triton", x, g, dtypes=dtypes, **case)
    from .triton.support import shape_reasons

    reasons += shape_reasons(x, g, case["weights"][0])
    return reasons


def _cpu_reasons(x: Tensor, g: Tensor, **case) -> list[str]:
    reasons = []
    if x.device.type != "cpu":
        reasons.append(f"x is on {x.device}: the cpu backend runs on CPU tensors")
    reasons += _fused_reasons("cpu", x, g, **case)
    return reasons


def _reference_reasons(x: Tensor, g: Tensor, **case) -> list[str]:
    return []


_compiled: dict = {}


def _compiled_reference(*args, **kwargs):
    if torch.compiler.is_compiling():  # already inside a compiled region: trace the reference
        return _functional.grid_attention_reference(*args, **kwargs)
    fn = _compiled.get("fn")
    if fn is None:
        fn = _compiled["fn"] = torch.compile(_functional.grid_attention_reference, dynamic=False)
    return fn(*args, **kwargs)


def _triton_impl(*args, **kwargs):
    from .triton.autograd import grid_attention_triton

    return grid_attention_triton(*args, **kwargs)


def _cpu_impl(*args, **kwargs):
    from .cpu import grid_attention_cpu

    return grid_attention_cpu(*args, **kwargs)


_REGISTRY: dict[str, tuple[Callable[..., list[str]], Callable]] = {
    "reference": (_reference_reasons, _functional.grid_attention_reference),
    "compile": (_reference_reasons, _compiled_reference),
    "triton": (_triton_reasons, _triton_impl),
    "cpu": (_cpu_reasons, _cpu_impl),
}


def not_supported_reasons(backend: str, x: Tensor, g: Tensor, **case) -> list[str]:
    """Why ``backend`` cannot run this call (an empty list when it can)."""
    return _REGISTRY[_check_name(backend)][0](x, g, **case)


def _needs_grad(x: Tensor, g: Tensor, weights) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, g, *weights))


def _auto_order(x: Tensor, g: Tensor, weights) -> tuple[str, ...]:
    if x.device.type == "cuda":
        return ("triton", "reference")
    # cpu: faster than the reference for inference in float32 (1.6-2.6x on the paper's level-2 gate,
    # benchmarks/cpu_gate.py), not clearly for training (0.9-1.2x contiguous; channels-last 1.26x
    # with the default allocator, 0.97x with MALLOC_MMAP_MAX_=0); under torch.compile the compiler
    # fuses the reference (the cpu backend's backward calls torch.autograd.grad, which dynamo does not trace)
    if (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and not _needs_grad(x, g, weights)
        and not torch.compiler.is_compiling()
    ):
        return ("cpu", "reference")
    return ("reference",)


def chosen(backend: Optional[str], x: Tensor, g: Tensor, **case) -> str:
    """The name of the backend that runs this call (see the module docstring for the rules).

    Raises :class:`BackendUnavailableError` when an explicitly requested backend cannot run it.
    """
    name = _check_name(backend) if backend is not None else get_backend()
    if name == "auto":
        for candidate in _auto_order(x, g, case["weights"]):
            if not not_supported_reasons(candidate, x, g, **case):
                return candidate
        raise AssertionError("unreachable: the reference supports every call")
    reasons = not_supported_reasons(name, x, g, **case)
    if reasons:
        raise BackendUnavailableError(
            f"backend {name!r} cannot run this call (x: {list(x.shape)} {x.dtype} on {x.device}):\n  - "
            + "\n  - ".join(reasons)
        )
    return name


def select(backend: Optional[str], x: Tensor, g: Tensor, **case) -> Callable:
    """The implementation that runs this call: that of :func:`chosen`."""
    return _REGISTRY[chosen(backend, x, g, **case)][1]
