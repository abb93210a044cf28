"""The grid attention gate as one function, the library's one entry point to every implementation of it.

The math (Oktay et al., 2018, eqs. 1-2) is :func:`grid_attention_reference`, in
:mod:`attention_gates.ops.reference` with the gate's argument types :class:`GateWeights` and
:class:`GateOptions`; :func:`~attention_gates.functional.grid_attention` checks its inputs and runs the implementation
that :mod:`attention_gates.ops.dispatch` chooses (the reference or a fused one tested against it).
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from .ops import dispatch
from .ops.reference import GateOptions, GateWeights, check_gate_inputs, grid_attention_reference, resample

__all__ = ["grid_attention", "grid_attention_reference", "GateWeights", "GateOptions", "check_gate_inputs", "resample"]


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
        norm, num_groups, training, momentum, eps, sigma1, sigma2, align_corners: see
            :class:`GateOptions` (the tensors above are the fields of :class:`GateWeights`).
        backend: ``"auto"``, ``"reference"``, ``"compile"``, ``"triton"`` or ``"cpu"``; ``None``
            takes the global default (see :func:`attention_gates.ops.use_backend`).

    Returns:
        ``(out, alpha)``: ``out`` is ``Tensor[N, F_l, *S]`` and ``alpha`` is
        ``Tensor[N, 1, *S]``, the attention coefficients on x's grid.

    Raises:
        TypeError, ValueError: an argument of the wrong type, dtype, shape or device (the message
            names it, what was expected and what came).
        attention_gates.ops.BackendUnavailableError: an explicitly requested backend cannot run
            this call (the message lists every reason).

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
    w = GateWeights(
        theta_weight=theta_weight, phi_weight=phi_weight, phi_bias=phi_bias, psi_weight=psi_weight, psi_bias=psi_bias,
        W_weight=W_weight, W_bias=W_bias, norm_weight=norm_weight, norm_bias=norm_bias,
        running_mean=running_mean, running_var=running_var,
    )  # fmt: skip
    opt = GateOptions(
        norm=norm, num_groups=num_groups, training=training, momentum=momentum, eps=eps,
        sigma1=sigma1, sigma2=sigma2, align_corners=align_corners,
    )  # fmt: skip
    check_gate_inputs(x, g, w, opt)
    return dispatch.select(backend, x, g, w, opt)(x, g, w, opt)
