"""The grid attention gate as one function: the reference math.

Oktay et al. (2018), eqs. 1-2, for a skip connection ``x`` (``F_l`` channels) and a
coarser gating signal ``g`` (``F_g`` channels), with ``F_int`` intermediate channels::

    q_att = psi^T sigma1(W_x^T x_i + W_g^T g_i + b_g) + b_psi        (1)
    alpha = sigma2(q_att)                                             (2)

and the gate's output ``x_hat = alpha * x``. As in the authors' code (whose parameter
names we keep), the gate is a *grid* gate:

=================  ======================  ==================================================
paper              argument                computed as
=================  ======================  ==================================================
``W_x``            ``theta_weight``        conv, kernel = stride = subsample factor, no bias:
                                           ``x`` -> ``F_int`` channels on g's (coarse) grid
``W_g``, ``b_g``   ``phi_weight/bias``     1x1 conv of ``g``, resized to theta's grid
``sigma1``         ``sigma1``              ``"relu"`` (paper) or ``"softplus"``
``psi, b_psi``     ``psi_weight/bias``     1x1 conv ``F_int`` -> 1
``sigma2``         ``sigma2``              ``"sigmoid"`` (paper) or ``"softmax"`` (spatial)
(resampling)       ``align_corners``       alpha (bi/tri)linearly resampled onto x's grid
(output ``W``)     ``W_weight/bias`` +     1x1 conv + normalisation of ``alpha * x``
                   ``norm_*``              (skipped when ``W_weight`` is ``None``)
=================  ======================  ==================================================

:func:`grid_attention` checks its inputs and runs the chosen backend;
:func:`grid_attention_reference` is the eager PyTorch implementation that every faster
backend is tested against.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["grid_attention", "grid_attention_reference", "check_gate_inputs", "resample"]

SIGMA1 = ("relu", "softplus")
SIGMA2 = ("sigmoid", "softmax")
NORMS = ("batch", "instance", "group", "none")
_SHAPE_SOURCE = {  # what fixes each weight's shape, for error messages (the rest follow x's channels)
    "phi_weight": "g's channels and theta's F_int",
    "phi_bias": "theta's F_int",
    "psi_weight": "theta's F_int",
    "psi_bias": "psi's one output channel",
}


def resample(t: Tensor, size, align_corners: bool = False) -> Tensor:
    """(Bi/tri)linear resampling of ``Tensor[N, C, *S]`` onto spatial ``size`` (1D, 2D or 3D).

    Returns ``t`` itself when the size already matches.
    """
    size = tuple(int(s) for s in size)
    if tuple(t.shape[2:]) == size:
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


def _normalize(
    y: Tensor,
    norm: str,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    training: bool,
    momentum: float,
    eps: float,
    num_groups: int,
) -> Tensor:
    if norm == "batch":
        return F.batch_norm(y, running_mean, running_var, weight, bias, training, momentum, eps)
    if norm == "instance":
        return F.instance_norm(y, None, None, weight, bias, True, momentum, eps)
    if norm == "group":
        return F.group_norm(y, num_groups, weight, bias, eps)
    return y


def grid_attention_reference(
    x: Tensor,
    g: Tensor,
    theta_weight: Tensor,
    phi_weight: Tensor,
    phi_bias: Tensor,
    psi_weight: Tensor,
    psi_bias: Tensor,
    W_weight: Optional[Tensor] = None,
    W_bias: Optional[Tensor] = None,
    norm_weight: Optional[Tensor] = None,
    norm_bias: Optional[Tensor] = None,
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    *,
    norm: str = "batch",
    num_groups: int = 1,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    sigma1: str = "relu",
    sigma2: str = "sigmoid",
    align_corners: bool = False,
) -> tuple[Tensor, Tensor]:
    """Eager PyTorch grid attention gate; arguments as :func:`grid_attention`, unchecked.

    Updates ``running_mean``/``running_var`` in place when ``training`` and ``norm="batch"``,
    as :func:`torch.nn.functional.batch_norm` does.
    """
    convNd = (F.conv1d, F.conv2d, F.conv3d)[x.dim() - 3]
    k = tuple(theta_weight.shape[2:])
    theta_x = convNd(x, theta_weight, None, stride=k)  # W_x^T x on the coarse grid
    phi_g = resample(convNd(g, phi_weight, phi_bias), theta_x.shape[2:], align_corners)  # W_g^T g + b_g
    f = _sigma1(theta_x + phi_g, sigma1)  # sigma1(...)
    q_att = convNd(f, psi_weight, psi_bias)  # eq. 1
    alpha = resample(_sigma2(q_att, sigma2), x.shape[2:], align_corners)  # eq. 2, on x's grid
    y = alpha * x
    if W_weight is not None:
        y = convNd(y, W_weight, W_bias)
        y = _normalize(
            y, norm, norm_weight, norm_bias, running_mean, running_var, training, momentum, eps, num_groups
        )
    return y, alpha


def _desc(t: Tensor) -> str:
    return f"Tensor{list(t.shape)} ({t.dtype}, {t.device})"


def check_gate_inputs(
    x: Tensor,
    g: Tensor,
    theta_weight: Tensor,
    phi_weight: Tensor,
    phi_bias: Optional[Tensor],
    psi_weight: Tensor,
    psi_bias: Optional[Tensor],
    W_weight: Optional[Tensor] = None,
    W_bias: Optional[Tensor] = None,
    norm_weight: Optional[Tensor] = None,
    norm_bias: Optional[Tensor] = None,
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    *,
    norm: str = "batch",
    num_groups: int = 1,
    training: bool = False,
    sigma1: str = "relu",
    sigma2: str = "sigmoid",
) -> None:
    """Raise a ``TypeError``/``ValueError`` naming the argument, what was expected and what came."""
    for name, t in (("x", x), ("g", g)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {_desc(t)}")
        if t.dim() not in (3, 4, 5):
            raise ValueError(
                f"{name} must be Tensor[N, C, *spatial] with 1, 2 or 3 spatial dims (3, 4 or 5 dims in all), "
                f"got {t.dim()} dims: {_desc(t)}"
            )
    if g.dim() != x.dim():
        raise ValueError(f"x and g must have the same number of spatial dims, got x {_desc(x)} and g {_desc(g)}")
    if g.shape[0] != x.shape[0]:
        raise ValueError(f"x and g must have the same batch size, got x {_desc(x)} and g {_desc(g)}")
    if sigma1 not in SIGMA1:
        raise ValueError(f"sigma1 must be one of {SIGMA1}, got {sigma1!r}")
    if sigma2 not in SIGMA2:
        raise ValueError(f"sigma2 must be one of {SIGMA2}, got {sigma2!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    d = x.dim() - 2
    c_l, c_g = x.shape[1], g.shape[1]
    if not isinstance(theta_weight, Tensor):
        raise TypeError(f"theta_weight must be a torch.Tensor, got {type(theta_weight).__name__}")
    if theta_weight.dim() != x.dim():
        raise ValueError(
            f"theta_weight must be Tensor[F_int, F_l, *subsample_factor] with {d} kernel dims for "
            f"{d}D inputs, got {list(theta_weight.shape)}"
        )
    c_int = theta_weight.shape[0]
    k = tuple(theta_weight.shape[2:])
    expected = {
        "theta_weight": (theta_weight, (c_int, c_l) + k),
        "phi_weight": (phi_weight, (c_int, c_g) + (1,) * d),
        "phi_bias": (phi_bias, (c_int,)),
        "psi_weight": (psi_weight, (1, c_int) + (1,) * d),
        "psi_bias": (psi_bias, (1,)),
    }
    if W_weight is not None:
        expected["W_weight"] = (W_weight, (c_l, c_l) + (1,) * d)
        expected["W_bias"] = (W_bias, (c_l,))
        if norm != "none":
            expected["norm_weight"] = (norm_weight, (c_l,))
            expected["norm_bias"] = (norm_bias, (c_l,))
        if norm == "batch":
            expected["running_mean"] = (running_mean, (c_l,))
            expected["running_var"] = (running_var, (c_l,))
    for name, (t, shape) in expected.items():
        if t is None:
            if name.startswith(("norm_", "running_", "W_bias", "phi_bias", "psi_bias")):
                continue  # optional: no affine parameters, no running statistics, no bias
            raise ValueError(f"{name} is required, got None")
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {_desc(t)}")
        if tuple(t.shape) != shape:
            what = _SHAPE_SOURCE.get(name, "x's channels")
            raise ValueError(
                f"{name} must have shape {list(shape)} to match {what} (x: {_desc(x)}, g: {_desc(g)}), "
                f"got {list(t.shape)}"
            )
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: all tensors must share a device")
    if g.device != x.device:
        raise ValueError(f"x is on {x.device} but g is on {g.device}: all tensors must share a device")
    for axis, (size, kk) in enumerate(zip(x.shape[2:], k)):
        if kk < 1 or size < kk:
            raise ValueError(
                f"theta_weight's kernel size (the subsample factor) {k} does not fit x's spatial size "
                f"{list(x.shape[2:])}: axis {axis} has {size} < {kk} voxels"
            )
    if norm == "batch" and W_weight is not None and training:
        n_per_channel = x.shape[0] * x[0, 0].numel()
        if n_per_channel < 2:
            raise ValueError(
                f"batch normalisation in training needs more than one value per channel, got x {_desc(x)}"
            )
    if norm == "group" and W_weight is not None and c_l % num_groups:
        raise ValueError(f"num_groups={num_groups} must divide x's {c_l} channels")


def grid_attention(
    x: Tensor,
    g: Tensor,
    theta_weight: Tensor,
    phi_weight: Tensor,
    phi_bias: Optional[Tensor],
    psi_weight: Tensor,
    psi_bias: Optional[Tensor],
    W_weight: Optional[Tensor] = None,
    W_bias: Optional[Tensor] = None,
    norm_weight: Optional[Tensor] = None,
    norm_bias: Optional[Tensor] = None,
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    *,
    norm: str = "batch",
    num_groups: int = 1,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    sigma1: str = "relu",
    sigma2: str = "sigmoid",
    align_corners: bool = False,
    backend: Optional[str] = None,
) -> tuple[Tensor, Tensor]:
    """Grid attention gate (Oktay et al., 2018, eqs. 1-2) with its output transform.

    Args:
        x: skip connection, ``Tensor[N, F_l, *S]`` with ``S`` = (L), (H, W) or (D, H, W).
        g: gating signal, ``Tensor[N, F_g, *S_g]``; any spatial size (``phi(g)`` is resized
            onto theta's grid ``S // subsample_factor``).
        theta_weight: ``W_x``, ``Tensor[F_int, F_l, *k]``; its kernel size ``k`` is the
            subsample factor (kernel = stride).
        phi_weight, phi_bias: ``W_g`` and ``b_g``, ``Tensor[F_int, F_g, 1, ...]`` and ``Tensor[F_int]``.
        psi_weight, psi_bias: ``psi`` and ``b_psi``, ``Tensor[1, F_int, 1, ...]`` and ``Tensor[1]``.
        W_weight, W_bias: output transform, ``Tensor[F_l, F_l, 1, ...]`` and ``Tensor[F_l]``;
            ``None`` returns ``alpha * x`` untransformed.
        norm_weight, norm_bias: the output normalisation's affine parameters, ``Tensor[F_l]``.
        running_mean, running_var: batch-norm running statistics, ``Tensor[F_l]``, updated in
            place when ``training``.
        norm: ``"batch"``, ``"instance"``, ``"group"`` or ``"none"``, applied after ``W``.
        num_groups: groups for ``norm="group"``.
        training: batch statistics (and running-statistics update) instead of running ones.
        momentum, eps: as :func:`torch.nn.functional.batch_norm`.
        sigma1: ``"relu"`` (the paper's) or ``"softplus"``.
        sigma2: ``"sigmoid"`` (the paper's) or ``"softmax"`` (over all positions of a sample).
        align_corners: for the linear resampling of ``phi(g)`` and ``alpha``; ``True`` matches
            checkpoints trained with PyTorch < 0.4.
        backend: ``"auto"``, ``"reference"``, ``"triton"``, ``"compile"`` or ``"cpu"``; ``None``
            takes the global default (see :func:`attention_gates.ops.use_backend`).

    Returns:
        ``(out, alpha)``: ``out`` is ``Tensor[N, F_l, *S]`` and ``alpha`` is
        ``Tensor[N, 1, *S]``, the attention coefficients on x's grid.

    Example:
        >>> import torch
        >>> from attention_gates.functional import grid_attention
        >>> x, g = torch.randn(2, 8, 16, 16), torch.randn(2, 12, 8, 8)
        >>> out, alpha = grid_attention(
        ...     x, g, torch.randn(4, 8, 2, 2), torch.randn(4, 12, 1, 1), torch.zeros(4),
        ...     torch.randn(1, 4, 1, 1), torch.zeros(1))
        >>> out.shape, alpha.shape
        (torch.Size([2, 8, 16, 16]), torch.Size([2, 1, 16, 16]))
    """
    check_gate_inputs(
        x, g, theta_weight, phi_weight, phi_bias, psi_weight, psi_bias, W_weight, W_bias,
        norm_weight, norm_bias, running_mean, running_var,
        norm=norm, num_groups=num_groups, training=training, sigma1=sigma1, sigma2=sigma2,
    )  # fmt: skip
    from .ops import dispatch  # lazy: ops sits above this module

    impl = dispatch.select(
        backend, x, g, W_weight=W_weight, norm=norm, training=training, sigma1=sigma1, sigma2=sigma2,
        weights=(theta_weight, phi_weight, phi_bias, psi_weight, psi_bias, W_weight, W_bias, norm_weight, norm_bias),
    )  # fmt: skip
    return impl(
        x, g, theta_weight, phi_weight, phi_bias, psi_weight, psi_bias, W_weight, W_bias,
        norm_weight, norm_bias, running_mean, running_var,
        norm=norm, num_groups=num_groups, training=training, momentum=momentum, eps=eps,
        sigma1=sigma1, sigma2=sigma2, align_corners=align_corners,
    )  # fmt: skip
