"""What the gate's implementations support: the limits the fused ones share, what records a call
(tracing, scripting, export), and the error an explicitly requested implementation raises when it
cannot run a call."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .reference import GateOptions, GateWeights

__all__ = ["BackendUnavailableError", "unavailable", "fused_math_reasons", "dtype_reasons", "recorder"]


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this call; the message lists every reason."""


def unavailable(name: str, x: Tensor, reasons: Sequence[str]) -> BackendUnavailableError:
    """The error for backend ``name`` that cannot run a call on ``x`` for ``reasons``."""
    return BackendUnavailableError(
        f"backend {name!r} cannot run this call (x: {list(x.shape)} {x.dtype} on {x.device}):\n  - " + "\n  - ".join(reasons)
    )


def fused_math_reasons(w: GateWeights, opt: GateOptions) -> list[str]:
    """The parts of the gate no fused implementation computes (the reference computes them all)."""
    reasons = []
    if opt.sigma2 != "sigmoid":
        reasons.append(f"sigma2={opt.sigma2!r}: only the paper's 'sigmoid' gate is fused (softmax needs a grid-wide reduction)")
    if w.W_weight is not None and opt.norm not in ("batch", "none"):
        reasons.append(f"norm={opt.norm!r}: only 'batch' or 'none' after W are fused")
    return reasons


def dtype_reasons(x: Tensor, g: Tensor, w: GateWeights, dtypes: Sequence[torch.dtype]) -> list[str]:
    """Why the dtypes of ``x``, ``g`` or a weight are not among ``dtypes``."""
    reasons = []
    names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
    got = {x.dtype, g.dtype}
    if not got <= set(dtypes):
        reasons.append(f"dtype {sorted(map(str, got))}: supported are {names}")
    bad = next((t.dtype for t in w if t is not None and t.dtype not in dtypes), None)
    if bad is not None:
        reasons.append(f"weight dtype {bad}: supported are {names}")
    return reasons


def recorder() -> Optional[str]:
    """What is recording the running code as a graph, or ``None`` in eager execution:
    ``"torch.jit.script"``, ``"torch.jit.trace"`` or ``"torch.export"`` (which ONNX's dynamo
    exporter runs too). :func:`torch.compile` alone is not a recorder here: it runs what it traces."""
    if torch.jit.is_scripting():
        return "torch.jit.script"
    if torch.jit.is_tracing():
        return "torch.jit.trace"
    if torch.compiler.is_exporting():
        return "torch.export"
    return None
