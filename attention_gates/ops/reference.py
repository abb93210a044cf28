"""The grid attention gate's reference math, its argument types and its input checks.

Oktay et al. (2018), eqs. 1-2, for a skip connection ``x`` (``F_l`` channels) and a
coarser gating signal ``g`` (``F_g`` channels), with ``F_int`` intermediate channels::

    q_att = psi^T sigma1(W_x^T x_i + W_g^T g_i + b_g) + b_psi        (1)
    alpha = sigma2(q_att)                                             (2)

and the gate's output ``x_hat = alpha * x``. As in the authors' code (whose parameter
names we keep), the gate is a *grid* gate:

=================  ======================  ==================================================
paper              :class:`GateWeights`    computed as
=================  ======================  ==================================================
``W_x``            ``theta_weight``        conv, kernel = stride = subsample factor, no bias:
                                           ``x`` -> ``F_int`` channels on g's (coarse) grid
``W_g``, ``b_g``   ``phi_weight/bias``     1x1 conv of ``g``, resized to theta's grid
``sigma1``         (option ``sigma1``)     ``"relu"`` (paper) or ``"softplus"``
``psi, b_psi``     ``psi_weight/bias``     1x1 conv ``F_int`` -> 1
``sigma2``         (option ``sigma2``)     ``"sigmoid"`` (paper) or ``"softmax"`` (spatial)
(resampling)       (``align_corners``)     alpha (bi/tri)linearly resampled onto x's grid
(output ``W``)     ``W_weight/bias`` +     1x1 conv + normalisation of ``alpha * x``
                   ``norm_*``              (skipped when ``W_weight`` is ``None``)
=================  ======================  ==================================================

Every implementation of the gate takes ``(x, g, weights: GateWeights, options: GateOptions)``
and returns ``(out, alpha)``; :func:`grid_attention_reference` is the eager PyTorch one that
every faster implementation is tested against. :func:`attention_gates.functional.grid_attention`
is the public entry point: it checks the inputs (:func:`check_gate_inputs`) and runs the chosen
implementation.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "GateWeights",
    "GateOptions",
    "grid_attention_reference",
    "check_gate_inputs",
    "input_check",
    "resample",
    "update_running_stats",
]

SIGMA1 = ("relu", "softplus")
SIGMA2 = ("sigmoid", "softmax")
NORMS = ("batch", "instance", "group", "none")
_SHAPE_SOURCE = {  # what fixes each weight's shape, for error messages (the rest follow x's channels)
    "phi_weight": "g's channels and theta's F_int",
    "phi_bias": "theta's F_int",
    "psi_weight": "theta's F_int",
    "psi_bias": "psi's one output channel",
}


class GateWeights(NamedTuple):
    """The gate's tensors, in the authors' names (``d`` spatial dims, ``k`` the subsample factor).

    ``W_weight=None`` leaves out the output transform (the gate returns ``alpha * x``); the
    norm's affine parameters and running statistics are ``None`` where the norm has none.
    """

    theta_weight: Tensor  #: ``W_x``, ``Tensor[F_int, F_l, *k]`` (kernel = stride = ``k``)
    phi_weight: Tensor  #: ``W_g``, ``Tensor[F_int, F_g, 1, ...]``
    phi_bias: Optional[Tensor]  #: ``b_g``, ``Tensor[F_int]``
    psi_weight: Tensor  #: ``psi``, ``Tensor[1, F_int, 1, ...]``
    psi_bias: Optional[Tensor]  #: ``b_psi``, ``Tensor[1]``
    W_weight: Optional[Tensor] = None  #: the output transform's 1x1 conv, ``Tensor[F_l, F_l, 1, ...]``
    W_bias: Optional[Tensor] = None  #: its bias, ``Tensor[F_l]``
    norm_weight: Optional[Tensor] = None  #: the output norm's scale, ``Tensor[F_l]``
    norm_bias: Optional[Tensor] = None  #: the output norm's shift, ``Tensor[F_l]``
    running_mean: Optional[Tensor] = None  #: batch norm's running mean, ``Tensor[F_l]`` (updated in place)
    running_var: Optional[Tensor] = None  #: batch norm's running variance, ``Tensor[F_l]`` (updated in place)


@dataclasses.dataclass(frozen=True)
class GateOptions:
    """How the gate computes (everything that is not a tensor).

    Attributes:
        norm: the output transform's normalisation, ``"batch"``, ``"instance"``, ``"group"`` or ``"none"``.
        num_groups: groups for ``norm="group"``.
        training: batch statistics (and the running statistics' update) instead of running ones.
        momentum, eps: as :func:`torch.nn.functional.batch_norm`.
        sigma1: ``"relu"`` (the paper's) or ``"softplus"``.
        sigma2: ``"sigmoid"`` (the paper's) or ``"softmax"`` (over all positions of a sample).
        align_corners: for the linear resampling of ``phi(g)`` and ``alpha``; ``True`` matches
            checkpoints trained with PyTorch < 0.4.
    """

    norm: str = "batch"
    num_groups: int = 1
    training: bool = False
    momentum: float = 0.1
    eps: float = 1e-5
    sigma1: str = "relu"
    sigma2: str = "sigmoid"
    align_corners: bool = False

    def __post_init__(self) -> None:
        for name, allowed in (("sigma1", SIGMA1), ("sigma2", SIGMA2), ("norm", NORMS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")


def resample(t: Tensor, size, align_corners: bool = False) -> Tensor:
    """(Bi/tri)linear resampling of ``Tensor[N, C, *S]`` onto spatial ``size`` (1D, 2D or 3D).

    Returns ``t`` itself when the size already matches, except under :func:`torch.jit.trace` and
    :func:`torch.export.export`, which would record that comparison as fixed (the graph would then
    skip the resampling at every size, or take only the sizes of the example): there ``t`` is always
    resampled, the identity at the same size. ``size`` is taken as it comes (no ``int()``): the
    sizes of another tensor stay symbolic under export and traced under tracing, so that a
    recorded gate runs at other sizes.
    """
    size = tuple(size)
    recording = torch.jit.is_tracing() or torch.compiler.is_exporting()
    if not recording and tuple(t.shape[2:]) == size:
        return t
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[t.dim() - 2]
    return F.interpolate(t, size=size, mode=mode, align_corners=align_corners)


def _sigma1(t: Tensor, kind: str) -> Tensor:
    return F.relu(t) if kind == "relu" else F.softplus(t)


def _sigma2(q: Tensor, kind: str) -> Tensor:
    if kind == "sigmoid":
        return torch.sigmoid(q)
    # spatial softmax over every position of each sample, as the authors' residual mode
    return torch.softmax(q.flatten(2), dim=2).view_as(q)


def _normalize(y: Tensor, w: GateWeights, opt: GateOptions) -> Tensor:
    if opt.norm == "batch":
        return F.batch_norm(
            y, w.running_mean, w.running_var, w.norm_weight, w.norm_bias, opt.training, opt.momentum, opt.eps
        )
    if opt.norm == "instance":
        return F.instance_norm(y, None, None, w.norm_weight, w.norm_bias, True, opt.momentum, opt.eps)
    if opt.norm == "group":
        return F.group_norm(y, opt.num_groups, w.norm_weight, w.norm_bias, opt.eps)
    return y


def grid_attention_reference(x: Tensor, g: Tensor, w: GateWeights, opt: GateOptions = GateOptions()) -> tuple[Tensor, Tensor]:
    """The gate in eager PyTorch, line by line the paper's equations; inputs unchecked.

    ``x = Tensor[N, F_l, *S]``, ``g = Tensor[N, F_g, *S_g]``; returns ``(out: Tensor[N, F_l, *S],
    alpha: Tensor[N, 1, *S])``. Updates ``w.running_mean``/``w.running_var`` in place when
    ``opt.training`` and ``opt.norm="batch"``, as :func:`torch.nn.functional.batch_norm` does.
    """
    convNd = (F.conv1d, F.conv2d, F.conv3d)[x.dim() - 3]
    k = tuple(w.theta_weight.shape[2:])
    theta_x = convNd(x, w.theta_weight, None, stride=k)  # W_x^T x on the coarse grid
    phi_g = resample(convNd(g, w.phi_weight, w.phi_bias), theta_x.shape[2:], opt.align_corners)  # W_g^T g + b_g
    f = _sigma1(theta_x + phi_g, opt.sigma1)  # sigma1(...)
    q_att = convNd(f, w.psi_weight, w.psi_bias)  # eq. 1
    alpha = resample(_sigma2(q_att, opt.sigma2), x.shape[2:], opt.align_corners)  # eq. 2, on x's grid
    y = alpha * x
    if w.W_weight is not None:
        y = _normalize(convNd(y, w.W_weight, w.W_bias), w, opt)
    return y, alpha


def update_running_stats(w: GateWeights, mean: Tensor, var: Tensor, count: int, momentum: float) -> None:
    """Move ``w``'s running statistics towards a batch's, in place, as :func:`torch.nn.functional.batch_norm` does.

    ``mean`` and ``var`` are the batch's per-channel mean and biased variance over ``count``
    values; the running variance follows the unbiased one (``var * count / (count - 1)``).
    Nothing happens when ``w`` has no running statistics. For the fused implementations, whose
    forward computes the statistics itself.
    """
    if w.running_mean is None:
        return
    with torch.no_grad():
        unbiased = var * (count / max(count - 1, 1))
        w.running_mean.mul_(1 - momentum).add_(mean.to(w.running_mean.dtype), alpha=momentum)
        w.running_var.mul_(1 - momentum).add_(unbiased.to(w.running_var.dtype), alpha=momentum)


def _desc(t: Tensor) -> str:
    return f"Tensor{list(t.shape)} ({t.dtype}, {t.device})"


def _check_tensor(name: str, t, optional: bool = False) -> None:
    if t is None:
        if optional:
            return
        raise ValueError(f"{name} is required, got None")
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{' or None' if optional else ''}, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {_desc(t)}")


def _check_dtypes(x: Tensor, g: Tensor, w: GateWeights) -> None:
    """Every tensor in x's dtype, outside autocast (which casts the convolutions' operands itself)."""
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return
    named = {"g": g, **{name: t for name, t in zip(GateWeights._fields, w) if t is not None}}
    other = {name: t.dtype for name, t in named.items() if t.dtype != x.dtype}
    if other:
        got = ", ".join(f"{name} {dtype}" for name, dtype in other.items())
        raise TypeError(
            f"the gate computes in x's dtype {x.dtype}: g and every weight must have it too (outside torch.autocast), "
            f"got {got}; convert the module (.to({x.dtype})) or the inputs"
        )


def input_check(check: Callable[..., None]) -> Callable[..., None]:
    """Decorate an input check (which compares sizes in Python) to run without the tracer's warnings.

    Under :func:`torch.jit.trace` sizes are traced values: a check of them holds for the example
    and is not recorded in the graph, which is what an input check is for, so the
    ``TracerWarning`` each comparison raises says nothing to the user. Outside tracing it is the
    check itself.
    """

    @functools.wraps(check)
    def run(*args, **kwargs):
        if not torch.jit.is_tracing():
            return check(*args, **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return check(*args, **kwargs)

    return run


@input_check
def check_gate_inputs(x: Tensor, g: Tensor, w: GateWeights, opt: GateOptions = GateOptions()) -> None:
    """Raise a ``TypeError``/``ValueError`` naming the argument, what was expected and what came.

    Besides each tensor's type, shape and device: ``g`` and every weight in ``x``'s dtype (a
    ``TypeError`` naming those that differ), except under :func:`torch.autocast` for x's device.
    """
    for name, t in (("x", x), ("g", g)):
        _check_tensor(name, t)
        if t.dim() not in (3, 4, 5):
            raise ValueError(
                f"{name} must be Tensor[N, C, *spatial] with 1, 2 or 3 spatial dims (3, 4 or 5 dims in all), "
                f"got {t.dim()} dims: {_desc(t)}"
            )
    if g.dim() != x.dim():
        raise ValueError(f"x and g must have the same number of spatial dims, got x {_desc(x)} and g {_desc(g)}")
    if g.shape[0] != x.shape[0]:
        raise ValueError(f"x and g must have the same batch size, got x {_desc(x)} and g {_desc(g)}")
    if g.device != x.device:
        raise ValueError(f"x is on {x.device} but g is on {g.device}: all tensors must share a device")
    d = x.dim() - 2
    c_l, c_g = x.shape[1], g.shape[1]
    _check_tensor("theta_weight", w.theta_weight)
    if w.theta_weight.dim() != x.dim():
        raise ValueError(
            f"theta_weight must be Tensor[F_int, F_l, *subsample_factor] with {d} kernel dims for "
            f"{d}D inputs, got {list(w.theta_weight.shape)}"
        )
    c_int = w.theta_weight.shape[0]
    k = tuple(w.theta_weight.shape[2:])
    expected = {
        "theta_weight": (c_int, c_l) + k,
        "phi_weight": (c_int, c_g) + (1,) * d,
        "phi_bias": (c_int,),
        "psi_weight": (1, c_int) + (1,) * d,
        "psi_bias": (1,),
    }
    if w.W_weight is not None:
        expected["W_weight"] = (c_l, c_l) + (1,) * d
        expected["W_bias"] = (c_l,)
        if opt.norm != "none":
            expected.update(norm_weight=(c_l,), norm_bias=(c_l,))
        if opt.norm == "batch":
            expected.update(running_mean=(c_l,), running_var=(c_l,))
    required = ("theta_weight", "phi_weight", "psi_weight", "W_weight")  # biases, affine parameters, statistics: optional
    for name, shape in expected.items():
        t = getattr(w, name)
        _check_tensor(name, t, optional=name not in required)
        if t is None:
            continue
        if tuple(t.shape) != shape:
            what = _SHAPE_SOURCE.get(name, "x's channels")
            raise ValueError(
                f"{name} must have shape {list(shape)} to match {what} (x: {_desc(x)}, g: {_desc(g)}), "
                f"got {list(t.shape)}"
            )
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: all tensors must share a device")
    for axis, (size, kk) in enumerate(zip(x.shape[2:], k)):
        if kk < 1 or size < kk:
            raise ValueError(
                f"theta_weight's kernel size (the subsample factor) {k} does not fit x's spatial size "
                f"{list(x.shape[2:])}: axis {axis} has {size} < {kk} voxels"
            )
    _check_dtypes(x, g, w)
    if w.W_weight is None:
        return
    if opt.norm == "batch" and opt.training and x.shape[0] * math.prod(x.shape[2:]) < 2:
        raise ValueError(f"batch normalisation in training needs more than one value per channel, got x {_desc(x)}")
    if opt.norm == "batch" and not opt.training and (w.running_mean is None or w.running_var is None):
        raise ValueError("running_mean and running_var are required for norm='batch' when training=False, got None")
    if opt.norm == "group" and c_l % opt.num_groups:
        raise ValueError(f"num_groups={opt.num_groups} must divide x's {c_l} channels")
