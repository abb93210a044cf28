"""The fused gate as ``torch.library`` custom ops with registered autograd and fake kernels.

``attention_gates::gate_fwd`` and ``attention_gates::gate_bwd`` wrap the launchers, so that
``torch.compile(fullgraph=True)`` traces a model that uses them and autograd saves only
``x``, ``g``, the weights, alpha on theta's grid and W's norm statistics (all through
``ctx.save_for_backward``).

Numerics: loads in the storage dtype (float32, float16, bfloat16), arithmetic in float32;
dot products take 16-bit operands in their own dtype and float32 ones in TF32 where cuDNN
would (``torch.backends.cudnn`` flags), else in ``tf32x3`` (see ``launch.dot_precision``), all
accumulating in float32; outputs and dx, dg in the inputs' dtypes and memory formats. float64
inputs compute in float64 (for gradcheck, under the interpreter).
Under :func:`torch.autocast` the op runs at the dtype its inputs arrive in (it is not on
autocast's lists); it computes in float32 regardless.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..reference import GateOptions, GateWeights, resample, update_running_stats
from . import launch

__all__ = ["grid_attention_triton"]


@torch.library.custom_op("attention_gates::gate_fwd", mutates_args=())
def gate_fwd(
    x: Tensor, g: Tensor, theta_w: Tensor, phi_w: Tensor, phi_b: Tensor, psi_w: Tensor, psi_b: Tensor,
    W_w: Optional[Tensor], W_b: Tensor, gamma: Optional[Tensor], beta: Optional[Tensor],
    mean_in: Optional[Tensor], var_in: Optional[Tensor], use_batch_stats: bool, eps: float,
    softplus: bool, align_corners: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return launch.gate_forward(
        x, g, theta_w, phi_w, phi_b, psi_w, psi_b, W_w, W_b, gamma, beta, mean_in, var_in,
        use_batch_stats, eps, softplus, align_corners,
    )  # fmt: skip


@gate_fwd.register_fake
def _(x, g, theta_w, phi_w, phi_b, psi_w, psi_b, W_w, W_b, gamma, beta, mean_in, var_in, use_batch_stats, eps, softplus, align_corners):
    N, C = x.shape[:2]
    stats = (C,) if use_batch_stats else (0,)
    return (
        torch.empty_like(x),
        x.new_empty((N, 1) + tuple(x.shape[2:])),
        x.new_empty((N, 1) + tuple(g.shape[2:]), dtype=launch.acc_dtype(x)),
        x.new_empty(stats, dtype=launch.acc_dtype(x)),
        x.new_empty(stats, dtype=launch.acc_dtype(x)),
    )


@torch.library.custom_op("attention_gates::gate_bwd", mutates_args=())
def gate_bwd(
    dout: Tensor, dalpha: Optional[Tensor], x: Tensor, g: Tensor, theta_w: Tensor, phi_w: Tensor, phi_b: Tensor,
    psi_w: Tensor, psi_b: Tensor, W_w: Optional[Tensor], W_b: Tensor, gamma: Optional[Tensor],
    alpha_c: Tensor, mean: Tensor, var: Tensor, use_batch_stats: bool, eps: float, softplus: bool,
    align_corners: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return launch.gate_backward(
        dout, dalpha, x, g, theta_w, phi_w, phi_b, psi_w, psi_b, W_w, W_b, gamma, alpha_c, mean, var,
        use_batch_stats, eps, softplus, align_corners,
    )  # fmt: skip


@gate_bwd.register_fake
def _(dout, dalpha, x, g, theta_w, phi_w, phi_b, psi_w, psi_b, W_w, W_b, gamma, alpha_c, mean, var, use_batch_stats, eps, softplus, align_corners):
    f32 = launch.acc_dtype(x)
    C, CG, CI = x.shape[1], g.shape[1], theta_w.shape[0]
    sizes = launch.weight_grad_sizes(C, CG, CI, math.prod(theta_w.shape[2:]), W_w is not None)
    return (
        torch.empty_like(x),
        torch.empty_like(g),
        x.new_empty(sum(sizes), dtype=f32),
        x.new_empty(2 * C if gamma is not None else 0, dtype=f32),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, g, theta_w, phi_w, phi_b, psi_w, psi_b, W_w, W_b, gamma, beta, mean_in, var_in, use_batch_stats, eps, softplus, align_corners = inputs
    _, _, alpha_c, mean, var = output
    if gamma is not None and not use_batch_stats:  # the running statistics that were applied
        mean, var = mean_in, var_in
    ctx.save_for_backward(x, g, theta_w, phi_w, phi_b, psi_w, psi_b, W_w, W_b, gamma, alpha_c, mean, var)
    ctx.flags = (use_batch_stats, eps, softplus, align_corners)
    ctx.param_dtypes = tuple(None if t is None else t.dtype for t in (theta_w, phi_w, phi_b, psi_w, psi_b, W_w, W_b, gamma, beta))


def _backward(ctx, dout, dalpha, _dac, _dmean, _dvar):
    x, g, theta_w, phi_w, phi_b, psi_w, psi_b, W_w, W_b, gamma, alpha_c, mean, var = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(x)
    dx, dg, dweights, dnorm = gate_bwd(
        dout, dalpha, x, g, theta_w, phi_w, phi_b, psi_w, psi_b, W_w, W_b, gamma, alpha_c, mean, var, *ctx.flags
    )
    weights = (theta_w, phi_w, phi_b, psi_w, psi_b) + ((W_w, W_b) if W_w is not None else ())
    sizes = launch.weight_grad_sizes(x.shape[1], g.shape[1], theta_w.shape[0], math.prod(theta_w.shape[2:]), W_w is not None)
    grads = [d.view(w.shape) for d, w in zip(dweights.split(sizes), weights)]
    grads += [None, None] if W_w is None else []
    C = x.shape[1]
    grads += [dnorm[C:], dnorm[:C]] if gamma is not None else [None, None]  # dnorm = [dbeta | dgamma]
    grads = [None if d is None else d.to(dt) for d, dt in zip(grads, ctx.param_dtypes)]
    return (dx, dg, *grads, None, None, None, None, None, None)


gate_fwd.register_autograd(_backward, setup_context=_setup_context)


def grid_attention_triton(x: Tensor, g: Tensor, w: GateWeights, opt: GateOptions) -> tuple[Tensor, Tensor]:
    """The fused gate: ``(out, alpha)`` of :func:`~attention_gates.ops.reference.grid_attention_reference`."""
    theta_weight, phi_weight, phi_bias, psi_weight, psi_bias, W_weight, W_bias, norm_weight, norm_bias, running_mean, running_var = w
    norm, training, momentum, eps, sigma1, align_corners = opt.norm, opt.training, opt.momentum, opt.eps, opt.sigma1, opt.align_corners
    C, CI = x.shape[1], theta_weight.shape[0]
    # phi is a 1x1 conv and linear resampling weights sum to one: resampling g equals resampling phi(g)
    coarse = tuple(s // k for s, k in zip(x.shape[2:], theta_weight.shape[2:]))
    g = launch.flat_strides(resample(g, coarse, align_corners))
    x = launch.flat_strides(x)
    zeros = lambda n, ref: torch.zeros(n, device=x.device, dtype=ref.dtype)  # noqa: E731
    phi_bias = zeros(CI, phi_weight) if phi_bias is None else phi_bias
    psi_bias = zeros(1, psi_weight) if psi_bias is None else psi_bias
    gamma = beta = None
    has_norm = W_weight is not None and norm == "batch"
    if W_weight is not None:
        W_bias = zeros(C, W_weight) if W_bias is None else W_bias
        if has_norm:
            gamma = torch.ones(C, device=x.device) if norm_weight is None else norm_weight
            beta = torch.zeros(C, device=x.device) if norm_bias is None else norm_bias
    else:
        W_bias = zeros(C, x)
    use_batch_stats = has_norm and (training or running_mean is None)
    out, alpha, _, mean, var = gate_fwd(
        x, g, theta_weight, phi_weight, phi_bias, psi_weight, psi_bias, W_weight, W_bias, gamma, beta,
        running_mean if has_norm and not use_batch_stats else None,
        running_var if has_norm and not use_batch_stats else None,
        use_batch_stats, float(eps), sigma1 == "softplus", bool(align_corners),
    )  # fmt: skip
    if use_batch_stats and training:
        update_running_stats(w, mean, var, x.numel() // C, momentum)
    return out, alpha
